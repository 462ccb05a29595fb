"""What ``fit`` checks and prepares before training: data, settings, devices, the schedule."""

from __future__ import annotations

import equinox as eqx
import jax
import numpy as np

from numpyro_ebm import generator as _generator
from numpyro_ebm import samplers as _samplers
from numpyro_ebm.distribution import check_energy
from numpyro_ebm.samplers.kernels import chain_dtype
from numpyro_ebm.training import checkpoint
from numpyro_ebm.training.config import TrainConfig
from numpyro_ebm.training.objective import objective_from_description
from numpyro_ebm.validation import check_count, validate_data, warn_if_not_unit_scale
from numpyro_ebm.validation import check_spread as _check_spread

__all__ = [
    "chain_sharding",
    "check_spread",
    "check_trainable",
    "checked_augment",
    "checked_inputs",
    "config_from_meta",
    "placed",
    "schedule_steps",
]


def check_trainable(energy) -> None:
    """Training updates the energy's floating-point array leaves (everything else, e.g. an
    activation function or a Python number, is static, as in ``eqx.partition(energy,
    eqx.is_inexact_array)``): an energy without any has nothing to train."""
    if not jax.tree_util.tree_leaves(eqx.filter(energy, eqx.is_inexact_array)):
        raise ValueError(
            f"energy {type(energy).__name__} has no floating-point array leaves, so training has "
            "no parameters to fit. Pass the parameters as a pytree next to the function: "
            "jax.tree_util.Partial(fn, params) with fn(params, x) -> scalar, or write the energy "
            "as an eqx.Module whose parameters are float arrays."
        )


def checked_inputs(
    energy,
    data,
    condition,
    validation_data,
    num_steps,
    steps_per_call,
    max_nonfinite,
    checkpoint_every=None,
):
    """Validate everything ``fit`` is given before any compute (``checkpoint_every``: None
    or a count).

    Returns ``(inputs, validation, event_shape)``: ``inputs`` is the data array, or
    ``(data, condition)`` for a conditional energy (``validation`` likewise a pair then),
    each in at least JAX's default float dtype (``_chain_float``)."""
    check_count("num_steps", num_steps)
    check_count("steps_per_call", steps_per_call)
    check_count("max_nonfinite", max_nonfinite)
    if checkpoint_every is not None:
        check_count("checkpoint_every", checkpoint_every)
    check_trainable(energy)
    data = _chain_float(validate_data(data))
    event_shape = tuple(data.shape[1:])
    condition_shape = None
    if condition is not None:
        condition = _chain_float(validate_data(condition, name="condition"))
        if condition.shape[0] != data.shape[0]:
            raise ValueError(
                f"condition has {condition.shape[0]} rows, data has {data.shape[0]}: one "
                "condition per data point"
            )
        condition_shape = tuple(condition.shape[1:])
    check_energy(energy, event_shape, condition_shape)
    validation = None
    if validation_data is not None:
        if condition is None:
            validation = validate_data(validation_data, event_shape, name="validation_data")
        else:
            if not (isinstance(validation_data, tuple | list) and len(validation_data) == 2):
                raise ValueError(
                    "with a condition, validation_data is a pair (points, conditions), got "
                    f"{type(validation_data).__name__}"
                )
            points, conditions = validation_data
            validation = (
                validate_data(points, event_shape, name="validation_data"),
                validate_data(conditions, condition_shape, name="validation conditions"),
            )
            if validation[0].shape[0] != validation[1].shape[0]:
                raise ValueError(
                    f"validation_data has {validation[0].shape[0]} points and "
                    f"{validation[1].shape[0]} conditions: one condition per point"
                )
        validation = jax.tree.map(_chain_float, validation)
    inputs = data if condition is None else (data, condition)
    return inputs, validation, event_shape


def _chain_float(array):
    """Floating data narrower than JAX's default float dtype as that dtype (float16 and
    bfloat16 as float32; float32 as float64 under ``jax_enable_x64``): the chains run in it
    (``samplers.kernels.chain_dtype``), and a bank of another dtype than its chains' would
    change dtype mid-run."""
    return array.astype(chain_dtype(array.dtype))


def check_spread(inputs, name: str = "data") -> None:
    """``validation.check_spread`` of the data (``checked_inputs``' ``inputs``), then
    ``validation.warn_if_not_unit_scale`` (not of the conditions: labels or noise levels may
    be what the energy is built for). ``fit`` checks it after every other setting (so those
    are named first)."""
    data = inputs[0] if isinstance(inputs, tuple) else inputs
    _check_spread(data, name)
    warn_if_not_unit_scale(data, name)


