"""Where the negative phase's chains start, and what is kept between training steps.

The maximum-likelihood gradient needs samples from the current model. Three standard sources,
all plain JAX arrays inside the compiled training step:

* ``"persistent"`` (PCD, Tieleman 2008): ``num_chains`` chains carried across parameter
  updates. With temperature-1 MALA this is stochastic maximum likelihood and gives a
  convergent density (Nijkamp et al. 2020).
* ``"replay"`` (Du & Mordatch 2019): a bank of ``buffer_size`` past negatives; each step starts
  ``num_chains`` chains from random bank entries, a ``reinit_fraction`` of them from data points
  of the current batch instead, and writes the results back.
* ``"short_run"`` (Nijkamp et al. 2019): every step starts fresh chains from the base
  distribution. Good samples after few steps, but NOT a valid density (the table in
  ``benchmarks/toy_quality.py`` shows how much worse).

Persistent chains and the replay bank START at training points, and replay re-initialises at
training points. Where the model has modes that chains cannot cross in a few steps (the
checkerboard's squares touch only at corners), the share of chains in each mode is fixed by
where they started, and the gradient then drives each mode's energy until the MODEL's mass
matches the data's while the chains' shares stay wrong: the density comes out badly unbalanced.
Starting from the data gives every mode its data share from the first step (measured in
``benchmarks/toy_quality.py``: starting from a Gaussian instead multiplies the checkerboard KL
many times). Short runs start from the base distribution, a Gaussian fitted to the training
data (mean and covariance), as in Nijkamp et al. (2019).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from numpyro_ebm.gaussian import GaussianBase, fit_base

__all__ = ["KINDS", "GaussianBase", "chain_starts", "fit_base", "init_bank", "update_bank"]

KINDS = ("persistent", "replay", "short_run")


def init_bank(
    key: jax.Array, kind: str, flat_data: jax.Array, num_chains: int, buffer_size: int
) -> jax.Array:
    """Initial bank, random training points: ``(buffer_size, D)`` for replay, else
    ``(num_chains, D)``."""
    rows = jax.random.randint(
        key, (buffer_size if kind == "replay" else num_chains,), 0, flat_data.shape[0]
    )
    return flat_data[rows]


def chain_starts(
    key: jax.Array,
    kind: str,
    bank: jax.Array,
    base: GaussianBase,
    num_chains: int,
    reinit_fraction: float,
    flat_batch: jax.Array,
    num_kept: int = 0,
) -> tuple[jax.Array, jax.Array | None]:
    """Start positions ``(num_chains, D)`` for this step, and the bank rows they came from.

    ``flat_batch`` ``(batch_size, D)`` is where chains are re-initialised. Persistent chains
    ``0 .. num_kept − 1`` are never re-initialised: ``fit`` records them, and a recorded chain
    that jumped back to the data now and then would hide whether the sampler itself mixes.
    """
    k_fresh, k_pick, k_mask = jax.random.split(key, 3)
    if kind == "short_run":
        return base.sample(k_fresh, num_chains), None
    fresh = flat_batch[jax.random.randint(k_fresh, (num_chains,), 0, flat_batch.shape[0])]
    reinit = jax.random.uniform(k_mask, (num_chains, 1)) < reinit_fraction
    if kind == "persistent":
        reinit = reinit & (jnp.arange(num_chains) >= num_kept)[:, None]
        return jnp.where(reinit, fresh, bank), None
    rows = jax.random.randint(k_pick, (num_chains,), 0, bank.shape[0])
    return jnp.where(reinit, fresh, bank[rows]), rows


def update_bank(kind: str, bank: jax.Array, finals: jax.Array, rows: jax.Array | None):
    """Bank after this step: the chains' final positions (written back at ``rows`` for replay)."""
    if kind == "replay":
        return bank.at[rows].set(finals)
    return finals
