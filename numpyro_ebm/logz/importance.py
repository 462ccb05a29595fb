"""``log Z`` by importance sampling from a normalised proposal.

``Ẑ = mean exp(−E(xᵢ) − log q(xᵢ))`` with ``xᵢ ~ q`` is unbiased for ``Z``, so ``log Ẑ`` is
biased low on average (Jensen): report its standard error and effective sample size.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from numpyro_ebm.logz.estimate import LogZEstimate, log_mean_exp
from numpyro_ebm.validation import check_count

__all__ = ["importance"]


def importance(
    energy: Callable, proposal, *, key: jax.Array, num_samples: int = 100_000
) -> LogZEstimate:
    """``log Z`` by importance sampling: ``Ẑ = mean exp(−E(xᵢ) − log q(xᵢ))``, ``xᵢ ~ q``.

    Args:
        energy: one event -> scalar.
        proposal: any NumPyro distribution with the energy's event shape (and no batch shape);
            it must cover the density's mass, or the estimate silently misses it (check ``ess``).
        key: PRNG key.
        num_samples: proposal draws.

    Returns:
        ``LogZEstimate`` with the delta-method standard error
        ``std(w) / (sqrt(n) mean(w))`` and the effective sample size ``(Σw)² / Σw²``.

    Raises:
        ValueError: ``num_samples`` not a positive integer, or non-finite energies at
            proposal draws (how many are reported).
    """
    check_count("num_samples", num_samples)
    if proposal.batch_shape != ():
        raise ValueError(f"proposal must have batch_shape (), got {proposal.batch_shape}")
    x = proposal.sample(key, (num_samples,))
    log_w = jax.jit(lambda x: -jax.vmap(energy)(x) - proposal.log_prob(x))(x)
    log_w = np.asarray(log_w, np.float64)
    bad = ~np.isfinite(log_w)
    if bad.any():
        raise ValueError(
            f"energy or proposal log-density is not finite at {int(bad.sum())} of "
            f"{num_samples} proposal draws"
        )
    value, stderr, ess = log_mean_exp(log_w)
    return LogZEstimate(value, stderr, "importance", ess)
