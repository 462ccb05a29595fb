"""``fit``: train one energy on data, on top of the training core and loop; ``load`` a run.

``fit(energy, data, key=key)`` trains with the defaults; ``config=TrainConfig(...)`` and
keyword overrides of any of its fields change them. One energy on data is a *problem* with a
single site (``EnergyProblem``); the core step, the loop and the checkpoints are the ones
``MaximumLikelihood`` uses too.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_ebm import logz as _logz
from numpyro_ebm import negatives as _negatives
from numpyro_ebm import samplers as _samplers
from numpyro_ebm.distribution import EnergyDistribution
from numpyro_ebm.logz.ais import check_convergence_settings
from numpyro_ebm.training import checkpoint, core, loop, selection
from numpyro_ebm.training.config import TrainConfig
from numpyro_ebm.training.inputs import (
    chain_sharding,
    check_spread,
    checked_augment,
    checked_inputs,
    config_from_meta,
    placed,
    schedule_steps,
)

__all__ = ["EnergyProblem", "FitResult", "energy_init", "energy_step", "fit", "load"]

SITE = "x"  # the one site of an energy fitted to data


@dataclass(frozen=True)
class EnergyProblem:
    """One energy trained on data: a single site, batches drawn with replacement.

    ``data`` is the ``(N, *event_shape)`` array, or ``(points, conditions)`` for a conditional
    energy ``E(x, c)``; ``augment(key, points)`` (hashable, jittable), when given, is applied
    to every batch's points (``fit``'s ``augment``)."""

    batch_size: int
    conditional: bool = False
    augment: Callable | None = None
    prefix_sites: ClassVar[bool] = False  # the history names the site's metrics plainly

    def batch(self, key, data):
        if self.augment is not None:  # without it, the key is used as before (same runs)
            key, k_augment = jax.random.split(key)
        points = data[0] if self.conditional else data
        rows = jax.random.randint(key, (self.batch_size,), 0, points.shape[0])
        batch = jax.tree.map(lambda a: a[rows], data)
        if self.augment is None:
            return batch
        if self.conditional:
            return (self.augment(k_augment, batch[0]), batch[1])
        return self.augment(k_augment, batch)

    def _split(self, batch):
        return batch if self.conditional else (batch, None)

    def sites(self, params, key, batch) -> dict:
        points, conditions = self._split(batch)
        return {SITE: core.Site(params, points, conditions)}

    def loss(self, params, key, batch, objective, negatives):
        points, conditions = self._split(batch)
        terms = objective.terms(
            params, points, negatives[SITE], conditions, key=core.objective_key(key)
        )
        return jnp.mean(terms.per_event), {SITE: core.SiteTerms(terms, 1.0)}

    def heldout_nll(self, state, validation):
        """``mean E(validation) + log Z`` of the averaged energy (``core.log_z_of``: tracked
        when there is a tracker, else noise-contrastive)."""
        points, conditions = self._split(validation)
        energy = state.average_params
        args = (points,) if conditions is None else (points, conditions)
        return jnp.mean(jax.vmap(energy)(*args)) + core.log_z_of(state, SITE)[0]


def _check_resolved(config: TrainConfig) -> None:
    if isinstance(config.negatives, str) or config.optimizer is None:
        raise ValueError(
            "pass a resolved config: config.resolve(schedule_steps) turns the names of the "
            "negatives, the objective and the default optimizers into objects"
        )


def energy_init(key: jax.Array, energy, data, config: TrainConfig) -> core.TrainState:
    """``core.init`` for one energy on ``data`` (``(N, *event_shape)``, or ``(points,
    conditions)``): the pure, jittable pair under ``fit``, for hand-written loops.

    Example:
        >>> import jax, optax, numpyro_ebm as ebm
        >>> data = ebm.datasets.toy("8gaussians").sample(jax.random.key(0), 1000)
        >>> energy = ebm.energies.MLPEnergy(2, hidden=(16,), key=jax.random.key(1))
        >>> config = ebm.TrainConfig(num_chains=64, batch_size=64).resolve(schedule_steps=10)
        >>> state = ebm.training.energy_init(jax.random.key(2), energy, data, config)
        >>> state, info = ebm.training.energy_step(jax.random.key(3), state, data[:64], config)
        >>> int(state.step)
        1
    """
    _check_resolved(config)
    problem = EnergyProblem(config.batch_size, isinstance(data, tuple))
    return core.init(key, energy, data, problem, config)


def energy_step(key: jax.Array, state: core.TrainState, batch, config: TrainConfig):
    """``core.step`` for one energy: ``(new_state, StepInfo)`` after one update on ``batch``
    (``(B, *event_shape)``, or ``(points, conditions)``). Jit it with ``eqx.filter_jit``."""
    _check_resolved(config)
    problem = EnergyProblem(config.batch_size, isinstance(batch, tuple))
    return core.step(key, state, batch, problem, config)


@dataclass
class FitResult:
    """What ``fit`` (and ``load``) returns.

    Attributes:
        energy: the trained energy (parameter average if ``ema_decay`` is set); with
            validation data, the one with the lowest held-out NLL (``best_step``) unless
            ``select_best=False``.
        last_energy: the last iterate's energy.
        chains: the negative sampler's final samples or bank ``(rows, *event_shape)``
            (None for a sampler whose state keeps none).
        history: dict of ``(num_attempts,)`` numpy arrays, one per metric.
        state: the final ``TrainState`` (for resuming or inspection).
        config: the resolved ``TrainConfig`` used.
        event_shape: shape of one event.
        log_z: ``LogZEstimate`` of the energy's ``log Z`` tracked through training
            (``logz.tracking``, method ``"tracked"``, with its standard error; ``info["nce"]``
            is the noise-contrastive value learned beside it; for a selected best energy, the
            value tracked at ``best_step``, ``info["step"]``). NaN with ``stderr`` inf when the
            tracker lost the track at the end (``diagnose`` says so; use
            ``calibrate_log_z=True``). With ``track_log_z=False``, the noise-contrastive value
            (``"nce-learned"``, no error bar, reliable in low dimension only). None for a
            conditional energy.
        log_z_ais: AIS recalibration at the end (``fit(..., calibrate_log_z=True)``) or None.
        generator: the trained ``numpyro_ebm.generator.Generator`` (generator negatives)
            or None: ``generator(key, n)`` draws ``(n, *event_shape)`` fast samples.
        recorded_chains: ``samplers.Draws`` (numpy) of the recorded negative-phase chains,
            one draw every ``record_every`` training steps (``Draws.step``), or None. For
            persistent negatives each is one chain followed through training; for the other
            kinds a "chain" is a slot of the negative batch. See ``numpyro_ebm.diagnostics``.
        best_step: the step of the selected energy (validation data and ``select_best``),
            else None. ``state.step`` is where training stopped (``patience``).
    """

    energy: Any
    last_energy: Any
    chains: jax.Array | None
    history: dict
    state: core.TrainState
    config: TrainConfig
    event_shape: tuple[int, ...]
    log_z: Any = None
    log_z_ais: Any = None
    generator: Any = None
    recorded_chains: _samplers.Draws | None = None
    best_step: int | None = None

    def distribution(self, log_z=None) -> EnergyDistribution:
        """``EnergyDistribution`` with the trained energy and ``log_z`` (default: the AIS
        recalibration if it was run, else the tracked ``log_z``, NaN if the tracker lost the
        track: then ``log_prob`` is NaN rather than wrongly normalised, and sampling is
        unaffected); its chains start at the generator's samples when there is a generator."""
        if log_z is None:
            best = self.log_z_ais if self.log_z_ais is not None else self.log_z
            log_z = None if best is None else getattr(best, "value", best)
        return EnergyDistribution(
            self.energy,
            self.event_shape,
            log_z=log_z,
            sampler=getattr(self.config.negatives, "sampler", self.config.sampler),
            initializer=self.generator,
        )


