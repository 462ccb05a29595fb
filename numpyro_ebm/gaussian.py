"""The Gaussian fitted to the training data, and the one Gaussian normaliser.

``fit_base`` gives ``N(mean, L Lᵀ)`` with the data's mean and covariance. Training uses it
where short runs start, as the noise of the learned ``log Z`` and for the probe points of
``training.free_constants``; ``logz.ais`` uses it as its base distribution.
``log_normalizer`` is ``log ∫ exp(−½‖L⁻¹(x − μ)‖²) dx``, used by ``GaussianEnergy.log_z`` and
``GaussianBase.log_prob``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from numpyro_ebm.validation import check_spread

__all__ = ["GaussianBase", "fit_base", "log_normalizer"]


def log_normalizer(scale_tril: jax.Array) -> jax.Array:
    """``½ D log(2π) + Σ log|Lᵢᵢ|``: ``log ∫ exp(−½‖L⁻¹(x − μ)‖²) dx`` for a ``(…, D, D)``
    lower-triangular ``L`` (batched over leading axes)."""
    dim = scale_tril.shape[-1]
    diagonal = jnp.diagonal(scale_tril, axis1=-2, axis2=-1)
    return 0.5 * dim * math.log(2 * math.pi) + jnp.sum(jnp.log(jnp.abs(diagonal)), axis=-1)


class GaussianBase(NamedTuple):
    """``N(mean, L Lᵀ)`` over flat events: ``mean (D,)``, ``scale_tril`` ``L (D, D)`` and its
    inverse (kept so the log-density is a matrix product: inside the compiled training loop
    XLA's CPU triangular solve is two orders of magnitude slower than a product)."""

    mean: jax.Array
    scale_tril: jax.Array
    inverse_scale_tril: jax.Array

    def sample(self, key: jax.Array, n: int) -> jax.Array:
        """``(n, D)`` draws."""
        noise = jax.random.normal(key, (n, self.mean.shape[0]), self.mean.dtype)
        return self.mean + noise @ self.scale_tril.T

    def log_prob(self, flat_x: jax.Array) -> jax.Array:
        """``(n, D) -> (n,)`` log-density."""
        white = (flat_x - self.mean) @ self.inverse_scale_tril.T
        return -0.5 * jnp.sum(white**2, axis=-1) - log_normalizer(self.scale_tril)

    @property
    def log_z(self) -> jax.Array:
        """``log Z`` of ``E(x) = ½‖L⁻¹(x − μ)‖²`` (the starting value of the learned log Z)."""
        return log_normalizer(self.scale_tril)

    @property
    def variance(self) -> jax.Array:
        """``(D,)`` the variance of each coordinate (the diagonal of ``L Lᵀ``)."""
        return jnp.sum(self.scale_tril**2, axis=-1)


def fit_base(flat_data: jax.Array, jitter: float = 1e-3) -> GaussianBase:
    """Gaussian with the data's mean and covariance (plus ``jitter``·I for a valid Cholesky).

    Raises:
        ValueError: fewer than 2 rows, or (for concrete data) rows that are all identical:
            the data has no spread to fit a Gaussian to (``validation.check_spread``).
    """
    check_spread(flat_data)
    num_rows = flat_data.shape[0]
    mean = jnp.mean(flat_data, axis=0)
    centred = flat_data - mean
    cov = centred.T @ centred / (num_rows - 1)
    cov = cov + jitter * jnp.mean(jnp.diag(cov)) * jnp.eye(cov.shape[0])
    scale_tril = jnp.linalg.cholesky(cov)
    inverse = jax.scipy.linalg.solve_triangular(scale_tril, jnp.eye(cov.shape[0]), lower=True)
    return GaussianBase(mean, scale_tril, inverse)
