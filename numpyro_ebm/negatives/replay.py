"""A replay buffer of past negatives (Du & Mordatch 2019).

A bank of ``buffer_size`` past negatives; each step starts ``num_chains`` chains from random
bank entries, a ``reinit_fraction`` of them from data points of the batch instead, and writes
the results back where they came from. The bank starts as random training points.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax

from numpyro_ebm.negatives._chains import (
    ChainSettings,
    ChainState,
    flat,
    random_rows,
    reinitialised,
)
from numpyro_ebm.negatives.base import NegativeInfo, Target
from numpyro_ebm.validation import check_count

__all__ = ["Replay"]


@dataclass(frozen=True)
class Replay(ChainSettings):
    """Chains started from a replay bank of past negatives.

    Attributes (besides ``ChainSettings``'):
        buffer_size: rows of the bank.
        reinit_fraction: share of chains started at data points of the batch instead (each
            chain with this probability, the recorded ones too: they are the first chains of
            the step, drawn from the bank afresh each step).
    """

    name = "replay"
    buffer_size: int = 10_000
    reinit_fraction: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        check_count("buffer_size", self.buffer_size)
        if not 0.0 <= self.reinit_fraction <= 1.0:
            raise ValueError(f"reinit_fraction must be in [0, 1], got {self.reinit_fraction}")

    def init(self, key, data, base) -> ChainState:
        return ChainState(random_rows(key, flat(data), self.buffer_size), self.initial_step_size())

    def sample(self, key, state: ChainState, target: Target):
        k_start, k_chains = jax.random.split(key)
        k_fresh, k_pick, k_mask = jax.random.split(k_start, 3)
        rows = jax.random.randint(k_pick, (self.num_chains,), 0, state.bank.shape[0])
        starts = reinitialised(
            k_fresh, k_mask, state.bank[rows], target.batch, self.reinit_fraction
        )
        run = self.run(k_chains, starts, target, state.step_size)
        bank = state.bank.at[rows].set(run.finals)
        new = ChainState(bank, self.adapted(state.step_size, run.acceptance_rate, target))
        info = NegativeInfo(
            run.acceptance_rate, state.step_size, run.langevin_grad_norm, {}, run.record
        )
        return new, run.finals, info
