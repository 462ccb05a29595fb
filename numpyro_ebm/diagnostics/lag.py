"""How far the negative-phase chains were from the model when training ended.

``energy_gap`` (``diagnose``) compares the data's mean energy with the negatives'. At a
stationary point of maximum likelihood the two agree, so a gap mixes two things: the model
still moving (early-stopped, or not converged: the gap is then the likelihood's own gradient
along the energy's scale) and chains that lag behind the model they should sample. Only the
second is a fault of the negative phase, and the gap cannot tell them apart. ``chain_lag``
can: it runs the final chains on under the last iterate's energy with the training kernel and
its final step size, nothing else changing. Chains at equilibrium keep their mean energy (the
kernel leaves the model invariant); chains that lag fall into the model's wells, and the fall
is the lag. On 64-D digits the default run's chains end 5–11 nats above the equilibrium of
its last iterate (docs/benchmarks.md, "Where digits' energy gap comes from").

Example:
    >>> import jax, numpyro_ebm as ebm
    >>> data = ebm.datasets.toy("8gaussians").sample(jax.random.key(0), 2000)
    >>> res = ebm.fit(ebm.energies.MLPEnergy(2, key=jax.random.key(1)), data,
    ...               key=jax.random.key(2), num_steps=100, progress_bar=False)  # doctest: +SKIP
    >>> ebm.diagnostics.chain_lag(res, key=jax.random.key(3)).check.status  # doctest: +SKIP
    'ok'
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_ebm import samplers
from numpyro_ebm.diagnostics._shared import Check, FitResult, graded

__all__ = ["ChainLag", "chain_lag", "has_chains"]


class ChainLag(NamedTuple):
    """What ``chain_lag`` measured.

    Attributes:
        steps: ``(k + 1,)`` sampler steps after the end of training: 0, then every
            ``num_steps / k``.
        mean_energy: ``(k + 1,)`` mean energy of the chains at those steps under the last
            iterate's energy.
        lag: the chains' mean energy at the end of training minus its mean over the second
            half of the continued run (nats; > 0: the chains sat above the model's
            equilibrium). A lower bound when the chains are still falling at the end.
        stderr: its standard error over the chains.
        check: ``|lag|`` graded like ``energy_gap`` (≤ 0.25 nats ok, ≤ 1 warn, else fail).
    """

    steps: np.ndarray
    mean_energy: np.ndarray
    lag: float
    stderr: float
    check: Check


def has_chains(result: FitResult) -> bool:
    """Whether ``chain_lag`` can measure ``result``: an unconditional run whose negatives are
    chains it kept."""
    return result.chains is not None and result.config.runs_chains and result.log_z is not None


def chain_lag(
    result: FitResult, *, key: jax.Array, num_steps: int = 1000, num_records: int = 10
) -> ChainLag:
    """Run the final chains of ``result`` on for ``num_steps`` steps of the training kernel
    (its last step size, fixed) under the last iterate's energy, and measure how far their
    mean energy falls (see the module doc).

    Args:
        result: a ``FitResult`` of an unconditional run that returned its chains
            (``FitResult.chains``: persistent, replay, short-run or contrastive-divergence
            negatives; of a replay buffer, its first ``num_chains`` rows; of parallel
            tempering, the ladders' model slots).
        key: PRNG key, used once.
        num_steps: sampler steps to run (a multiple of ``num_records``).
        num_records: mean energies recorded along the way.

    Raises:
        ValueError: a run without chains (generator negatives, score matching), a
            conditional run, or ``num_steps`` not a positive multiple of ``num_records``.
    """
    if result.chains is None or not result.config.runs_chains:
        raise ValueError(
            "this run kept no chains (FitResult.chains is None: generator negatives, score "
            "matching, or none)"
        )
    if result.log_z is None:
        raise ValueError("chain_lag measures unconditional runs; this energy is conditional")
    if not (num_records >= 1 and num_steps >= num_records and num_steps % num_records == 0):
        raise ValueError(
            f"num_steps ({num_steps}) must be a positive multiple of num_records ({num_records})"
        )
    sampler = getattr(result.config.negatives, "sampler", result.config.sampler)
    chains = jnp.asarray(result.chains)[: result.config.num_chains]
    flat = chains.reshape(chains.shape[0], -1)
    logdensity = samplers.flat_logdensity(result.last_energy, result.event_shape)
    states = sampler.init_chains(flat, logdensity)
    step_size = jnp.asarray(result.history["step_size"][-1], jnp.float32)
    thinning = num_steps // num_records
    _, trace, _ = samplers.run_chains(
        key, sampler, logdensity, states, step_size, num_steps, thinning=thinning
    )
    energies = -np.concatenate(
        [np.asarray(states.logdensity, np.float64)[None], np.asarray(trace.logdensity)], axis=0
    )  # (num_records + 1, chains)
    settled = energies[1 + num_records // 2 :].mean(axis=0)
    fall = energies[0] - settled
    lag, stderr = float(fall.mean()), float(fall.std(ddof=1) / math.sqrt(fall.size))
    check = graded(
        "chain_lag",
        abs(lag),
        f"{lag:+.3f} ± {stderr:.3f} nats",
        "|lag| ≤ {ok} ok, ≤ {fail} warn",
        "the chains were at the model's equilibrium when training ended",
        "the chains were not at the model's equilibrium when training ended "
        + (
            "(they sat above it: the model sharpened faster than they followed; more "
            "num_mcmc_steps, a lower learning rate or sampler='hmc' let them keep up)"
            if lag > 0
            else "(they sat below it: stuck in wells the model has since raised)"
        ),
        threshold="energy_gap",
    )
    steps = np.arange(num_records + 1) * thinning
    return ChainLag(steps, energies.mean(axis=1), lag, stderr, check)
