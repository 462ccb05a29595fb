"""What the MCMC-based negative samplers share: their settings, their state and one chain run."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp

from numpyro_ebm import samplers as _samplers
from numpyro_ebm.negatives.base import ChainRecord, NegativeSampler, Target
from numpyro_ebm.validation import check_count, check_non_negative


class ChainState(NamedTuple):
    """State of an MCMC negative sampler: ``bank`` (the persistent chains or the replay
    buffer, flat ``(rows, D)``; a placeholder for samplers that keep none) and the tuned
    ``step_size`` (scalar)."""

    bank: jax.Array
    step_size: jax.Array


class ChainRun(NamedTuple):
    """The outcome of one ``run_chains_from``."""

    finals: jax.Array  # (num_chains, D), no gradient
    acceptance_rate: jax.Array
    langevin_grad_norm: jax.Array
    record: ChainRecord | None


# chains recorded by default: this many, or all of them when there are fewer
DEFAULT_RECORDED_CHAINS = 8


def recorded_chains(num_chains, num_recorded_chains) -> int:
    """``num_recorded_chains``, or for None its default ``min(DEFAULT_RECORDED_CHAINS,
    num_chains)`` (``num_chains`` checked first)."""
    if num_recorded_chains is not None:
        return num_recorded_chains
    check_count("num_chains", num_chains)
    return min(DEFAULT_RECORDED_CHAINS, int(num_chains))


def check_chain_counts(num_chains, num_recorded_chains) -> None:
    """``num_chains >= 1`` and ``0 <= num_recorded_chains <= num_chains`` (integers)."""
    check_count("num_chains", num_chains)
    check_count("num_recorded_chains", num_recorded_chains, low=0)
    if num_recorded_chains > num_chains:
        raise ValueError(
            f"num_recorded_chains ({num_recorded_chains}) cannot exceed num_chains ({num_chains})"
        )


@dataclass(frozen=True)
class ChainSettings(NegativeSampler):
    """Settings every MCMC negative sampler has.

    Attributes:
        num_chains: chains run per training step (the negatives per step).
        num_mcmc_steps: sampler steps per training step.
        sampler: the kernel (``numpyro_ebm.samplers.Sampler`` or a name).
        step_size_gain: Robbins-Monro gain of the per-step step-size update
            ``log h ← log h + gain · (acceptance − target)``, finite, ``>= 0`` (0: the step
            size stays fixed).
        num_recorded_chains: chains whose positions and statistics each step reports
            (``NegativeInfo.record``) for diagnostics, at most ``num_chains``; None
            (default): ``min(8, num_chains)``, again after a ``replace`` that does not set it.
    """

    num_chains: int = 1024
    num_mcmc_steps: int = 20
    sampler: _samplers.Sampler = field(default_factory=_samplers.mala)
    step_size_gain: float = 0.2
    num_recorded_chains: int | None = None
    _recorded_by_default: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "sampler", _samplers.get_sampler(self.sampler))
        check_count("num_mcmc_steps", self.num_mcmc_steps)
        check_non_negative("step_size_gain", self.step_size_gain)
        object.__setattr__(self, "_recorded_by_default", self.num_recorded_chains is None)
        recorded = recorded_chains(self.num_chains, self.num_recorded_chains)
        object.__setattr__(self, "num_recorded_chains", recorded)
        self.check_counts()

    def check_counts(self) -> None:
        """``ValueError`` for bad chain counts (``check_chain_counts``)."""
        check_chain_counts(self.num_chains, self.num_recorded_chains)

    def replace(self, **changes):
        """A copy with some settings changed; a default ``num_recorded_chains`` follows a
        new ``num_chains``."""
        if getattr(self, "_recorded_by_default", False):
            changes.setdefault("num_recorded_chains", None)
        return dataclasses.replace(self, **changes)

    def initial_step_size(self) -> jax.Array:
        return jnp.asarray(self.sampler.step_size, jnp.float32)

    def run(self, key: jax.Array, starts: jax.Array, target: Target, step_size) -> ChainRun:
        """``num_mcmc_steps`` of the kernel from ``starts`` ``(num_chains, D)`` under the
        target (chain states are built afresh: no log-density cached under older
        parameters enters the Metropolis ratio)."""
        return run_chains_from(
            key, starts, target, self.sampler, step_size, self.num_mcmc_steps,
            self.num_recorded_chains,
        )  # fmt: skip

    def adapted(self, step_size, acceptance, target: Target | None = None) -> jax.Array:
        """The step size after one training step, kept inside the bounds of the training
        data's scale (``samplers.step_size_bounds`` of ``target.base``; without a target,
        those of unit scale)."""
        variance = None if target is None else target.base.variance
        bounds = _samplers.step_size_bounds(variance)
        return _samplers.adapt_step_size(
            step_size, acceptance, self.sampler, self.step_size_gain, bounds
        )


def run_chains_from(key, starts, target: Target, sampler, step_size, num_steps, num_recorded):
    """Run chains from ``starts`` under ``target.logdensity``; see ``ChainSettings.run``."""
    starts = target.place(starts)
    chains = sampler.init_chains(starts, target.logdensity)
    chains, trace, _ = _samplers.run_chains(
        key, sampler, target.logdensity, chains, step_size, num_steps
    )
    # the chains' states cache ∇ₓ log p at their final positions: no extra gradient pass
    norm = jnp.mean(jnp.linalg.norm(chains.logdensity_grad, axis=1))
    finals = jax.lax.stop_gradient(chains.position)
    record = None
    if num_recorded:
        info = _samplers.summarize(jax.tree.map(lambda a: a[:, :num_recorded], trace))
        record = ChainRecord(finals[:num_recorded], info)
    return ChainRun(finals, jnp.mean(trace.acceptance_rate), norm, record)


def reinitialised(
    k_fresh, k_mask, bank_rows: jax.Array, batch: jax.Array, fraction: float, num_kept: int = 0
):
    """``bank_rows`` ``(n, D)`` with each row replaced, with probability ``fraction``, by a
    random row of ``batch``; rows ``0 .. num_kept − 1`` are never replaced (recorded chains
    that jumped back to the data now and then would hide whether the sampler mixes), so the
    expected share of rows replaced is ``fraction · (n − num_kept) / n``."""
    n = bank_rows.shape[0]
    fresh = batch[jax.random.randint(k_fresh, (n,), 0, batch.shape[0])]
    reinit = jax.random.uniform(k_mask, (n, 1)) < fraction
    if num_kept:
        reinit = reinit & (jnp.arange(n) >= num_kept)[:, None]
    return jnp.where(reinit, fresh, bank_rows)


def random_rows(key: jax.Array, data: jax.Array, num_rows: int) -> jax.Array:
    """``num_rows`` rows of the flat ``(N, D)`` data drawn with replacement."""
    return data[jax.random.randint(key, (num_rows,), 0, data.shape[0])]


def flat(data: jax.Array) -> jax.Array:
    """``(N, *event_shape) -> (N, D)``."""
    return jnp.reshape(data, (data.shape[0], math.prod(data.shape[1:])))
