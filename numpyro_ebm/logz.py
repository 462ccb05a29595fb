"""Partition-function estimators: every one returns a ``LogZEstimate``.

``log Z = log ∫ exp(−E(x)) dx``. Implemented here: ``grid`` (quadrature, dims ≤ 3).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["LogZEstimate", "grid", "grid_log_density"]


class LogZEstimate(NamedTuple):
    """An estimate of ``log Z`` with its uncertainty.

    Attributes:
        value: the estimate (float).
        stderr: standard error for stochastic estimators; for ``grid``, an estimate of the
            discretisation error (difference to the half-resolution rule).
        method: name of the estimator.
    """

    value: float
    stderr: float
    method: str


def _axes(bounds, num_points: int) -> list[np.ndarray]:
    """Midpoints of ``num_points`` equal cells per dimension."""
    bounds = np.asarray(bounds, dtype=np.float64)
    if bounds.ndim != 2 or bounds.shape[1] != 2 or not np.all(bounds[:, 1] > bounds[:, 0]):
        raise ValueError(f"bounds must have shape (dims, 2) with lo < hi, got {bounds.tolist()}")
    if not 1 <= bounds.shape[0] <= 3:
        raise ValueError(f"grid quadrature supports 1 to 3 dimensions, got {bounds.shape[0]}")
    if not (isinstance(num_points, int) and num_points >= 2):
        raise ValueError(f"num_points must be an integer >= 2, got {num_points!r}")
    out = []
    for lo, hi in bounds:
        edges = np.linspace(lo, hi, num_points + 1)
        out.append(0.5 * (edges[1:] + edges[:-1]))
    return out


def grid_log_density(
    energy: Callable, bounds, num_points: int, *, chunk_size: int = 65_536
) -> tuple[np.ndarray, list[np.ndarray], float]:
    """``−energy`` on the midpoint grid, evaluated in chunks so 1e6+ points fit in memory.

    Returns:
        ``(neg_energy, axes, cell_volume)`` with ``neg_energy`` of shape
        ``(num_points,) * dims`` (float64 numpy) and ``axes`` the per-dimension midpoints.
    """
    axes = _axes(bounds, num_points)
    mesh = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(axes))
    fn = jax.jit(jax.vmap(lambda x: -energy(x)))
    dtype = jnp.result_type(float)
    values = []
    for start in range(0, mesh.shape[0], chunk_size):
        values.append(np.asarray(fn(jnp.asarray(mesh[start : start + chunk_size], dtype))))
    neg_energy = np.concatenate(values).astype(np.float64).reshape((num_points,) * len(axes))
    cell = math.prod(float(a[1] - a[0]) for a in axes)
    return neg_energy, axes, cell


def _log_integral(neg_energy: np.ndarray, cell: float) -> float:
    finite = neg_energy[np.isfinite(neg_energy)]
    if finite.size == 0:
        raise ValueError("the energy is not finite anywhere on the grid")
    peak = finite.max()
    return float(np.log(np.sum(np.exp(neg_energy - peak)) * cell) + peak)


def grid(energy: Callable, bounds, num_points: int = 512) -> LogZEstimate:
    """``log Z`` by the midpoint rule on a box (dims ≤ 3).

    Exact up to discretisation and to the mass outside ``bounds``: choose a box that holds all
    the density's mass (the model's, not only the data's). The reported ``stderr`` is the
    difference to the same rule with half the points per dimension, a conservative estimate
    of the discretisation error for smooth energies.

    Args:
        energy: one event ``(dims,)`` -> scalar.
        bounds: ``(dims, 2)`` array of ``[lo, hi]`` per dimension.
        num_points: grid points per dimension (even).

    Example:
        >>> import jax.numpy as jnp
        >>> from numpyro_ebm.energies import GaussianEnergy
        >>> est = grid(GaussianEnergy(jnp.zeros(2)), [[-8, 8], [-8, 8]], 256)
        >>> round(est.value, 3)   # log 2π
        1.838
    """
    neg_energy, _, cell = grid_log_density(energy, bounds, num_points)
    if np.any(np.isnan(neg_energy)):
        raise ValueError(f"energy is NaN at {int(np.isnan(neg_energy).sum())} grid points")
    value = _log_integral(neg_energy, cell)
    coarse_bounds = np.asarray(bounds, dtype=np.float64)
    coarse = _log_integral(*_coarse(energy, coarse_bounds, num_points // 2))
    return LogZEstimate(value, abs(value - coarse), "grid")


def _coarse(energy, bounds, num_points):
    neg_energy, _, cell = grid_log_density(energy, bounds, num_points)
    return neg_energy, cell
