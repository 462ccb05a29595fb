"""Input validation for training data.

Energy-based models fail late and obscurely on bad data: a single NaN pixel turns every
gradient into NaN after a few hundred MCMC steps, integer data silently breaks Langevin
dynamics (which needs a continuous state space), and a wrongly shaped array is broadcast
against the energy network's input layer in surprising ways. The helpers here check the data
once, eagerly and on the host, *before* any compute is traced, and raise errors that say what
is wrong and how to fix it.

They are meant to be called outside ``jax.jit`` (typically at the top of a ``fit`` function);
passing a tracer raises a ``TypeError``.

Example:
    >>> import numpy as np
    >>> from numpyro_ebm.validation import validate_data
    >>> x = validate_data(np.zeros((100, 2), dtype="float32"), event_shape=(2,))
    >>> x.shape, x.dtype
    ((100, 2), dtype('float32'))
"""

from __future__ import annotations

import operator
import os
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "UNIT_SCALE_LIMIT",
    "DataScaleWarning",
    "check_count",
    "check_positive",
    "check_spread",
    "is_integer",
    "is_real",
    "validate_data",
    "validate_event_shape",
    "warn_if_not_unit_scale",
]

_TRACER_MSG = (
    "{name} is a JAX tracer: validate_data must be called outside jax.jit / jax.vmap / "
    "jax.grad, on concrete data (call it once before entering the jitted function)."
)


def validate_event_shape(event_shape: int | Sequence[int]) -> tuple[int, ...]:
    """Normalize an event shape to a tuple of non-negative Python ints.

    Args:
        event_shape: A single non-negative int (``2`` means ``(2,)``) or a tuple/list of
            non-negative ints. ``()`` denotes scalar events. NumPy integer scalars are
            accepted; bools and floats are not.

    Returns:
        The event shape as a ``tuple`` of Python ``int``.

    Raises:
        TypeError: If ``event_shape`` is not an int or a tuple/list of ints.
        ValueError: If any dimension is negative.

    Example:
        >>> validate_event_shape(2)
        (2,)
        >>> validate_event_shape([8, 8])
        (8, 8)
    """
    if isinstance(event_shape, (tuple, list)):
        dims = list(event_shape)
    elif is_integer(event_shape):
        dims = [event_shape]
    else:
        raise TypeError(
            f"event_shape must be an int or a tuple of ints, got {event_shape!r} "
            f"(type {type(event_shape).__name__}); e.g. event_shape=(2,) for 2-D points."
        )
    out = []
    for d in dims:
        if not is_integer(d):
            raise TypeError(
                f"event_shape must contain only ints, got {event_shape!r} with element {d!r} "
                f"(type {type(d).__name__}); e.g. event_shape=(2,) for 2-D points."
            )
        d = operator.index(d)
        if d < 0:
            raise ValueError(
                f"event_shape must contain non-negative ints, got {event_shape!r}; "
                "dimension sizes cannot be negative."
            )
        out.append(d)
    return tuple(out)


def validate_data(
    data: Any, event_shape: int | Sequence[int] | None = None, *, name: str = "data"
) -> jax.Array:
    """Check that ``data`` is a finite floating-point array of points and return it as JAX.

    ``data`` must have shape ``(*batch_shape, *event_shape)`` with at least one batch
    dimension, usually ``(num_points, *event_shape)``. All checks run eagerly on concrete
    values, before any JAX computation is traced.

    Args:
        data: The data set: a NumPy array, a JAX array or (nested) lists of floats.
        event_shape: Shape of one data point, e.g. ``(2,)`` for points in the plane or
            ``(64,)`` for flattened 8x8 images. An int ``d`` means ``(d,)``. If ``None``,
            any shape ``(num_points, *event_shape)`` with rank >= 2 is accepted and the
            event shape is ``data.shape[1:]``.
        name: Name of the argument, used in error messages.

    Returns:
        ``jnp.asarray(data)``: the same values with the same floating dtype (float16, bfloat16,
        float32 and float64 are all accepted; float64 becomes float32 unless
        ``jax_enable_x64`` is on, as for any ``jnp.asarray`` call).

    Raises:
        TypeError: If ``data`` is (or contains) a JAX tracer, i.e. the function is called
            inside ``jax.jit`` or another transformation.
        ValueError: If ``data`` cannot be converted to an array, its dtype is not floating
            point (ints, bools, complex, objects, strings), its rank is too small, its trailing
            dimensions differ from ``event_shape``, it holds zero points, or it contains NaN
            or inf values. The message says what is wrong and how to fix it.

    Example:
        >>> import numpy as np
        >>> validate_data(np.ones((3, 2), dtype="float32"), event_shape=2).shape
        (3, 2)
        >>> validate_data(np.array([[0.0, np.nan]]), name="x_train")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: x_train contains 1 non-finite value (1 NaN, 0 inf) in 1 of 1 points; ...
    """
    if isinstance(data, jax.core.Tracer):
        raise TypeError(_TRACER_MSG.format(name=name))
    if event_shape is not None:
        event_shape = validate_event_shape(event_shape)
    arr = _as_array(data, name)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise ValueError(
            f"{name} must have a floating-point dtype, got dtype {arr.dtype}. Energy-based "
            "models need continuous data: cast to float32, e.g. data.astype('float32') "
            "(dequantize discrete data first if it is integer-valued, e.g. pixels)."
        )
    batch_shape = _batch_shape(arr, event_shape, name)
    _check_finite(arr, batch_shape, name)
    return jnp.asarray(arr)