def checked_augment(augment, inputs):
    """``augment`` itself, once it is known to be a function that maps a batch of points
    ``(B, *event)`` and a key to points of the same shape and dtype (traced abstractly with
    ``jax.eval_shape``: nothing is computed); ``ValueError`` otherwise."""
    if augment is None:
        return None
    if not callable(augment):
        raise ValueError(f"augment must be a function (key, points) -> points, got {augment!r}")
    points = inputs[0] if isinstance(inputs, tuple) else inputs
    batch = jax.ShapeDtypeStruct((2, *points.shape[1:]), points.dtype)
    try:
        out = jax.eval_shape(augment, jax.eval_shape(lambda: jax.random.key(0)), batch)
    except Exception as err:  # any failure to trace is the user's function's, named
        raise ValueError(f"augment(key, points) fails on a batch {batch}: {err}") from err
    if getattr(out, "shape", None) != batch.shape or getattr(out, "dtype", None) != batch.dtype:
        raise ValueError(
            f"augment must return points of the batch's shape and dtype {batch.shape} "
            f"{batch.dtype}, got {out}"
        )
    return augment


def schedule_steps(stored_meta: dict | None, num_steps: int, folder) -> int:
    """The length of the default optimizers' schedules: ``num_steps`` for a new run, the
    stored one for a resumed or extended run (checked: ``num_steps`` cannot go back)."""
    if stored_meta is None:
        return num_steps
    step = stored_meta["step"]
    if step > num_steps:
        raise ValueError(
            f"{folder} holds a checkpoint at step {step}, beyond num_steps={num_steps}; pass "
            f"num_steps >= {step} to resume or extend it, or use another checkpoint_dir"
        )
    steps = stored_meta.get("schedule_steps")
    if not (isinstance(steps, int) and steps >= 1):
        raise checkpoint.CheckpointError(
            checkpoint.meta_path(folder),
            f"records no schedule length (schedule_steps {steps!r})",
        )
    return steps


def chain_sharding(devices, num_chains: int, batch_size: int):
    """``NamedSharding`` splitting a leading chain/batch axis over ``devices`` (None for one)."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) <= 1:
        return None
    n = len(devices)
    if num_chains % n or batch_size % n:
        raise ValueError(
            f"with {n} devices, num_chains ({num_chains}) and batch_size ({batch_size}) must be "
            f"multiples of {n}; or pass devices=jax.devices()[:1]"
        )
    mesh = jax.sharding.Mesh(np.array(devices), ("chains",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("chains"))


def placed(state, inputs, validation, sharding):
    """With a sharding: data and parameters replicated on every device, persistent chains
    split over them (unchanged without one)."""
    if sharding is None:
        return state, inputs, validation
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    inputs = jax.device_put(inputs, replicated)
    if validation is not None:
        validation = jax.device_put(validation, replicated)
    arrays, static = eqx.partition(state, eqx.is_array)
    state = eqx.combine(jax.device_put(arrays, replicated), static)
    negatives = {}
    for name, chains in state.negatives.items():
        if (
            getattr(chains, "bank", None) is not None
            and chains.bank.shape[0] % len(sharding.mesh.devices.flat) == 0
        ):
            chains = chains._replace(bank=jax.device_put(chains.bank, sharding))
        negatives[name] = chains
    return state._replace(negatives=negatives), inputs, validation


def config_from_meta(meta: dict) -> TrainConfig:
    """The ``TrainConfig`` a checkpoint's settings describe (``load``). A run with a custom
    optimizer recorded none: ``ValueError`` asking for ``config=``."""
    from numpyro_ebm import negatives as _negatives

    stored = dict(meta["config"])
    learning_rate, generator_learning_rate = meta.get("learning_rates", [None, None])
    if learning_rate is None:
        raise ValueError(
            "this run used a custom optimizer, which a checkpoint cannot record: pass "
            "config=TrainConfig(optimizer=...) with the run's settings"
        )
    settings = dict(stored.pop("negatives"))
    name = settings.pop("name")
    if "sampler" in settings:
        settings["sampler"] = _samplers.Sampler(**settings["sampler"])
    if isinstance(settings.get("entropy"), dict):
        entropy = dict(settings["entropy"])
        classes = {cls.__name__: cls for cls in _generator.ENTROPY_ESTIMATORS.values()}
        settings["entropy"] = classes[entropy.pop("name")](**entropy)
    settings.pop("optimizer", None)
    config = TrainConfig(
        learning_rate=learning_rate,
        generator_learning_rate=generator_learning_rate or 1e-3,
        negatives=name,
        objective=objective_from_description(stored.get("objective", "ml")),
        **{k: v for k, v in stored.items() if k not in ("objective", "optimizer")},
        **{k: v for k, v in settings.items() if k in TrainConfig.__dataclass_fields__},
    )
    if name not in _negatives.KINDS:
        raise ValueError(f"checkpoint names unknown negatives {name!r}")
    return config
