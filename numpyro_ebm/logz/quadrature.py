"""Deterministic ``log Z``: midpoint quadrature on a box (dims ≤ 3) and exact enumeration.

* ``grid``: the midpoint rule, with the half-resolution rule's difference as error bar.
* ``grid_covering``: ``grid`` on a box grown until it holds the density's mass.
* ``grid_traced``: the same rule as a differentiable JAX expression.
* ``grid_log_density``: ``−E`` on the grid (plots use it).
* ``enumerate``: ``log Σ exp(−E)`` over a finite support.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_ebm.logz.estimate import LogZEstimate, log_integral
from numpyro_ebm.validation import check_count

__all__ = ["enumerate", "grid", "grid_covering", "grid_log_density", "grid_traced"]


def _axes(bounds, num_points: int) -> list[np.ndarray]:
    """Midpoints of ``num_points`` equal cells per dimension."""
    bounds = np.asarray(bounds, dtype=np.float64)
    if bounds.ndim != 2 or bounds.shape[1] != 2 or not np.all(bounds[:, 1] > bounds[:, 0]):
        raise ValueError(f"bounds must have shape (dims, 2) with lo < hi, got {bounds.tolist()}")
    if not np.all(np.isfinite(bounds)):
        raise ValueError(f"bounds must be finite, got {bounds.tolist()}")
    if not 1 <= bounds.shape[0] <= 3:
        raise ValueError(f"grid quadrature supports 1 to 3 dimensions, got {bounds.shape[0]}")
    check_count("num_points", num_points, 2)
    out = []
    for lo, hi in bounds:
        edges = np.linspace(lo, hi, num_points + 1)
        out.append(0.5 * (edges[1:] + edges[:-1]))
    return out


def _mesh(bounds, num_points: int) -> tuple[np.ndarray, list[np.ndarray], float]:
    """``(mesh, axes, cell_volume)``: the midpoints of ``_axes`` as ``(num_points ** dims,
    dims)`` points (the first axis slowest), the axes themselves and one cell's volume."""
    axes = _axes(bounds, num_points)
    mesh = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(axes))
    return mesh, axes, math.prod(float(a[1] - a[0]) for a in axes)


def grid_log_density(
    energy: Callable, bounds, num_points: int, *, chunk_size: int = 65_536
) -> tuple[np.ndarray, list[np.ndarray], float]:
    """``−energy`` on the midpoint grid, evaluated in chunks so 1e6+ points fit in memory.

    Returns:
        ``(neg_energy, axes, cell_volume)`` with ``neg_energy`` of shape
        ``(num_points,) * dims`` (float64 numpy) and ``axes`` the per-dimension midpoints.
    """
    mesh, axes, cell = _mesh(bounds, num_points)
    fn = jax.jit(jax.vmap(lambda x: -energy(x)))
    dtype = jnp.result_type(float)
    values = []
    for start in range(0, mesh.shape[0], chunk_size):
        values.append(np.asarray(fn(jnp.asarray(mesh[start : start + chunk_size], dtype))))
    neg_energy = np.concatenate(values).astype(np.float64).reshape((num_points,) * len(axes))
    return neg_energy, axes, cell


