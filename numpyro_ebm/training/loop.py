"""The one training loop: ``lax.scan`` over steps, progress, divergence and checkpoints.

``run_steps`` runs ``length`` steps of ``core.step`` in one compiled call (the state's buffers
donated); ``train`` calls it until ``num_steps`` accepted steps are done, with one host
round-trip per call: it collects the history and the recorded chains, shows a tqdm bar, warns
about rejected steps, stops with ``TrainingDivergedError`` after ``max_nonfinite`` rejected
steps in a row, and hands the state to ``save`` (a checkpoint writer) as it goes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from numpyro_ebm import samplers as _samplers
from numpyro_ebm.training import core, keys, selection

__all__ = [
    "DIVERGED_ADVICE",
    "TrainingDivergedError",
    "history_columns",
    "host_readable",
    "records_to_draws",
    "run_steps",
    "step_row",
    "train",
]

DIVERGED_ADVICE = (
    "Rerunning with the same settings diverges again: lower learning_rate or the sampler's "
    "step_size, or raise energy_l2, and train into a new checkpoint_dir."
)


class TrainingDivergedError(RuntimeError):
    """Training produced non-finite values too many steps in a row.

    Attributes:
        state: the last good ``TrainState`` (rejected steps never modify it).
        history: metrics up to the failure.
    """

    def __init__(self, message: str, state, history: dict):
        super().__init__(message)
        self.state = state
        self.history = history


def _run_steps(key, state, data, validation, problem, config, num_steps_total, length):
    """``length`` steps in one ``lax.scan``; steps at index >= ``num_steps_total`` are no-ops.

    Returns ``(state, (infos, active))``: ``infos`` stacks the ``StepInfo`` of every step and
    ``active`` says which steps ran."""
    # lax.scan carries arrays only: the non-array leaves (e.g. an eqx.nn.MLP's activation)
    # stay outside the carry, as in equinox's filtered transformations
    carry, static = eqx.partition(state, eqx.is_array)

    def body(carry, _):
        state = eqx.combine(carry, static)
        step_key = keys.attempt_key(key, state.step, state.consecutive_nonfinite)
        k_batch, k_step = jax.random.split(step_key)
        new_state, info = core.step(k_step, state, problem.batch(k_batch, data), problem, config)
        if validation is not None:
            # cond's operands must be arrays: an energy's functions (activations) stay out
            arrays, fields = eqx.partition(new_state, eqx.is_array)
            nll = jax.lax.cond(
                info.is_finite & (new_state.step % config.record_every == 0),
                lambda a: problem.heldout_nll(eqx.combine(a, fields), validation),
                lambda a: jnp.full((), jnp.nan, jnp.float32),
                arrays,
            )
            info = info._replace(heldout_nll=nll)
            if new_state.best is not None:
                log_z = {name: core.log_z_of(new_state, name) for name in new_state.log_z}
                best = selection.update(new_state.best, new_state, nll, log_z)
                new_state = new_state._replace(best=best)
        active = state.step < num_steps_total
        new_state = core.select(active, new_state, state)
        return eqx.filter(new_state, eqx.is_array), (info, active)

    carry, outputs = jax.lax.scan(body, carry, None, length=length)
    return eqx.combine(carry, static), outputs


def _run_steps_donated(inputs, state, problem, config, length):
    """``_run_steps`` with the state's buffers donated: XLA writes the new state into them, so
    chains, parameters and optimizer state are not held twice. ``inputs = (key, data,
    validation, num_steps_total)`` comes first and is never donated (the step count is an
    array: a run of another length reuses the compiled call)."""
    key, data, validation, num_steps_total = inputs
    return _run_steps(key, state, data, validation, problem, config, num_steps_total, length)


run_steps = eqx.filter_jit(_run_steps_donated, donate="all-except-first")


def own_buffers(state):
    """A copy of ``state`` whose array leaves share no buffer with each other or with the
    caller's objects (``init`` puts the user's energy in two fields): donation needs that."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, state)


def host_readable(state, sharding):
    """``state`` with every array whole on every process (multi-host runs shard the chains
    over processes; checkpoints and the returned result need them all). Collective: every
    process must call it."""
    if sharding is None or jax.process_count() == 1:
        return state
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    arrays, static = eqx.partition(state, eqx.is_array)
    arrays = jax.jit(lambda s: s, out_shardings=replicated)(arrays)
    return eqx.combine(arrays, static)