@checkpoint.one_writer
def fit(
    energy,
    data,
    *,
    key: jax.Array,
    config: TrainConfig | None = None,
    num_steps: int = 2000,
    condition=None,
    validation_data=None,
    generator=None,
    steps_per_call: int = 100,
    max_nonfinite: int = 10,
    progress_bar: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    devices: list | None = None,
    calibrate_log_z: bool | Mapping[str, Any] = False,
    select_best: bool = True,
    patience: int | None = None,
    augment: Callable | None = None,
    **settings,
) -> FitResult:
    """Train ``energy`` on ``data`` by maximum likelihood: a ``FitResult`` (training guide).

    Args:
        energy: callable pytree, one event -> scalar (``E(x, c)`` with ``condition``): an
            ``eqx.Module`` or ``jax.tree_util.Partial(fn, params)``. Its floating-point array
            leaves are trained; every other leaf is static.
        data: ``(num_points, *event_shape)`` finite floats, 2+ distinct rows, trained in at
            least JAX's default float dtype (float16 as float32; float32 as float64 under x64);
            of unit scale (else a ``validation.DataScaleWarning``: standardize first).
        key: PRNG key (the init, loop and AIS keys are split from it; step t folds in t).
        config: a ``TrainConfig`` (default: ``TrainConfig()``); ``**settings`` override its
            fields by name, e.g. ``negatives="hybrid"``, ``num_chains=256``,
            ``sampler="hmc"``, ``learning_rate=1e-3`` (an unknown name is a ``TypeError``).
        num_steps: accepted parameter updates (a larger one extends a checkpointed run; the
            default optimizers keep the schedule of the ``num_steps`` it started with).
        condition: ``(num_points, condition_size)``: the energy is ``E(x, c)``, trained by
            contrastive divergence unless ``negatives`` handles conditions.
        validation_data: held-out data (``(points, conditions)`` with ``condition``):
            ``history["heldout_nll"]`` every ``record_every`` steps (learned ``log Z``).
        generator: the generator modes' starting ``Generator`` (default: ``default_generator``).
        steps_per_call: as for ``loop.train``, and so are ``max_nonfinite`` and ``progress_bar``.
        checkpoint_dir: checkpoint folder (locked during the run): one of the same settings
            there is resumed on the same trajectory.
        checkpoint_every: steps between checkpoints (default: every ``steps_per_call``).
        devices: devices to spread the chains and the batch over (default all).
        calibrate_log_z: also estimate ``log Z`` by AIS after training (``log_z_ais``; not with
            ``condition``): True for ``logz.ais``, a mapping of ``logz.ais_convergence`` settings.
        select_best: with ``validation_data``, return the averaged energy of the lowest
            held-out NLL (``training.selection``), not the last.
        patience: stop once that has not improved for this many steps (checked every call).
        augment: a hashable function ``(key, points) -> points`` applied to every training
            batch in the compiled step (``tables.TableTransform.redequantizer``: new
            dequantization noise); checkpoints record its name. See docs/guides/training.md.

    Raises:
        ValueError: bad data or settings (before any compute), or a checkpoint of other
            settings (each one named) or beyond ``num_steps``.
        TrainingDivergedError: ``max_nonfinite`` non-finite steps in a row (the last good
            state is also checkpointed, marked diverged).
        CheckpointError: a damaged or inconsistent checkpoint file (named).
        FolderLockedError: another process is writing to ``checkpoint_dir``.

    Example:
        >>> import jax, numpyro_ebm as ebm
        >>> data = ebm.datasets.toy("8gaussians").sample(jax.random.key(0), 5000)
        >>> energy = ebm.energies.MLPEnergy(2, key=jax.random.key(1))
        >>> res = ebm.fit(energy, data, key=jax.random.key(2), num_steps=200)  # doctest: +SKIP
    """
    _checked_calibration(calibrate_log_z, condition)
    config = (config or TrainConfig()).replace(**settings)
    counts = (num_steps, steps_per_call, max_nonfinite, checkpoint_every)
    inputs, validation, event_shape = checked_inputs(
        energy, data, condition, validation_data, *counts
    )
    given, config, stored, schedule, sharding = _resolved(
        config, num_steps, checkpoint_dir, devices, generator, math.prod(event_shape)
    )
    select_best = _checked_selection(select_best, patience, validation, config, stored)
    augment = checked_augment(augment, inputs)
    check_spread(inputs)
    problem = EnergyProblem(config.batch_size, condition is not None, augment)
    k_init, k_loop, k_ais = jax.random.split(key, 3)
    state = checkpoint.init_or_shapes(core.init, stored)(k_init, energy, inputs, problem, config)
    state = state._replace(best=selection.start(state) if select_best else None)
    meta = run_meta(given, config, schedule, num_steps, inputs, select_best, augment)
    state, history, recorded = checkpoint.resume(checkpoint_dir, state, meta, stored)
    state, inputs, validation = placed(state, inputs, validation, sharding)
    options = {"num_steps": num_steps, "steps_per_call": steps_per_call, "patience": patience}
    options |= {"max_nonfinite": max_nonfinite, "progress_bar": progress_bar}
    options |= {"checkpoint_every": checkpoint_every, "sharding": sharding}
    options |= {"history": history, "recorded": recorded, "validation": validation}
    save = checkpoint.saver(checkpoint_dir, meta)
    state, history, recorded = loop.train(
        state, key=k_loop, data=inputs, problem=problem, config=config, save=save, **options
    )
    result = fit_result(state, history, recorded, config, event_shape, condition is not None)
    result.log_z_ais = _calibration(result.energy, event_shape, k_ais, inputs, calibrate_log_z)
    return result


