"""Persistent chains (PCD, Tieleman 2008): the negatives' chains carry over between steps.

``num_chains`` chains are carried across parameter updates; each step every chain but the
recorded ones restarts, with probability ``reinit_fraction``, at a data point of the batch.
With temperature-1 MALA this is stochastic maximum likelihood and gives a convergent density
(Nijkamp et al. 2020). The chains START at training points and restart at training points:
where the model has modes that chains cannot cross in a few steps (the checkerboard's squares
touch only at corners), the share of chains in each mode is fixed by where they started, and
starting from the data gives every mode its data share from the first step
(``benchmarks/toy_quality.py`` measures how much this matters).
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

__all__ = ["Persistent"]


@dataclass(frozen=True)
class Persistent(ChainSettings):
    """Persistent chains, a ``reinit_fraction`` of the unrecorded ones restarted at the batch
    each step.

    Attributes (besides ``ChainSettings``'):
        reinit_fraction: share of the chains that are NOT recorded restarted at data points
            of the batch each step (each with this probability). The recorded chains (the
            first ``num_recorded_chains``) are never restarted, so the share of all chains
            restarted is ``reinit_fraction · (num_chains − num_recorded_chains) / num_chains``.

    Example:
        >>> import numpyro_ebm as ebm
        >>> negatives = ebm.negatives.Persistent(num_chains=256, reinit_fraction=0.05)
        >>> # ebm.fit(energy, data, key=key, negatives=negatives)
    """

    name = "persistent"
    reinit_fraction: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.reinit_fraction <= 1.0:
            raise ValueError(f"reinit_fraction must be in [0, 1], got {self.reinit_fraction}")

    def init(self, key, data, base) -> ChainState:
        return ChainState(random_rows(key, flat(data), self.num_chains), self.initial_step_size())

    def sample(self, key, state: ChainState, target: Target):
        k_start, k_chains = jax.random.split(key)
        k_fresh, _, k_mask = jax.random.split(k_start, 3)
        starts = reinitialised(
            k_fresh, k_mask, state.bank, target.batch, self.reinit_fraction,
            self.num_recorded_chains,
        )  # fmt: skip
        run = self.run(k_chains, starts, target, state.step_size)
        new = ChainState(run.finals, self.adapted(state.step_size, run.acceptance_rate, target))
        info = NegativeInfo(
            run.acceptance_rate, state.step_size, run.langevin_grad_norm, {}, run.record
        )
        return new, run.finals, info