def step_row(history, step: int) -> int | None:
    """The history row of training step ``step`` (1-based): rejected attempts have rows too,
    so it is the ``step``-th accepted row (None when the history has no such step)."""
    if "is_finite" not in history:
        return step - 1 if 0 < step <= len(history.get("loss", ())) else None
    rows = np.flatnonzero(np.asarray(history["is_finite"], bool))
    return int(rows[step - 1]) if 0 < step <= rows.size else None


def history_columns(info: core.StepInfo, prefix_sites: bool) -> dict:
    """``StepInfo`` (stacked over steps) -> history columns: ``loss``, ``grad_norm``,
    ``is_finite``, ``heldout_nll`` and each site's metrics (named ``"<site>.<metric>"`` when
    ``prefix_sites``, else by the metric's name)."""
    out = {
        "loss": info.loss,
        "grad_norm": info.grad_norm,
        "is_finite": info.is_finite,
        "heldout_nll": info.heldout_nll,
    }
    for name, site in info.sites.items():
        prefix = f"{name}." if prefix_sites else ""
        columns = {
            "acceptance_rate": site.acceptance_rate,
            "step_size": site.step_size,
            "langevin_grad_norm": site.langevin_grad_norm,
            "log_z": site.log_z,
            **site.metrics,
        }
        out.update({prefix + k: v for k, v in columns.items()})
    return out


def _append_records(recorded: dict, record, active, accepted, start_step: int, record_every):
    """Add one call's records of the accepted steps that are multiples of ``record_every``."""
    steps = start_step + np.cumsum(accepted)  # the step count after each active attempt
    keep = accepted & (steps % record_every == 0)
    new = {"step": steps[keep], "positions": np.asarray(record.positions)[active][keep]}
    for name in _samplers.ChainInfo._fields:
        new[name] = np.asarray(getattr(record.info, name))[active][keep]
    if not recorded:
        return new
    return {k: np.concatenate([recorded[k], new[k]]) for k in new}


def records_to_draws(recorded: dict, event_shape, tempering=None) -> _samplers.Draws | None:
    """Draw-major records -> chain-major ``samplers.Draws`` (None when nothing was kept),
    with ``tempering`` (a ``samplers.TemperingSummary``) attached."""
    if not recorded or len(recorded["step"]) == 0:
        return None
    num_draws, num_chains = recorded["positions"].shape[:2]
    positions = np.swapaxes(recorded["positions"], 0, 1).reshape(
        num_chains, num_draws, *event_shape
    )
    info = _samplers.ChainInfo(
        *(np.swapaxes(recorded[name], 0, 1) for name in _samplers.ChainInfo._fields)
    )
    return _samplers.Draws(positions, info, recorded["step"], tempering)


def _progress(bar, chunk: dict, accepted) -> None:
    if bar is None:
        return
    bar.update(int(accepted.sum()))
    postfix = {}
    for label, column, fmt in (
        ("gap", "energy_gap", ".3f"),
        ("acc", "acceptance_rate", ".2f"),
        ("h", "step_size", ".3g"),
    ):
        if column in chunk and len(chunk[column]):
            postfix[label] = format(float(chunk[column][-1]), fmt)
    bar.set_postfix(refresh=False, **postfix)