def _calibration(energy, event_shape, key, data, calibrate_log_z) -> _logz.LogZEstimate | None:
    """``fit``'s AIS after training: None (``calibrate_log_z=False``), ``logz.ais`` (True), or
    ``logz.ais_convergence`` with the settings of a ``calibrate_log_z`` mapping."""
    if calibrate_log_z is False:
        return None
    if isinstance(calibrate_log_z, Mapping):
        return _logz.ais_convergence(energy, event_shape, key=key, data=data, **calibrate_log_z)
    return _logz.ais(energy, event_shape, key=key, data=data)


def _checked_calibration(calibrate_log_z, condition=None) -> None:
    """``ValueError``/``TypeError`` for a ``calibrate_log_z`` that would fail after training."""
    mapping = isinstance(calibrate_log_z, Mapping)
    if not (mapping or isinstance(calibrate_log_z, bool)):
        raise TypeError(f"calibrate_log_z must be a bool or a mapping, got {calibrate_log_z!r}")
    if calibrate_log_z is not False and condition is not None:
        raise ValueError(
            "calibrate_log_z needs an unconditional energy: the log Z of a conditional energy "
            "depends on the condition; leave calibrate_log_z out with condition="
        )
    if not mapping:
        return
    own = {"energy", "event_shape", "key", "data", "adaptive"}
    allowed = (set(inspect.signature(_logz.ais).parameters) | {"num_temperatures", "factor"}) - own
    unknown = sorted(set(calibrate_log_z) - allowed)
    if unknown:
        raise TypeError(
            f"calibrate_log_z: unknown keyword(s) {unknown} of logz.ais_convergence "
            f"(allowed: {sorted(allowed)})"
        )
    defaults = inspect.signature(_logz.ais_convergence).parameters  # not written twice
    lengths = (calibrate_log_z.get(n, defaults[n].default) for n in ("num_temperatures", "factor"))
    try:
        check_convergence_settings(*lengths)
    except ValueError as err:
        raise ValueError(f"calibrate_log_z: {err}") from None


