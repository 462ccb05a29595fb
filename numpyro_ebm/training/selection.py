"""Best-model selection and early stopping on a validation split's held-out NLL.

With validation data, every ``record_every`` steps the loop scores the averaged energy by
``mean E(validation) + log Z`` (``log Z`` tracked, see ``logz.tracking``). ``BestState`` keeps
the averaged parameters at the lowest score so far, inside the compiled step (so a
checkpoint holds them and a resumed run selects exactly as an uninterrupted one). Training
stops early when the score has not improved for ``patience`` steps.

The score uses the tracked ``log Z``, whose error is of the order of its standard error: the
minimum over many evaluations favours evaluations whose ``log Z`` came out low, so the
selected model's own ``log Z`` (``FitResult.log_z``) can be optimistic by about one standard
error. ``fit(..., calibrate_log_z=True)`` re-estimates it by AIS for the selected model.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from numpyro_ebm.training import core

__all__ = ["BestState", "over", "start", "stopped", "update"]

NOTHING_YET = float(jnp.finfo(jnp.float32).max)  # finite: the step rejects non-finite states


class BestState(NamedTuple):
    """The averaged parameters at the lowest held-out NLL so far.

    Attributes:
        params: the averaged parameters at ``step`` (the structure of ``average_params``).
        heldout_nll: their held-out NLL (float32 max before the first evaluation).
        step: the step at which they were scored (−1 before the first evaluation).
        log_z: per site, ``(log Z, standard error)`` at that step (``core.log_z_of``).
    """

    params: Any
    heldout_nll: jax.Array
    step: jax.Array
    log_z: dict


def start(state) -> BestState:
    """The ``BestState`` of a fresh run (nothing scored yet)."""
    zero = jnp.zeros((), jnp.float32)
    return BestState(
        params=state.average_params,
        heldout_nll=jnp.full((), NOTHING_YET, jnp.float32),
        step=jnp.full((), -1, jnp.int32),
        log_z={name: (zero, zero) for name in state.log_z},
    )


def update(best: BestState, state, heldout_nll: jax.Array, log_z: dict) -> BestState:
    """``best``, or ``state``'s averaged parameters if ``heldout_nll`` is lower (a score that
    is not finite, NaN between evaluations or with a lost ``log Z``, −inf from a normaliser
    that is not finite, never is). ``log_z``: per site,
    ``(value, standard error)`` of ``state``; non-finite ones are stored as 0 (the state must
    stay finite) and are then never selected, their score being NaN."""
    better = jnp.isfinite(heldout_nll) & (heldout_nll < best.heldout_nll)
    log_z = jax.tree.map(lambda v: jnp.where(jnp.isfinite(v), v, 0.0), log_z)
    candidate = BestState(state.average_params, heldout_nll, state.step, log_z)
    return core.select(better, candidate, best)  # keeps non-array leaves (activations)


def stopped(state, patience: int | None) -> bool:
    """Whether a run with ``patience`` is over: ``patience`` steps since its best score (host
    side, between compiled calls)."""
    best = getattr(state, "best", None)
    return best is not None and over(int(state.step), int(best.step), patience)


def over(step: int, best_step: int | None, patience: int | None) -> bool:
    """The early-stopping rule: ``patience`` steps past the best score's step (``best_step``
    None or negative: nothing scored yet; ``patience`` None: never stop early)."""
    if patience is None or best_step is None or best_step < 0:
        return False
    return step - best_step >= patience
