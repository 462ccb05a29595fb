"""Energies: closed forms against their exact normalisers, neural energies are proper."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

from numpyro_ebm.energies import DeepEnergy, GaussianEnergy, GaussianMixtureEnergy, MLPEnergy


def grid_log_z(energy, half_width, num=801):
    """Trapezoid-free midpoint rule on [-w, w]² (smooth integrands: error far below 1e-4)."""
    edges = np.linspace(-half_width, half_width, num + 1)
    mids = 0.5 * (edges[1:] + edges[:-1])
    xx, yy = np.meshgrid(mids, mids, indexing="ij")
    points = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], -1), jnp.float32)
    neg_e = np.asarray(jax.jit(jax.vmap(lambda x: -energy(x)))(points), np.float64)
    cell = (edges[1] - edges[0]) ** 2
    return float(np.log(np.sum(np.exp(neg_e - neg_e.max())) * cell) + neg_e.max())


def test_gaussian_energy_matches_multivariate_normal():
    mean = jnp.array([0.5, -1.0, 2.0])
    a = jax.random.normal(jax.random.key(0), (3, 3))
    cov = a @ a.T + 0.5 * jnp.eye(3)
    energy = GaussianEnergy(mean, cov)
    x = jax.random.normal(jax.random.key(1), (6, 3))
    log_p = -jax.vmap(energy)(x) - energy.log_z
    np.testing.assert_allclose(log_p, dist.MultivariateNormal(mean, cov).log_prob(x), atol=1e-5)
    np.testing.assert_allclose(energy.covariance, cov, rtol=1e-5, atol=1e-6)
    same = GaussianEnergy(mean, scale_tril=jnp.linalg.cholesky(cov))
    np.testing.assert_allclose(same(x[0]), energy(x[0]), rtol=1e-6)


def test_gaussian_energy_log_z_against_quadrature():
    energy = GaussianEnergy(jnp.array([0.3, -0.2]), jnp.array([[1.0, 0.4], [0.4, 0.5]]))
    assert abs(grid_log_z(energy, 8.0) - float(energy.log_z)) < 1e-4


def test_mixture_log_z_against_quadrature():
    energy = GaussianMixtureEnergy(
        jnp.log(jnp.array([0.5, 2.0, 4.0])),
        jnp.array([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]]),
        jnp.array([[[1.0, 0.3], [0.3, 0.5]], jnp.eye(2) * 0.3, jnp.eye(2)]),
    )
    assert abs(float(energy.log_z) - math.log(6.5)) < 1e-6
    assert abs(grid_log_z(energy, 9.0) - float(energy.log_z)) < 1e-4


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="mean must have shape"):
        GaussianEnergy(jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match="covariance must have shape"):
        GaussianEnergy(jnp.zeros(2), jnp.eye(3))
    with pytest.raises(ValueError, match="positive definite"):
        GaussianEnergy(jnp.zeros(2), -jnp.eye(2))
    with pytest.raises(ValueError, match="log_weights must have shape"):
        GaussianMixtureEnergy(jnp.zeros(3), jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match="positive integer"):
        MLPEnergy(0, key=jax.random.key(0))
    energy = MLPEnergy(2, hidden=(4,), key=jax.random.key(0))
    with pytest.raises(ValueError, match="ONE event with 2 values"):
        energy(jnp.zeros((5, 2)))


@pytest.mark.parametrize(
    "make",
    [
        lambda k: MLPEnergy(2, hidden=(32, 32), key=k),
        lambda k: DeepEnergy(2, hidden=(32, 32), num_experts=8, key=k),
    ],
)
def test_neural_energies_are_confining(make):
    """Scalar, smooth, and exp(-E) integrable: log Z on growing boxes converges."""
    energy = make(jax.random.key(2))
    x = jax.random.normal(jax.random.key(3), (2,))
    assert energy(x).shape == () and jnp.isfinite(energy(x))
    assert jnp.all(jnp.isfinite(jax.grad(energy)(x)))
    # energy grows without bound in every direction
    directions = jax.random.normal(jax.random.key(4), (16, 2))
    directions /= jnp.linalg.norm(directions, axis=1, keepdims=True)
    far = jax.vmap(energy)(100.0 * directions)
    near = jax.vmap(energy)(10.0 * directions)
    assert bool(jnp.all(far > near))
    # the tails beyond radius 30 carry no mass: log Z over [-30,30]² equals log Z over [-45,45]²
    assert abs(grid_log_z(energy, 30.0, 1201) - grid_log_z(energy, 45.0, 1801)) < 1e-3


def test_mlp_energy_accepts_image_shaped_events():
    energy = MLPEnergy(64, hidden=(16,), key=jax.random.key(5))
    x = jax.random.normal(jax.random.key(6), (8, 8))
    np.testing.assert_allclose(energy(x), energy(x.reshape(64)), rtol=1e-6)


def test_deep_energy_formula():
    energy = DeepEnergy(3, hidden=(8, 8), num_experts=5, sigma=2.0, key=jax.random.key(7))
    energy = jax.tree_util.tree_map(lambda a: a, energy)
    x = jnp.array([0.5, -1.0, 2.0])
    feats = energy.features(x)
    expected = (x @ x) / 4.0 - energy.bias @ x - jnp.sum(jax.nn.softplus(energy.experts(feats)))
    np.testing.assert_allclose(energy(x), expected, rtol=1e-6)


def test_deep_energy_experts_are_bounded_by_default():
    """Bounded (tanh) features bound every expert by softplus(‖wᵢ‖₁ + cᵢ), so
    E(x) ≥ ‖x‖²/σ² − bᵀx − Σᵢ softplus(‖wᵢ‖₁ + cᵢ) everywhere, however steep the weights:
    the quadratic term confines the density near the data, with no well far from it (with
    SiLU features the experts grow linearly and, steep enough, break this bound)."""
    energy = DeepEnergy(2, hidden=(16, 16), num_experts=8, key=jax.random.key(8))
    # steep weights, as after fitting data several σ wide: every weight matrix times 10
    energy = jax.tree_util.tree_map(lambda a: 10.0 * a if a.ndim == 2 else a, energy)
    w, c = energy.experts.weight, energy.experts.bias
    cap = float(jnp.sum(jax.nn.softplus(jnp.sum(jnp.abs(w), axis=1) + c)))
    directions = jax.random.normal(jax.random.key(9), (256, 2))
    directions /= jnp.linalg.norm(directions, axis=1, keepdims=True)
    radii = jnp.array([1.0, 3.0, 10.0, 30.0, 100.0])
    x = (radii[:, None, None] * directions[None]).reshape(-1, 2)
    energies = jax.vmap(energy)(x)
    bound = jnp.sum(x**2, axis=1) / energy.sigma**2 - x @ energy.bias - cap
    assert bool(jnp.all(energies >= bound - 1e-3 * jnp.abs(bound)))
    # hence (b = 0 here) no point beyond radius √(cap + min E) is as low as the lowest energy
    lowest = float(jnp.min(energies))
    far = jnp.linalg.norm(x, axis=1) > math.sqrt(max(cap + lowest, 0.0)) + 1.0
    assert bool(jnp.any(far)) and bool(jnp.all(energies[far] > lowest))
