"""Parallel tempering negatives: ladders between the data's Gaussian and the model, so the
negative phase crosses between separated modes and measures how mass is shared between them.

Persistent chains that cannot cross from one mode to another keep the share of chains each
mode started with, so the likelihood gradient says nothing about the modes' weights. Here each
negative is the model slot of a ladder of ``num_temperatures`` replicas on the geometric path
``q^{1−β} exp(−βE)`` from the Gaussian ``q`` fitted to the training data (sampled exactly) to
the model, with non-reversible even/odd swaps (``numpyro_ebm.samplers.tempering``). A replica
that climbs down from the base arrives at the model wherever the model puts mass. The ladders
persist across training steps like persistent chains; each step refreshes their cached
energies under the new parameters, runs ``num_mcmc_steps`` rounds, retunes each temperature's
step size and moves the temperatures towards equal swap rejection rates (``ladder_gain``).

A conditional energy ``E(x | c)`` gets one ladder per batch row, under that row's condition:
the model slot starts at the observed response, the others at fresh draws of the base (the
Gaussian fitted to all responses). These ladders do not persist (the batch changes each step),
the temperatures and step sizes do; a ladder needs a few times ``num_temperatures`` rounds to
forget its start, so conditional sites want more ``num_mcmc_steps`` than persistent ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from numpyro_ebm import samplers as _samplers
from numpyro_ebm.negatives._chains import ChainSettings, flat, random_rows
from numpyro_ebm.negatives.base import ChainRecord, NegativeInfo, Target
from numpyro_ebm.samplers import tempering as _tempering
from numpyro_ebm.validation import check_count

__all__ = ["ParallelTempering", "TemperingState", "tempering_summary"]


class TemperingState(NamedTuple):
    """State of ``ParallelTempering``.

    Attributes:
        replicas: ``samplers.ReplicaState`` of the ``num_chains`` persistent ladders
            (unused by conditional sites).
        ladder: ``samplers.Ladder``: the temperatures and each slot's step size.
        swap_acceptance: ``(K − 1,)`` the last step's mean swap acceptance of each pair.
    """

    replicas: _tempering.ReplicaState
    ladder: _tempering.Ladder
    swap_acceptance: jax.Array


@dataclass(frozen=True)
class ParallelTempering(ChainSettings):
    """Parallel-tempering ladders as the negative phase (``fit(negatives="parallel_tempering")``).

    Attributes (besides ``ChainSettings``'; ``num_chains`` is the number of ladders, one
    negative each; ``num_mcmc_steps`` the rounds per training step, each a kernel transition at
    every temperature and one set of swaps, so a step costs ``num_temperatures`` times the
    energy gradients of ``Persistent`` with the same settings):
        num_temperatures: replicas per ladder ``K >= 2``, from the model (β = 1) to the base
            (β = 0). The default 4 suits barriers ``Λ`` up to about 1.5, what the 2-D toys
            measure (docs/benchmarks.md). ``FitResult``'s diagnostics report the barrier
            ``Λ`` and the number it suggests (``samplers.suggested_replicas``).
        adapt_temperatures: move the temperatures towards equal swap rejection each step.
        ladder_gain: how far each step moves them (1: all the way to the schedule estimated
            from this step's swaps; smaller values average over steps).
        negatives_per_ladder: the model slot's states after each of the step's last
            ``negatives_per_ladder`` rounds are all negatives (``negatives_per_ladder ·
            num_chains`` per step): consecutive states of one ladder are correlated, but they
            cost no extra sampling, and more negatives make the gradient less noisy.
            Conditional sites use the last round's only (one negative per batch row).

    Example:
        >>> import numpyro_ebm as ebm
        >>> negatives = ebm.negatives.ParallelTempering(num_chains=256, num_temperatures=8)
        >>> # ebm.fit(energy, data, key=key, negatives=negatives)
    """

    name = "parallel_tempering"
    supports_conditions = True
    num_temperatures: int = 4
    adapt_temperatures: bool = True
    ladder_gain: float = 0.1
    negatives_per_ladder: int = 1

    def __post_init__(self):
        super().__post_init__()
        check_count("num_temperatures", self.num_temperatures, low=2)
        check_count("negatives_per_ladder", self.negatives_per_ladder)
        if self.negatives_per_ladder > self.num_mcmc_steps:
            raise ValueError(
                f"negatives_per_ladder ({self.negatives_per_ladder}) cannot exceed the rounds "
                f"per step, num_mcmc_steps ({self.num_mcmc_steps})"
            )
        if not 0.0 < self.ladder_gain <= 1.0:
            raise ValueError(f"ladder_gain must be in (0, 1], got {self.ladder_gain}")

    def init(self, key, data, base) -> TemperingState:
        rows = random_rows(key, flat(data), self.num_chains * self.num_temperatures)
        positions = rows.reshape(self.num_chains, self.num_temperatures, -1)
        replicas = _tempering.init_replicas(base, _zero_energy, positions)
        ladder = _tempering.initial_ladder(
            self.num_temperatures, self.sampler.step_size, positions.dtype
        )
        return TemperingState(replicas, ladder, jnp.ones_like(ladder.step_sizes))

    def sample(self, key, state: TemperingState, target: Target):
        energy = _ladder_energy(target)
        if target.conditions is None:
            replicas = _tempering.refresh(target.base, energy, state.replicas)
            conditions = None
        else:
            k_starts, key = jax.random.split(key)
            starts = _conditional_starts(k_starts, state, target)
            replicas = _tempering.init_replicas(target.base, energy, starts, target.conditions)
            conditions = target.conditions
        replicas = replicas._replace(position=target.place(replicas.position))
        many = self.negatives_per_ladder > 1 and target.conditions is None
        run, _, info = _tempering.run_rounds(
            key, self.sampler, target.base, energy, replicas, state.ladder,
            self.num_mcmc_steps, conditions, keep_model_positions=many,
        )  # fmt: skip
        negatives = run.position[:, 0]
        if many:
            info, history = info
            last = history[-self.negatives_per_ladder :]
            negatives = jnp.reshape(last, (-1, last.shape[-1]))
        negatives = jax.lax.stop_gradient(negatives)
        acceptance = jnp.mean(jnp.nan_to_num(info.acceptance_rate), axis=(0, 1))
        swap_acceptance = jnp.mean(info.swap_acceptance, axis=(0, 1))
        bounds = _samplers.step_size_bounds(target.base.variance)
        ladder = _tempering.adapt_step_sizes(
            state.ladder, acceptance, self.sampler, self.step_size_gain, bounds
        )
        if self.adapt_temperatures:
            ladder = _tempering.adapt_ladder(ladder, swap_acceptance, self.ladder_gain)
        negative_info = self._info(state, replicas, run, info, target)
        # per-batch ladders do not persist: the state keeps its placeholder (a fixed shape)
        kept = run if target.conditions is None else state.replicas
        return TemperingState(kept, ladder, swap_acceptance), negatives, negative_info

    def _info(self, state, start, end, info, target) -> NegativeInfo:
        # ∇ₓE at the negatives from the cached ∇ℓ = −∇E − ∇log q
        x = end.position[:, 0]
        base_grad = jax.vmap(jax.grad(lambda z: target.base.log_prob(z[None])[0]))(x)
        grad_norm = jnp.mean(jnp.linalg.norm(end.log_ratio_grad[:, 0] + base_grad, axis=1))
        swap_acceptance = jnp.mean(info.swap_acceptance, axis=(0, 1))
        num_ladders = end.position.shape[0]
        trips = (jnp.sum(end.round_trips) - jnp.sum(start.round_trips)) / num_ladders
        metrics = {
            "barrier": _tempering.barrier(swap_acceptance),
            "swap_acceptance_min": jnp.min(swap_acceptance),
            "round_trips": trips.astype(jnp.float32),
        }
        record = None
        if self.num_recorded_chains:
            kept = jax.tree.map(lambda a: a[:, : self.num_recorded_chains], info.model)
            record = ChainRecord(
                jax.lax.stop_gradient(x[: self.num_recorded_chains]), _samplers.summarize(kept)
            )
        return NegativeInfo(
            jnp.mean(jnp.nan_to_num(info.acceptance_rate[..., 0])),
            state.ladder.step_sizes[0],
            grad_norm,
            metrics,
            record,
        )


def _conditional_starts(key, state: TemperingState, target: Target) -> jax.Array:
    """``(B, K, D)``: slot 0 at each row's observed response, the other slots at fresh draws
    of the base (the tempered targets are closer to the base the smaller their β, so the
    ladder starts nearer its equilibrium than with every slot at the response)."""
    num_rows, dim = target.batch.shape
    num_slots = state.ladder.betas.shape[0]
    fresh = target.base.sample(key, num_rows * (num_slots - 1))
    fresh = fresh.reshape(num_rows, num_slots - 1, dim)
    return jnp.concatenate([target.batch[:, None], fresh], axis=1)


def _zero_energy(x, condition):
    """Placeholder energy for ``init`` (the first ``sample`` refreshes under the model)."""
    return jnp.zeros((), x.dtype)


def _ladder_energy(target: Target):
    """The target's energy as the tempering engine calls it, ``(x, c) -> E``."""
    if target.conditions is None:
        return lambda x, c: target.energy(x)
    return target.energy


def tempering_summary(state: TemperingState) -> _tempering.TemperingSummary:
    """The ladders' ``samplers.TemperingSummary`` after training: the last temperatures and swap
    acceptances, round trips counted over the whole run."""
    return _tempering.summary(state.ladder, state.replicas, state.swap_acceptance)