def _resolved(config: TrainConfig, num_steps: int, checkpoint_dir, devices, generator, size):
    """``(given, resolved, stored meta, schedule length, sharding)`` of a run on data of
    ``size`` dimensions. The devices must divide the chains of the negative sampler that
    runs (a configured one's own ``num_chains``; contrastive divergence's are the batch's)."""
    stored = None if checkpoint_dir is None else checkpoint.stored_meta(checkpoint_dir)
    schedule = schedule_steps(stored, num_steps, checkpoint_dir)
    resolved = config.resolve(schedule, generator, event_size=size)
    negatives = resolved.negatives
    num_chains = getattr(negatives, "num_chains", config.batch_size)
    if isinstance(negatives, _negatives.ContrastiveDivergence):
        num_chains = config.batch_size
    sharding = chain_sharding(devices, num_chains, config.batch_size)
    given = config.replace(sharding=sharding)
    return given, resolved.replace(sharding=sharding), stored, schedule, sharding


def _checked_selection(select_best: bool, patience, validation, config, stored) -> bool:
    """Whether the run selects its best energy (``ValueError`` for a bad ``patience``). A run
    checkpointed before selection existed (``stored`` meta without it) resumes without it."""
    record_every = config.record_every
    select_best = select_best and validation is not None
    select_best = select_best and (stored is None or "select_best" in stored)
    if patience is None:
        return select_best
    if not select_best:
        raise ValueError("patience needs validation_data (and select_best=True)")
    if not (isinstance(patience, int) and not isinstance(patience, bool)) or patience < 1:
        raise ValueError(f"patience must be a whole number of steps >= 1, got {patience!r}")
    if patience < record_every:
        raise ValueError(
            f"patience ({patience}) must be at least record_every ({record_every}): the "
            "held-out NLL is scored every record_every steps"
        )
    return select_best


