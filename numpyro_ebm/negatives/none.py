"""No negatives: for objectives that see only the data (score matching).

``fit(objective="sm" | "ssm" | "dsm")`` uses it unless ``negatives`` names a sampler, so a
score-matching step runs no chain. Its metrics (acceptance, step size) are NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from numpyro_ebm.negatives.base import NegativeInfo, NegativeSampler, Target

__all__ = ["NoNegatives"]


@dataclass(frozen=True)
class NoNegatives(NegativeSampler):
    """Draws nothing: ``sample`` gives ``(0, D)`` negatives and keeps no state."""

    name = "none"
    supports_conditions = True

    def init(self, key, data, base) -> tuple:
        return ()

    def sample(self, key, state: tuple, target: Target):
        nan = jnp.full((), jnp.nan, target.batch.dtype)
        empty = jnp.zeros((0, target.batch.shape[1]), target.batch.dtype)
        return state, empty, NegativeInfo(nan, nan, nan, {})