def _as_array(data, name: str):
    if isinstance(data, jax.Array):
        return data
    try:
        return np.asarray(data)
    except jax.errors.TracerArrayConversionError as err:
        raise TypeError(_TRACER_MSG.format(name=name)) from err
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{name} could not be converted to an array ({err}). Pass a NumPy/JAX array "
            "or rectangular nested lists of floats of shape (num_points, *event_shape)."
        ) from err


def _batch_shape(arr, event_shape: tuple[int, ...] | None, name: str) -> tuple[int, ...]:
    """The leading (batch) shape of ``arr`` after checking its event shape and that it holds
    at least one point."""
    shape = tuple(arr.shape)
    if event_shape is None:
        if arr.ndim < 2:
            raise ValueError(
                f"{name} must have shape (num_points, *event_shape) with rank >= 2, got shape "
                f"{shape} (rank {arr.ndim}). For scalar or 1-D points reshape it, e.g. "
                "data.reshape(-1, 1) for a column of scalars, or pass event_shape explicitly."
            )
        batch_shape = shape[:1]
    else:
        min_rank = 1 + len(event_shape)
        if arr.ndim < min_rank:
            raise ValueError(
                f"{name} must have shape (num_points, *event_shape) = "
                f"{_layout(event_shape)} with rank >= {min_rank}, got shape {shape} "
                f"(rank {arr.ndim}). A single point needs a leading batch axis, e.g. data[None]."
            )
        if shape[arr.ndim - len(event_shape) :] != event_shape:
            # Report the per-point shape under the usual (num_points, *event_shape) layout.
            raise ValueError(
                f"{name} has the wrong event shape: expected trailing dimensions "
                f"{event_shape}, got {shape[1:]} (full shape {shape}, expected "
                f"{_layout(event_shape)}). Reshape the data, e.g. "
                f"data.reshape{_layout(event_shape).replace('num_points', 'len(data)')}, or "
                "pass the right event_shape."
            )
        batch_shape = shape[: arr.ndim - len(event_shape)]
    if int(np.prod(batch_shape)) == 0:
        raise ValueError(
            f"{name} contains zero points (shape {shape}); pass at least one data point."
        )
    return batch_shape


def _check_finite(arr, batch_shape: tuple[int, ...], name: str) -> None:
    xp = jnp if isinstance(arr, jax.Array) else np
    finite = xp.isfinite(arr)
    if bool(xp.all(finite)):
        return
    n_nan = int(xp.sum(xp.isnan(arr)))
    n_bad = int(finite.size - xp.sum(finite))
    n_inf = n_bad - n_nan
    event_axes = tuple(range(len(batch_shape), arr.ndim))
    bad_points = np.asarray(~xp.all(finite, axis=event_axes) if event_axes else ~finite)
    n_bad_points = int(bad_points.sum())
    first = np.unravel_index(int(np.argmax(bad_points.ravel())), batch_shape)
    first_idx: int | tuple[int, ...] = (
        int(first[0]) if len(first) == 1 else tuple(int(i) for i in first)
    )
    raise ValueError(
        f"{name} contains {n_bad} non-finite value{'s' if n_bad != 1 else ''} "
        f"({n_nan} NaN, {n_inf} inf) in {n_bad_points} of {int(np.prod(batch_shape))} points; "
        f"first bad row at index {first_idx}. Remove or impute these rows before training, "
        "e.g. data[np.isfinite(data).all(axis=tuple(range(1, data.ndim)))]."
    )