def run_meta(
    config: TrainConfig,
    resolved: TrainConfig,
    schedule: int,
    num_steps: int,
    inputs,
    select_best: bool = False,
    augment: Callable | None = None,
):
    """The settings a checkpoint records (and a resumed run must match): ``config`` as given,
    ``resolved`` as run; ``select_best``: the state keeps a ``selection.BestState``;
    ``augment``: by its name."""
    points, conditions = inputs if isinstance(inputs, tuple) else (inputs, None)
    default_generator_optimizer = config.uses_generator and config.generator_optimizer is None
    return {
        "schedule_steps": schedule,
        "num_steps": num_steps,
        "config": resolved.describe(),
        "defaults": resolved.describe_defaults(),
        "event_shape": list(points.shape[1:]),
        "select_best": select_best,
        "augment": None if augment is None else _name(augment),
        "conditional": conditions is not None,
        "condition_shape": None if conditions is None else list(conditions.shape[1:]),
        # a custom optimizer is not comparable; the default ones are, by their learning rates
        "learning_rates": [
            config.learning_rate if config.optimizer is None else None,
            config.generator_learning_rate if default_generator_optimizer else None,
        ],
    }


def _name(function) -> str:
    name = getattr(function, "__qualname__", None) or type(function).__qualname__
    return f"{getattr(function, '__module__', None) or ''}.{name}".lstrip(".")


