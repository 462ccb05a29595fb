"""The objective interface: the loss of the energy given a data batch and the negatives.

An objective turns ``(energy, batch, negatives)`` into per-event losses whose mean is
minimised, and the *penalty* that ``energy_l2`` weighs (a stabiliser of the energies' scale;
see ``training.TrainConfig``). The training core differentiates it
and never branches on which objective it is, so a new one (score matching, say) is one more
frozen dataclass with ``name``, ``needs_negatives`` and ``terms``:

    terms = objective.terms(energy, batch, negatives, conditions)

Maximum likelihood (``"ml"``) is the one today.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["LikelihoodObjective", "Objective", "ObjectiveTerms", "build_objective"]


class ObjectiveTerms(NamedTuple):
    """What an objective gives for one batch.

    Attributes:
        per_event: ``(B,)`` loss of each data event; the objective is their mean (in a NumPyro
            model each event's term is weighted by its plate scale and mask).
        penalty: the scalar that ``energy_l2`` weighs.
        metrics: scalar metrics by name (history columns).
    """

    per_event: jax.Array
    penalty: jax.Array
    metrics: dict


class Objective:
    """Base class of the objectives (subclass as a frozen dataclass; see the module doc)."""

    name: ClassVar[str] = ""
    needs_negatives: ClassVar[bool] = True

    def terms(
        self, energy: Callable, batch: jax.Array, negatives: jax.Array | None, conditions: Any
    ) -> ObjectiveTerms:
        """``energy``: one event (and its condition) -> scalar; ``batch`` ``(B, *event)``;
        ``negatives`` ``(n, *event)`` (None when not ``needs_negatives``); ``conditions``
        ``(B, ...)`` or None."""
        raise NotImplementedError


def _energies(energy: Callable, x: jax.Array, conditions) -> jax.Array:
    if conditions is None:
        return jax.vmap(energy)(x)
    return jax.vmap(energy)(x, conditions)


@dataclass(frozen=True)
class LikelihoodObjective(Objective):
    """Maximum likelihood: per event ``E(x_i) − mean_j E(x̃_j)`` with the negatives ``x̃``
    held fixed (no gradient flows into them).

    With negatives drawn from the model, the gradient of the mean is an unbiased estimate of
    the NLL gradient ``E_data[∇E] − E_model[∇E]`` (its VALUE is not the NLL: ``−mean E(x̃)``
    stands in for ``log Z``). For a conditional energy, negative ``j`` is paired with event
    ``j``'s condition. The penalty is ``mean E(data)² + mean E(neg)²``.
    """

    name = "ml"

    def terms(self, energy, batch, negatives, conditions=None) -> ObjectiveTerms:
        e_data = _energies(energy, batch, conditions)
        e_neg = _energies(energy, jax.lax.stop_gradient(negatives), conditions)
        mean_data, mean_neg = jnp.mean(e_data), jnp.mean(e_neg)
        metrics = {
            "energy_gap": mean_data - mean_neg,
            "energy_data": mean_data,
            "energy_negatives": mean_neg,
        }
        penalty = jnp.mean(e_data**2) + jnp.mean(e_neg**2)
        return ObjectiveTerms(e_data - mean_neg, penalty, metrics)


OBJECTIVES = {cls.name: cls for cls in (LikelihoodObjective,)}


def build_objective(objective: str | Objective) -> Objective:
    """``"ml"`` (or an ``Objective``) -> the objective object."""
    if isinstance(objective, Objective):
        return objective
    if not isinstance(objective, str) or objective not in OBJECTIVES:
        raise ValueError(
            f"unknown objective {objective!r}; choose one of {tuple(OBJECTIVES)} or pass a "
            "numpyro_ebm.training.Objective"
        )
    return OBJECTIVES[objective]()