def grid(energy: Callable, bounds, num_points: int = 512) -> LogZEstimate:
    """``log Z`` by the midpoint rule on a box (dims ≤ 3).

    Exact up to discretisation and to the mass outside ``bounds``: choose a box that holds all
    the density's mass (the model's, not only the data's). The reported ``stderr`` is the
    difference to the same rule with half the points per dimension, a conservative estimate
    of the discretisation error for smooth energies.

    Args:
        energy: one event ``(dims,)`` -> scalar.
        bounds: ``(dims, 2)`` array of ``[lo, hi]`` per dimension.
        num_points: grid points per dimension (even, at least 4: the error bar's rule has half).

    Example:
        >>> import jax.numpy as jnp
        >>> from numpyro_ebm.energies import GaussianEnergy
        >>> est = grid(GaussianEnergy(jnp.zeros(2)), [[-8, 8], [-8, 8]], 256)
        >>> round(est.value, 3)   # log 2π
        1.838
    """
    check_count("num_points", num_points, 4)
    neg_energy, _, cell = grid_log_density(energy, bounds, num_points)
    if np.any(np.isnan(neg_energy)):
        raise ValueError(f"energy is NaN at {int(np.isnan(neg_energy).sum())} grid points")
    value = log_integral(neg_energy, cell)
    coarse_neg_energy, _, coarse_cell = grid_log_density(energy, bounds, num_points // 2)
    coarse = log_integral(coarse_neg_energy, coarse_cell)
    return LogZEstimate(value, abs(value - coarse), "grid")


def _outer_shell_mass(neg_energy: np.ndarray, axes: list, center, half) -> tuple:
    """Share of the grid's mass farther than half the box's half-width from its centre: in any
    coordinate (a float), and per coordinate (an array)."""
    mesh = np.meshgrid(*axes, indexing="ij")
    weights = np.exp(neg_energy - np.max(neg_energy[np.isfinite(neg_energy)]))
    weights = np.where(np.isfinite(weights), weights, 0.0)
    total = weights.sum()
    outer = [np.abs(coords - c) > 0.5 * h for coords, c, h in zip(mesh, center, half, strict=True)]
    per_axis = np.array([weights[o].sum() / total for o in outer])
    return float(weights[np.logical_or.reduce(outer)].sum() / total), per_axis


def grid_covering(
    energy: Callable,
    bounds,
    num_points: int = 512,
    *,
    edge_mass: float = 1e-3,
    max_doublings: int = 6,
) -> LogZEstimate:
    """``grid`` on a box grown until it holds the density's mass (dims ≤ 3).

    Starts from ``bounds`` (e.g. the data's box) widened by half its width on each side; an
    axis of zero width (a constant data column, a single row) starts as wide as the widest
    axis, or 1 when all are. While more than ``edge_mass`` of the mass on the grid lies in the
    box's outer shell (farther than half the half-width from the centre), it doubles about the
    centre each axis whose own shell holds more than ``edge_mass / dims``: a model can put mass
    well outside the data, and ``grid`` silently misses what is outside its box.

    Args:
        energy: one event ``(dims,)`` -> scalar.
        bounds: ``(dims, 2)`` starting box ``[lo, hi]`` per dimension (``lo <= hi``).
        num_points: grid points per dimension (even).
        edge_mass: largest share of the mass allowed in the outer shell.
        max_doublings: most doublings of one axis.

    Returns:
        ``LogZEstimate`` of ``grid``, with ``info = {"bounds": box, "outer_shell_mass": m}``.
        When the shell still holds more than ``edge_mass`` after the axes that need it have
        doubled ``max_doublings`` times (mass beyond the box, or no density at all), its
        standard error is infinite: the value is only what the box holds.

    Raises:
        ValueError: ``bounds`` not finite or ``lo > hi``.
    """
    bounds = np.asarray(bounds, np.float64)
    if bounds.ndim != 2 or bounds.shape[1] != 2 or not np.all(np.isfinite(bounds)):
        raise ValueError(f"bounds must be a finite (dims, 2) array, got {bounds.tolist()!r}")
    if np.any(bounds[:, 0] > bounds[:, 1]):
        raise ValueError(f"bounds must have lo <= hi in every row, got {bounds.tolist()}")
    check_count("max_doublings", max_doublings, 0)
    center = bounds.mean(axis=1)
    half = bounds[:, 1] - bounds[:, 0]
    widest = half.max()
    half = np.where(half <= 1e-6 * widest, widest if widest > 0 else 1.0, half)
    doublings = np.zeros(len(half), int)
    while True:
        box = np.stack([center - half, center + half], axis=1)
        neg_energy, axes, _ = grid_log_density(energy, box, num_points)
        edge, per_axis = _outer_shell_mass(neg_energy, axes, center, half)
        grow = (per_axis > edge_mass / len(half)) & (doublings < max_doublings)
        if edge <= edge_mass or not grow.any():
            break
        half, doublings = np.where(grow, 2 * half, half), doublings + grow
    estimate = grid(energy, box, num_points)
    stderr = estimate.stderr if edge <= edge_mass else math.inf
    return estimate._replace(stderr=stderr, info={"bounds": box.tolist(), "outer_shell_mass": edge})


def grid_traced(energy: Callable, bounds, num_points: int = 256) -> jax.Array:
    """``log Z`` by the midpoint rule as a JAX expression: differentiable and traceable.

    The same rule as ``grid`` (dims ≤ 3) but computed with ``jnp`` in one pass (no chunks,
    no error bar), so it can sit inside a jitted function or a NumPyro model: use it for
    Bayesian inference over the parameters of a low-dimensional energy, where the likelihood
    ``exp(−E_θ(x)) / Z(θ)`` needs ``log Z(θ)`` at every ``θ`` the sampler visits (see the
    docs' "Bayesian energy parameters"). ``num_points ** dims`` energies per call.

    Args:
        energy: one event ``(dims,)`` -> scalar; its parameters may be traced.
        bounds: ``(dims, 2)`` box holding all the mass, for every ``θ`` of interest.
        num_points: grid points per dimension.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from numpyro_ebm.logz import grid_traced
        >>> def log_z(log_sigma):  # E(x) = ½ x² / σ²: log Z = log σ + ½ log 2π
        ...     energy = lambda x: 0.5 * jnp.sum(x**2) * jnp.exp(-2 * log_sigma)
        ...     return grid_traced(energy, [[-10.0, 10.0]], 512)
        >>> round(float(jax.grad(log_z)(0.3)), 4)  # d log Z / d log σ = 1
        1.0
    """
    mesh, _, cell = _mesh(bounds, num_points)
    neg_energy = -jax.vmap(energy)(jnp.asarray(mesh, jnp.result_type(float)))
    return jax.nn.logsumexp(neg_energy) + math.log(cell)


def enumerate(energy: Callable, support) -> LogZEstimate:
    """Exact ``log Σ_x exp(−E(x))`` over a finite support ``(num_states, *event_shape)``."""
    support = jnp.asarray(support)
    if support.ndim < 1 or support.shape[0] == 0:
        raise ValueError("support must be a non-empty array of states (num_states, *event_shape)")
    neg = np.asarray(jax.jit(jax.vmap(lambda x: -energy(x)))(support), np.float64)
    if np.any(np.isnan(neg)):
        raise ValueError(f"energy is NaN at {int(np.isnan(neg).sum())} of the support's states")
    return LogZEstimate(log_integral(neg, 1.0), 0.0, "enumerate")