def train(
    state,
    *,
    key: jax.Array,
    data,
    problem,
    config,
    num_steps: int,
    steps_per_call: int = 100,
    max_nonfinite: int = 10,
    progress_bar: bool = True,
    history: dict | None = None,
    recorded: dict | None = None,
    validation=None,
    save: Callable | None = None,
    checkpoint_every: int | None = None,
    sharding=None,
    description: str = "fit",
    patience: int | None = None,
):
    """Run ``core.step`` until ``state.step == num_steps``, or until ``patience`` steps have
    passed since the best held-out NLL (``selection``; needs ``state.best``).

    Args:
        state: the starting ``TrainState`` (its buffers are donated: do not reuse it).
        key: the loop's PRNG key (step t's attempt key is ``keys.attempt_key(key, t, ...)``).
        data: what ``problem.batch`` draws batches from.
        problem: as for ``core.step``.
        config: as for ``core.step``.
        num_steps: the accepted step count to reach.
        steps_per_call: steps per compiled call (one host round-trip each).
        max_nonfinite: stop after this many consecutive rejected steps.
        progress_bar: show a tqdm bar.
        history: columns so far (a resumed run's); recorded: records so far, per site.
        validation: held-out data for ``problem.heldout_nll`` (or None).
        save: ``save(state, history, recorded, diverged)`` writes a checkpoint; called every
            ``checkpoint_every`` steps, at the end, and when training diverges.
        sharding: the chains' sharding (states are gathered before ``save`` and at the end).
        description: the progress bar's label.
        patience: stop early when the held-out NLL has not improved for this many steps
            (checked between compiled calls; a resumed run that had stopped stays stopped).

    Returns:
        ``(state, history, recorded)``.

    Raises:
        TrainingDivergedError: ``max_nonfinite`` consecutive non-finite steps.
    """
    history = dict(history or {})
    recorded = {name: dict(r) for name, r in (recorded or {}).items()}
    prefix_sites = problem.prefix_sites
    state = own_buffers(state)  # donated to the first compiled call
    checkpoint_every = checkpoint_every or steps_per_call
    bar = None
    if progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, initial=int(state.step), desc=description, unit="step")
    last_saved = int(state.step)
    try:
        while int(state.step) < num_steps and not selection.stopped(state, patience):
            start_step = int(state.step)
            # the precision is read when the call is traced and lowered (and keys jit's cache)
            with jax.default_matmul_precision(config.matmul_precision):
                inputs = (key, data, validation, jnp.asarray(num_steps, jnp.int32))
                state, (infos, active) = run_steps(inputs, state, problem, config, steps_per_call)
            chunk, accepted = _absorb(
                history, recorded, infos, np.asarray(active), start_step, prefix_sites, config
            )
            _progress(bar, chunk, accepted)
            _warn_rejected(int(np.sum(~accepted)), start_step)
            if int(state.consecutive_nonfinite) >= max_nonfinite:
                state = host_readable(state, sharding)
                if save is not None:
                    save(state, history, recorded, True)
                raise TrainingDivergedError(
                    f"training diverged: {int(state.consecutive_nonfinite)} consecutive "
                    f"non-finite steps after step {int(state.step)}, the last accepted one (its "
                    f"parameters are in error.state). {DIVERGED_ADVICE}",
                    state,
                    history,
                )
            step_now = int(state.step)
            if save is not None and (
                step_now - last_saved >= checkpoint_every or step_now >= num_steps
            ):
                save(host_readable(state, sharding), history, recorded, False)
                last_saved = step_now
        if save is not None and int(state.step) != last_saved:  # stopped early
            save(host_readable(state, sharding), history, recorded, False)
    finally:
        if bar is not None:
            bar.close()
    return host_readable(state, sharding), history, recorded


def _absorb(history, recorded, infos, active, start_step, prefix_sites, config):
    """Add one call's history rows and records to ``history`` and ``recorded`` (in place);
    returns ``(the call's rows, which attempts were accepted)``."""
    chunk = {k: np.asarray(v)[active] for k, v in history_columns(infos, prefix_sites).items()}
    rows = len(history["loss"]) if "loss" in history else 0
    for k in chunk:
        # a column new since the run's checkpoint was written: NaN for the rows before it
        before = history[k] if k in history else np.full(rows, np.nan)
        history[k] = np.concatenate([before, chunk[k]])
    accepted = chunk["is_finite"].astype(bool)
    for name, site in infos.sites.items():
        if site.recorded is not None:
            recorded[name] = _append_records(
                recorded.get(name, {}), site.recorded, active, accepted, start_step,
                config.record_every,
            )  # fmt: skip
    return chunk, accepted


def _warn_rejected(num_bad: int, start_step: int) -> None:
    if num_bad:
        warnings.warn(
            f"{num_bad} non-finite training step(s) after step {start_step} were rejected "
            "(parameters kept, the step retried with a new key); lower the learning rate or "
            "step size, or raise energy_l2",
            RuntimeWarning,
            stacklevel=5,  # the caller of fit / MaximumLikelihood.run (through one_writer)
        )