def _layout(event_shape: tuple[int, ...]) -> str:
    """``"(num_points, d1, d2)"`` for an event shape ``(d1, d2)``."""
    if not event_shape:
        return "(num_points,)"
    return "(" + ", ".join(["num_points", *map(str, event_shape)]) + ")"


def check_spread(data, name: str = "the data") -> None:
    """``ValueError`` unless ``data`` (rows along the first axis) has at least 2 rows, not all
    the same: no density can be fitted to one point (the Gaussian fitted to the data, which
    starts the negatives, would have no covariance). Traced data is only checked for rows."""
    if data.shape[0] < 2:
        raise ValueError(
            f"{name} has {data.shape[0]} row(s); fitting a density needs at least 2 distinct "
            "points: pass more data"
        )
    identical = jnp.all(data == data[:1])
    if not isinstance(identical, jax.core.Tracer) and bool(identical):
        raise ValueError(
            f"{name}: its {data.shape[0]} rows are all the same point (every coordinate is "
            "constant): there is no density to learn; pass data with some spread"
        )


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep  # not numpyro_ebm_demo.py
UNIT_SCALE_LIMIT = 10.0
"""``warn_if_not_unit_scale``'s limit on a coordinate's root-mean-square about the origin."""


class DataScaleWarning(UserWarning):
    """Training data far from unit scale, for which the training defaults are not tuned."""


def warn_if_not_unit_scale(data, name: str = "the data") -> None:
    """A ``DataScaleWarning`` when a coordinate of ``data`` (rows along the first axis) has a
    root-mean-square about the origin above ``UNIT_SCALE_LIMIT`` (attributed to the first
    line outside this package, e.g. the user's call of ``fit``); nothing for traced data.

    The training defaults are tuned for data of unit scale: ``MLPEnergy``'s confinement
    ``0.01 ‖x‖²`` (760 nats at the rings toy scaled by 100) and its initial weights, the
    learning rate and ``energy_l2``. (The chains' step size follows the data's scale:
    ``samplers.step_size_bounds``.) On the rings toy scaled by 10 and shifted by 100 the energy
    gap is +4.5 nats after 400 steps, scaled by 100 +199: the run goes on and returns a poor
    model that only ``diagnose`` flags. Hence a warning before any compute, saying what to do
    (standardize), rather than an error: the data are valid, and an energy of the user's own
    may be built for their units.

    Example:
        >>> import warnings, numpy as np
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_if_not_unit_scale(np.array([[0.0, 1.0], [250.0, -1.0]]))
        >>> caught[0].category.__name__
        'DataScaleWarning'
    """
    if isinstance(data, jax.core.Tracer):
        return
    data = np.asarray(data, np.float64)
    if data.ndim == 0 or data.shape[0] == 0:
        return
    flat = data.reshape(data.shape[0], -1)
    rms = np.sqrt(np.mean(flat**2, axis=0))
    worst = int(np.argmax(rms))
    if not rms[worst] > UNIT_SCALE_LIMIT:
        return
    warnings.warn(
        f"{name}: coordinate {worst} has a root-mean-square of {rms[worst]:.3g} about the "
        f"origin (above {UNIT_SCALE_LIMIT:g}). The training defaults (MLPEnergy's confinement "
        "and initial weights, the learning rate, energy_l2) are tuned for data of unit "
        "scale, and on data this large training can return a poor model without an error "
        "(diagnostics.diagnose flags it). Standardize first, z = (x - mean) / std per "
        "coordinate, and add -sum(log std) to log-densities (the getting-started guide, "
        "'Your own data'); the command line does this for you",
        DataScaleWarning,
        skip_file_prefixes=(_PACKAGE,),
    )


def is_integer(x: Any) -> bool:
    """True for Python/NumPy integers, False for bools and everything else."""
    if isinstance(x, (bool, np.bool_)):
        return False
    try:
        operator.index(x)
    except TypeError:
        return False
    return True


def check_count(name: str, value, low: int = 1) -> None:
    """A count setting must be an integer (not a bool) ``>= low``: a ``ValueError`` naming it
    otherwise."""
    if not (isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= low):
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_positive(name: str, value) -> float:
    """A scale setting must be a finite real number ``> 0`` (not a bool): the value as a
    ``float``, or a ``ValueError`` naming it."""
    if not (is_real(value) and 0 < value < float("inf")):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_non_negative(name: str, value) -> float:
    """A weight or gain must be a finite real number ``>= 0`` (not a bool; 0 turns it off):
    the value as a ``float``, or a ``ValueError`` naming it."""
    if not (is_real(value) and 0 <= value < float("inf")):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def is_real(value) -> bool:
    """A real number setting: a Python or NumPy int or float, not a bool."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
