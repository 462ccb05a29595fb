"""The one rule for "which ``log Z`` estimator, over which box".

``estimate(..., method="auto")`` uses grid quadrature when an event has at most
``GRID_MAX_DIMS`` coordinates (exact up to discretisation, on a box grown until it holds the
mass: ``quadrature.grid_covering``); above that the log Z ``fit`` tracked through training
(``tracking``) when it is given and its standard error is at most ``TRACKED_MAX_STDERR``, else
AIS with a Gaussian base fitted to the data; ``method="learned"`` returns the estimate ``fit``
learned. ``box`` is the region the density's
mass is expected in: a toy's bounds, else the data's per-coordinate range.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from numpyro_ebm.energies import GaussianEnergy
    >>> from numpyro_ebm.logz import select
    >>> data = jax.random.normal(jax.random.key(0), (500, 2))
    >>> est = select.estimate(GaussianEnergy(jnp.zeros(2)), (2,), data=data)
    >>> est.method, round(est.value, 3)   # log 2π
    ('grid', 1.838)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import numpy as np

from numpyro_ebm.logz.ais import ais
from numpyro_ebm.logz.estimate import LogZEstimate
from numpyro_ebm.logz.quadrature import grid_covering

__all__ = [
    "GRID_EDGE_MASS",
    "GRID_MAX_DIMS",
    "GRID_MAX_DOUBLINGS",
    "GRID_POINTS",
    "METHODS",
    "TRACKED_MAX_STDERR",
    "box",
    "estimate",
]

METHODS = ("auto", "grid", "ais", "learned")
GRID_MAX_DIMS = 3  # "auto" uses the grid up to here, AIS above
# Points per axis: 2**12, 2**18 and about 2**20 energies per grid.
GRID_POINTS = {1: 4096, 2: 512, 3: 96}
GRID_EDGE_MASS = 1e-3  # largest share of the grid's mass allowed in the box's outer shell
GRID_MAX_DOUBLINGS = 5  # per axis: a box 32 times as wide at most
# "auto" uses a tracked log Z this sure (nats) above GRID_MAX_DIMS: every log-likelihood shifts
# by the error of log Z, and a tenth of a nat per point is below what model comparisons resolve
TRACKED_MAX_STDERR = 0.1


def _sure(learned: LogZEstimate | None) -> bool:
    """A tracked estimate whose standard error is finite and at most ``TRACKED_MAX_STDERR``."""
    return (
        learned is not None
        and learned.method == "tracked"
        and math.isfinite(learned.stderr)
        and learned.stderr <= TRACKED_MAX_STDERR
    )


def box(data=None, *, toy_bounds=None, padding: float = 0.0) -> np.ndarray:
    """Where the density's mass is expected: ``(dims, 2)`` rows ``[lo, hi]``.

    A toy's bounds when given (the data of a toy do not reach its tails), else the data's
    per-coordinate minimum and maximum; then widened by ``padding`` times the width on each
    side. ``estimate``'s grid starts from ``box(...)`` widened by half its width on each side,
    i.e. from ``box(..., padding=0.5)``.

    Args:
        data: ``(n, dims)`` points (flat events).
        toy_bounds: a ``datasets.ToyDensity``'s ``bounds``; takes precedence over ``data``.
        padding: widening on each side, as a fraction of the width.

    Example:
        >>> box([[0.0, 1.0], [2.0, -1.0]], padding=0.5).tolist()
        [[-1.0, 3.0], [-2.0, 2.0]]
    """
    if toy_bounds is not None:
        bounds = np.asarray(toy_bounds, np.float64)
    elif data is not None:
        points = np.asarray(data, np.float64)
        if points.ndim != 2 or points.shape[0] == 0:
            raise ValueError(f"data must be (n >= 1, dims) flat points, got {points.shape}")
        bounds = np.stack([points.min(axis=0), points.max(axis=0)], axis=1)
    else:
        raise ValueError("box needs data or toy_bounds")
    if bounds.ndim != 2 or bounds.shape[1] != 2:
        raise ValueError(f"bounds must have shape (dims, 2), got {bounds.shape}")
    if not np.all(bounds[:, 0] <= bounds[:, 1]):
        raise ValueError(f"bounds must have lo <= hi in every row, got {bounds.tolist()}")
    width = bounds[:, 1] - bounds[:, 0]
    return np.stack([bounds[:, 0] - padding * width, bounds[:, 1] + padding * width], axis=1)


def estimate(
    energy: Callable,
    event_shape,
    *,
    method: str = "auto",
    data=None,
    bounds=None,
    key: jax.Array | None = None,
    learned: LogZEstimate | None = None,
) -> LogZEstimate:
    """``log Z`` by the estimator ``method`` names, over the box this module decides.

    Args:
        energy: one event -> scalar.
        event_shape: shape of one event.
        method: ``"auto"`` (``"grid"`` for at most ``GRID_MAX_DIMS`` coordinates; else
            ``learned`` when it is a tracked estimate with a standard error at most
            ``TRACKED_MAX_STDERR``; else ``"ais"``), ``"grid"``
            (``quadrature.grid_covering`` from ``bounds`` with ``GRID_POINTS`` per axis,
            ``GRID_EDGE_MASS`` and ``GRID_MAX_DOUBLINGS``), ``"ais"`` (``ais`` with a
            Gaussian base fitted to ``data``, or N(0, I) without data) or ``"learned"``
            (returns ``learned``, e.g. ``FitResult.log_z``).
        data: ``(n, *event_shape)`` training points: the grid's box when ``bounds`` is None,
            and the AIS base.
        bounds: ``(dims, 2)`` box the grid starts from (e.g. ``box(toy_bounds=toy.bounds)``);
            default ``box(data)`` (a constant column or a single row gives an axis of zero
            width, which ``grid_covering`` starts as wide as the widest axis).
        key: PRNG key (``"ais"`` only).
        learned: the estimate ``"learned"`` returns (``FitResult.log_z``), and that ``"auto"``
            uses when it is tracked and sure enough.

    Returns:
        the ``LogZEstimate`` of the chosen estimator.

    Raises:
        ValueError: an unknown ``method``, or what the chosen one needs is missing. (A grid
            whose box still has mass at its edge after ``GRID_MAX_DOUBLINGS`` doublings gives
            an infinite standard error: ``grid_covering``.)
    """
    if method not in METHODS:
        raise ValueError(f"unknown log Z method {method!r}; choose one of {METHODS}")
    event_shape = tuple(int(n) for n in event_shape)
    dims = math.prod(event_shape)
    if method == "auto":
        method = "grid" if dims <= GRID_MAX_DIMS else "ais"
        if method == "ais" and _sure(learned):
            return learned
    if method == "learned":
        if learned is None:
            raise ValueError("method='learned' needs the learned estimate (learned=...)")
        return learned
    if method == "ais":
        if key is None:
            raise ValueError("method='ais' needs a PRNG key (key=...)")
        return ais(energy, event_shape, key=key, data=data)
    if dims > GRID_MAX_DIMS:
        raise ValueError(f"grid quadrature supports 1 to {GRID_MAX_DIMS} dimensions, got {dims}")
    if bounds is None:
        if data is None:
            raise ValueError("method='grid' needs data or bounds for its box")
        bounds = box(np.reshape(np.asarray(data), (len(data), dims)))
    return grid_covering(
        energy,
        bounds,
        GRID_POINTS[dims],
        edge_mass=GRID_EDGE_MASS,
        max_doublings=GRID_MAX_DOUBLINGS,
    )
