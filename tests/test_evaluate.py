"""Grid log Z, held-out likelihood and KL against closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import numpyro_ebm as ebm
from numpyro_ebm.energies import GaussianEnergy, GaussianMixtureEnergy


def test_grid_log_z_of_a_mixture_matches_the_closed_form():
    energy = GaussianMixtureEnergy(
        jnp.log(jnp.array([0.5, 2.0])),
        jnp.array([[-2.0, 0.0], [2.0, 1.0]]),
        jnp.array([[[1.0, 0.3], [0.3, 0.5]], jnp.eye(2) * 0.3]),
    )
    est = ebm.logz.grid(energy, [[-10, 10], [-10, 10]], 512)
    assert est.method == "grid"
    assert abs(est.value - math.log(2.5)) < 1e-4
    assert est.stderr < 1e-3  # the half-resolution rule agrees: the discretisation is resolved


@pytest.mark.parametrize("dims", [1, 3])
def test_grid_log_z_in_one_and_three_dimensions(dims):
    energy = GaussianEnergy(jnp.zeros(dims), jnp.eye(dims) * 0.5)
    est = ebm.logz.grid(energy, [[-6, 6]] * dims, 64 if dims == 3 else 512)
    assert abs(est.value - float(energy.log_z)) < 1e-3


def test_grid_input_errors():
    energy = GaussianEnergy(jnp.zeros(2))
    with pytest.raises(ValueError, match="1 to 3 dimensions"):
        ebm.logz.grid(energy, [[-1, 1]] * 4, 8)
    with pytest.raises(ValueError, match="lo < hi"):
        ebm.logz.grid(energy, [[1, -1], [0, 1]], 8)
    with pytest.raises(ValueError, match="NaN at"):
        ebm.logz.grid(lambda x: jnp.where(x[0] > 0, jnp.nan, 0.0), [[-1, 1], [-1, 1]], 8)


def test_log_likelihood_matches_the_gaussian():
    energy = GaussianEnergy(jnp.array([1.0, 0.0]), jnp.array([[1.0, 0.2], [0.2, 2.0]]))
    x = jax.random.normal(jax.random.key(0), (500, 2))
    out = ebm.evaluate.log_likelihood(energy, x, energy.log_z)
    expected = dist.MultivariateNormal(energy.mean, energy.covariance).log_prob(x)
    assert abs(out.value - float(expected.mean())) < 1e-4
    assert abs(out.stderr - float(expected.std(ddof=1)) / math.sqrt(500)) < 1e-4
    with pytest.raises(ValueError, match="NaN"):
        ebm.evaluate.log_likelihood(energy, x.at[0, 0].set(jnp.nan), 0.0)


def test_kl_of_a_moment_matched_gaussian_to_8gaussians():
    """KL(p ‖ N(0, sI)) = log(2πs) + E‖x‖²/(2s) − H(p) with E‖x‖² = r² + 2σ² = 8.25."""
    toy = ebm.datasets.toy("8gaussians")
    s = 8.25 / 2
    energy = GaussianEnergy(jnp.zeros(2), jnp.eye(2) * s)
    out = ebm.evaluate.kl_to_toy(
        energy, toy, key=jax.random.key(1), num_samples=40_000, bounds=[[-20, 20], [-20, 20]]
    )
    cross_entropy = math.log(2 * math.pi * s) + 1.0
    assert abs(out.kl - (cross_entropy - toy.entropy())) < 4 * out.kl_stderr
    assert abs(out.test_nll - cross_entropy) < 4 * out.test_nll_stderr
    assert abs(out.log_z.value - float(energy.log_z)) < 1e-4
    assert out.entropy == pytest.approx(toy.entropy())


def test_kl_of_the_exact_density_is_zero():
    toy = ebm.datasets.toy("rings")
    out = ebm.evaluate.kl_to_toy(lambda x: -toy.log_prob(x), toy, key=jax.random.key(2))
    assert abs(out.log_z.value) < 2e-3  # the density integrates to one on the padded box
    assert abs(out.kl) < 2e-3


def test_grid_checks_the_users_num_points_and_finite_bounds():
    energy = GaussianEnergy(jnp.zeros(2))
    with pytest.raises(ValueError, match="num_points must be an integer >= 4, got 3"):
        ebm.logz.grid(energy, [[-8, 8], [-8, 8]], 3)
    est = ebm.logz.grid(energy, [[-8, 8], [-8, 8]], np.int64(64))
    assert abs(est.value - math.log(2 * math.pi)) < 1e-6
    with pytest.raises(ValueError, match="bounds must be finite"):
        ebm.logz.grid(energy, [[-np.inf, 8], [-8, 8]], 64)


def test_kl_to_toy_integrates_a_broad_model_beyond_the_toy_box():
    """N(0, 10² I) has most of its mass outside the toy's padded box [-10, 10]²: the box grows
    until it holds it, and log Z (hence the KL) is exact. A model that fits the toy keeps the
    padded box, and a density too flat to cover is refused."""
    toy = ebm.datasets.toy("8gaussians")
    cheap = dict(key=jax.random.key(3), num_samples=200, num_points=128)
    broad = GaussianEnergy(jnp.zeros(2), 100.0 * jnp.eye(2))
    out = ebm.evaluate.kl_to_toy(broad, toy, **cheap)
    assert abs(out.log_z.value - float(broad.log_z)) < 1e-4
    assert np.all(np.diff(out.log_z.info["bounds"], axis=1) > 40)

    def fitted(x):
        return -toy.log_prob(x)

    padded = ebm.logz.select.box(toy_bounds=toy.bounds, padding=0.5)
    out = ebm.evaluate.kl_to_toy(fitted, toy, **cheap)
    assert out.log_z.info["bounds"] == padded.tolist()
    assert out.log_z.value == ebm.logz.grid(fitted, padded, 128).value
    with pytest.raises(ValueError, match="still at the edge of the box"):
        ebm.evaluate.kl_to_toy(GaussianEnergy(jnp.zeros(2), 1e6 * jnp.eye(2)), toy, **cheap)


def test_log_likelihood_carries_the_log_z_error_and_refuses_an_infinite_one():
    """log Z shifts every point alike: its error adds in quadrature to the points' Monte Carlo
    error. grid_covering's infinite error (its box misses the mass: here log Z is 2.3 nats
    short) is refused, not turned into a number; an unknown (NaN) error stays unknown."""
    energy = GaussianEnergy(jnp.zeros(2), 25.0 * jnp.eye(2))
    x = 5.0 * jax.random.normal(jax.random.key(4), (500, 2))
    exact = ebm.evaluate.log_likelihood(energy, x, energy.log_z)
    est = ebm.logz.LogZEstimate(float(energy.log_z), 0.5, "ais")
    out = ebm.evaluate.log_likelihood(energy, x, est)
    assert out.value == pytest.approx(exact.value)
    assert out.stderr == pytest.approx(math.hypot(exact.stderr, 0.5), rel=1e-9)
    unknown = ebm.logz.LogZEstimate(float(energy.log_z), math.nan, "nce-learned")
    out = ebm.evaluate.log_likelihood(energy, x, unknown)  # no error bar: none is made up
    assert out.value == pytest.approx(exact.value) and math.isnan(out.stderr)
    uncovered = ebm.logz.grid_covering(energy, [[-1, 1], [-1, 1]], 64, max_doublings=0)
    assert uncovered.stderr == math.inf
    with pytest.raises(ValueError, match="standard error inf"):
        ebm.evaluate.log_likelihood(energy, x, uncovered)


def test_a_standard_error_needs_at_least_two_points():
    energy = GaussianEnergy(jnp.zeros(2))
    with pytest.raises(ValueError, match="number of test points must be at least 2, got 1"):
        ebm.evaluate.log_likelihood(energy, jnp.zeros((1, 2)), energy.log_z)
    toy = ebm.datasets.toy("8gaussians")
    with pytest.raises(ValueError, match="num_samples must be an integer >= 2, got 1"):
        ebm.evaluate.kl_to_toy(energy, toy, key=jax.random.key(5), num_samples=1)