def fit_result(state, history, recorded, config, event_shape, conditional) -> FitResult:
    """The ``FitResult`` of a final (or loaded) state."""
    negatives = state.negatives[SITE]
    bank = getattr(negatives, "bank", None)  # a sampler may keep no samples in its state
    tempering = None
    if isinstance(negatives, _negatives.TemperingState) and not conditional:
        bank, tempering = negatives.replicas.position[:, 0], _negatives.tempering_summary(negatives)
    learned = None if conditional else core.learned_log_z(state, SITE)
    energy, best_step = state.average_params, None
    if state.best is not None and int(state.best.step) >= 0:
        energy, best_step = state.best.params, int(state.best.step)
        learned = None if conditional else _best_log_z(state.best, learned, history)
    return FitResult(
        energy=energy,
        last_energy=state.params,
        chains=None if bank is None else jnp.reshape(bank, (-1, *event_shape)),
        history=history,
        state=state,
        config=config,
        event_shape=tuple(event_shape),
        log_z=learned,
        generator=getattr(negatives, "generator", None),
        recorded_chains=loop.records_to_draws(recorded.get(SITE, {}), event_shape, tempering),
        best_step=best_step,
    )


def _best_log_z(best: selection.BestState, last, history: dict):
    """The ``LogZEstimate`` of the selected energy: ``log Z`` as tracked (or learned) at its
    step (``info["raised"]``: what the tracker's floor had added to it, from ``history``);
    ``last`` is the final state's (for the method's name)."""
    value, stderr = (float(v) for v in best.log_z[SITE])
    info = {"step": int(best.step)}
    if last.method != "tracked":
        stderr = float("nan")
    elif "log_z_raised" in history and (row := loop.step_row(history, info["step"])) is not None:
        info["raised"] = float(history["log_z_raised"][row])
    return type(last)(value, stderr, last.method, None, info)


def load(folder: str | os.PathLike, energy=None, *, config=None, generator=None) -> FitResult:
    """The ``FitResult`` of a finished or interrupted run, from its latest checkpoint.

    Args:
        folder: a ``fit(checkpoint_dir=...)`` folder, or a finished ``numpyro-ebm train``
            run folder (which records how to rebuild its energy: ``energy`` is then not
            needed; an interrupted one is finished by rerunning its train command).
        energy: an energy of the same architecture as the trained one (its values are
            replaced by the checkpoint's), e.g. ``MLPEnergy(2, key=jax.random.key(0))``.
        config: the run's ``TrainConfig``; needed only when the run used a custom optimizer
            (else it is rebuilt from the checkpoint's settings).
        generator: a ``Generator`` of the trained one's architecture (generator modes with
            a custom generator).

    Raises:
        FileNotFoundError: no checkpoint in ``folder``.
        CheckpointError: a damaged file, or a checkpoint of another format.
    """
    folder = os.fspath(folder)
    if energy is None and os.path.isfile(os.path.join(folder, "run.json")):
        from numpyro_ebm.cli.commands import fit_result as run_result  # knows its energy

        return run_result(folder)
    meta = checkpoint.stored_meta(folder)
    if meta is None:
        raise FileNotFoundError(f"{folder} holds no checkpoint")
    if energy is None:
        raise ValueError(
            "load needs energy=: a freshly built energy of the trained one's architecture"
        )
    event_shape = tuple(meta["event_shape"])
    config = config_from_meta(meta) if config is None else config
    config = config.resolve(meta["schedule_steps"], generator, event_size=math.prod(event_shape))
    problem = EnergyProblem(config.batch_size, bool(meta.get("conditional", False)))
    stand_in = _stand_in_data(event_shape, problem.conditional, meta)
    like = checkpoint.shapes_of(core.init)(jax.random.key(0), energy, stand_in, problem, config)
    if meta.get("select_best", False):
        like = like._replace(best=selection.start(like))
    state, history, recorded = checkpoint.resume(folder, like, None, meta)
    return fit_result(state, history, recorded, config, event_shape, problem.conditional)


def _stand_in_data(event_shape, conditional: bool, meta: dict):
    """Data of the right shapes to build a state the checkpoint's values are read into."""
    size = int(np.prod(event_shape))
    points = jax.random.normal(jax.random.key(0), (size + 2, *event_shape))
    if not conditional:
        return points
    return points, jnp.zeros((size + 2, *meta["condition_shape"]))
