"""Short runs from noise (Nijkamp et al. 2019): fresh chains every step.

Every step starts ``num_chains`` fresh chains from the base distribution, a Gaussian fitted to
the training data (mean and covariance). Good samples after few steps, but NOT a valid density
(``benchmarks/toy_quality.py`` shows how much worse than persistent chains).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax

from numpyro_ebm.negatives._chains import ChainSettings, ChainState, flat, random_rows
from numpyro_ebm.negatives.base import NegativeInfo, Target

__all__ = ["ShortRun"]


@dataclass(frozen=True)
class ShortRun(ChainSettings):
    """Fresh chains from the data-fitted Gaussian every step. The state keeps the step size
    and the last negatives (``FitResult.chains``)."""

    name = "short_run"

    def init(self, key, data, base) -> ChainState:
        return ChainState(random_rows(key, flat(data), self.num_chains), self.initial_step_size())

    def sample(self, key, state: ChainState, target: Target):
        k_start, k_chains = jax.random.split(key)
        k_fresh = jax.random.split(k_start, 3)[0]
        starts = target.base.sample(k_fresh, self.num_chains)
        run = self.run(k_chains, starts, target, state.step_size)
        new = ChainState(run.finals, self.adapted(state.step_size, run.acceptance_rate, target))
        info = NegativeInfo(
            run.acceptance_rate, state.step_size, run.langevin_grad_norm, {}, run.record
        )
        return new, run.finals, info
