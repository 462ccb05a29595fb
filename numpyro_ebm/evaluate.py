"""Held-out log-likelihood and KL divergence to a known density.

For 2-D energies ``log Z`` is computed by quadrature (``logz.grid_covering`` from the toy's box
of ``logz.select.box``, grown while the model has mass at its edge), so these numbers are exact
up to Monte Carlo error on the test points (reported as a standard error).

``KL(data ‖ model) = E_data[log p_data(x) − log p_model(x)]`` is estimated with PAIRED
differences on the same test points: the per-point difference has far less variance than either
term, so the standard error is small enough to tell apart models of nearly equal quality.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_ebm import logz as _logz
from numpyro_ebm.validation import check_count, validate_data

__all__ = ["KLEstimate", "MeanEstimate", "kl_to_toy", "log_likelihood"]


class MeanEstimate(NamedTuple):
    """A Monte Carlo mean and its standard error."""

    value: float
    stderr: float


class KLEstimate(NamedTuple):
    """Result of ``kl_to_toy``.

    Attributes:
        kl: ``KL(data ‖ model)`` in nats, with ``kl_stderr``.
        test_nll: mean ``−log p_model`` on the test points (nats), with ``test_nll_stderr``.
        entropy: the toy's exact entropy: the best achievable ``test_nll`` in expectation.
        log_z: the ``LogZEstimate`` used.
    """

    kl: float
    kl_stderr: float
    test_nll: float
    test_nll_stderr: float
    entropy: float
    log_z: _logz.LogZEstimate


def _mean_and_stderr(values: np.ndarray) -> MeanEstimate:
    values = np.asarray(values, np.float64)
    return MeanEstimate(float(values.mean()), float(values.std(ddof=1) / np.sqrt(values.size)))


def _check_at_least_two(name: str, count: int) -> None:
    """A standard error needs at least 2 points (one gives ``0/0``)."""
    if count < 2:
        raise ValueError(f"{name} must be at least 2, got {count}: a standard error needs two")


def _log_z_and_stderr(log_z) -> tuple[float, float]:
    """``(value, stderr)`` of a float or a ``LogZEstimate``, refusing a non-finite value or an
    infinite error (a NaN error, e.g. ``"nce-learned"``'s, means unknown: it is passed on)."""
    value = float(getattr(log_z, "value", log_z))
    stderr = float(getattr(log_z, "stderr", 0.0))
    if not np.isfinite(value) or np.isinf(stderr):
        raise ValueError(
            f"log_z is {value} with standard error {stderr}: no likelihood can be computed "
            "from it (an infinite error is grid_covering's sign that its box misses the "
            "model's mass); estimate log Z on a box that holds the mass, or with ais"
        )
    return value, stderr


def _model_log_prob(energy: Callable, x: jax.Array, log_z: float) -> np.ndarray:
    energies = np.asarray(jax.jit(jax.vmap(energy))(x), np.float64)
    return -energies - log_z


def log_likelihood(energy: Callable, data, log_z, *, log_jacobian=None) -> MeanEstimate:
    """Mean held-out log-likelihood ``mean(−E(x) − log Z + log_jacobian)`` with its standard
    error: ``sqrt(se_points² + se_logZ²)``, the Monte Carlo error of the mean over the test
    points and the standard error of ``log Z`` (which shifts every point alike).

    Args:
        energy: one event -> scalar.
        data: ``(num_points, *event_shape)`` test data, at least 2 points.
        log_z: a float (exact: no error) or ``LogZEstimate`` (its ``.value``, and its
            ``.stderr`` in the reported error: a NaN one, unknown, makes it NaN).
        log_jacobian: ``log |dz/dx|`` of the map from the reported units ``x`` to the model's
            coordinates ``z = data``: a number (``tables.TableTransform.log_jacobian``) or one
            per point ``(num_points,)`` (``bounded.BoxCoordinates.to_model``); None: 0.

    Raises:
        ValueError: fewer than 2 test points; non-finite data or ``log Z``, or a ``log Z``
            with an infinite standard error (``logz.grid_covering``'s sign that its box
            misses the model's mass).

    Example:
        >>> import jax.numpy as jnp, numpyro_ebm as ebm
        >>> energy = ebm.energies.GaussianEnergy(jnp.zeros(2))
        >>> ll = ebm.evaluate.log_likelihood(energy, jnp.zeros((3, 2)), energy.log_z)
        >>> round(ll.value, 4)
        -1.8379
    """
    data = validate_data(data)
    _check_at_least_two("the number of test points", data.shape[0])
    value, log_z_stderr = _log_z_and_stderr(log_z)
    log_jacobian = np.asarray(0.0 if log_jacobian is None else log_jacobian, np.float64)
    if log_jacobian.shape not in ((), (data.shape[0],)):
        raise ValueError(
            f"log_jacobian must be a number or one per point ({data.shape[0]},), got "
            f"shape {log_jacobian.shape}"
        )
    log_prob = _model_log_prob(energy, data, value)
    if log_jacobian.ndim:
        estimate = _mean_and_stderr(log_prob + log_jacobian)
    else:  # a constant moves the mean, not its error
        estimate = _mean_and_stderr(log_prob)
        estimate = MeanEstimate(estimate.value + float(log_jacobian), estimate.stderr)
    return MeanEstimate(estimate.value, float(np.hypot(estimate.stderr, log_z_stderr)))


def kl_to_toy(
    energy: Callable,
    toy,
    *,
    key: jax.Array,
    num_samples: int = 20_000,
    num_points: int = 512,
    bounds=None,
    padding: float = 0.5,
) -> KLEstimate:
    """``KL(toy ‖ model)`` and test NLL with grid-exact ``log Z`` for a 2-D energy.

    Args:
        energy: one event ``(2,)`` -> scalar.
        toy: a ``datasets.ToyDensity`` (exact ``sample``, ``log_prob``, ``entropy``).
        key: PRNG key for the test points (use one not used for training data).
        num_samples: test points (at least 2).
        num_points: grid points per dimension for ``log Z``.
        bounds: first quadrature box; default the toy's bounds widened by ``padding`` of their
            width on each side (``logz.select.box``: the model may put mass where the data has
            none). Each axis doubles about the centre while the model has mass at the box's
            edge (``logz.grid_covering`` with ``select.GRID_EDGE_MASS`` and
            ``select.GRID_MAX_DOUBLINGS``).
        padding: see ``bounds``.

    Raises:
        ValueError: ``num_samples`` < 2; the model still has mass at the edge of the grown box
            (``grid_covering``).
    """
    check_count("num_samples", num_samples, low=2)
    if bounds is None:
        bounds = _logz.select.box(toy_bounds=toy.bounds, padding=padding)
    log_z = _logz.grid_covering(
        energy,
        _logz.select.box(toy_bounds=bounds, padding=-0.25),  # grid_covering widens it to bounds
        num_points,
        edge_mass=_logz.select.GRID_EDGE_MASS,
        max_doublings=_logz.select.GRID_MAX_DOUBLINGS,
    )
    if not np.isfinite(log_z.stderr):
        raise ValueError(
            f"kl_to_toy: {log_z.info['outer_shell_mass']:.3g} of the model's mass on the grid is "
            f"still at the edge of the box {log_z.info['bounds']}: its log Z, and so the KL, "
            "cannot be computed on a grid (is the energy normalisable?)"
        )
    x = toy.sample(key, num_samples)
    model = _model_log_prob(energy, x, log_z.value)
    truth = np.asarray(toy.log_prob(jnp.asarray(x)), np.float64)
    kl = _mean_and_stderr(truth - model)
    nll = _mean_and_stderr(-model)
    return KLEstimate(kl.value, kl.stderr, nll.value, nll.stderr, float(toy.entropy()), log_z)
