"""EnergyDistribution against NumPyro's distribution conventions, with a Gaussian stand-in.

The Gaussian energy has an exact log Z, so ``EnergyDistribution`` must reproduce
``MultivariateNormal`` exactly (log_prob) or within Monte Carlo error (samples, NUTS).
"""

import math
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpyro.distributions.batch_util import vmap_over
from numpyro.infer import MCMC, NUTS, Predictive

import numpyro_ebm as ebm
from numpyro_ebm.energies import GaussianEnergy

MEAN = jnp.array([1.0, -0.5])
COV = jnp.array([[1.0, 0.6], [0.6, 2.0]])


def gaussian_ebm(**kwargs):
    energy = GaussianEnergy(MEAN, COV)
    return ebm.EnergyDistribution(energy, event_shape=(2,), log_z=energy.log_z, **kwargs)


def mvn():
    return dist.MultivariateNormal(MEAN, COV)


def moment_tolerances(cov, n_eff, z=4.5):
    """z standard errors of the sample mean and sample covariance for Gaussian draws."""
    cov = np.asarray(cov)
    var = np.diag(cov)
    se_mean = np.sqrt(var / n_eff)
    se_cov = np.sqrt((np.outer(var, var) + cov**2) / n_eff)
    return z * se_mean, z * se_cov


# -- log_prob --------------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True])
def test_log_prob_equals_multivariate_normal(jit):
    d = gaussian_ebm()
    x = jax.random.normal(jax.random.key(0), (7, 2)) * 2.0
    log_prob = jax.jit(lambda d, x: d.log_prob(x)) if jit else (lambda d, x: d.log_prob(x))
    np.testing.assert_allclose(log_prob(d, x), mvn().log_prob(x), atol=1e-5)


def test_log_z_defaults_to_the_energys_exact_log_z():
    x = jax.random.normal(jax.random.key(30), (7, 2)) * 2.0
    d = ebm.EnergyDistribution(GaussianEnergy(MEAN, COV), (2,))  # no log_z given
    np.testing.assert_allclose(d.log_prob(x), mvn().log_prob(x), atol=1e-5)

    log_weights = jnp.log(jnp.array([1.0, 3.0]))
    means = jnp.array([[-2.0, 0.0], [2.0, 1.0]])
    covs = jnp.stack([COV, jnp.eye(2)])
    mixture = ebm.energies.GaussianMixtureEnergy(log_weights, means, covs)
    exact = dist.MixtureSameFamily(
        dist.Categorical(logits=log_weights), dist.MultivariateNormal(means, covs)
    )
    d = ebm.EnergyDistribution(mixture, (2,))
    np.testing.assert_allclose(d.log_prob(x), exact.log_prob(x), atol=1e-5)


def test_log_likelihood_of_a_model_uses_the_exact_log_z():
    """numpyro.infer.log_likelihood (what az.loo reads) with a latent mean: the energy's
    log Z is computed from the traced parameters."""
    data = jax.random.normal(jax.random.key(31), (5, 2))

    def model():
        mean = numpyro.sample("mean", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with numpyro.plate("data", 5):
            numpyro.sample("x", ebm.EnergyDistribution(GaussianEnergy(mean, COV), (2,)), obs=data)

    means = jnp.array([[0.0, 0.0], [1.0, -0.5], [2.0, 1.0]])
    ll = numpyro.infer.log_likelihood(model, {"mean": means})["x"]
    expected = jax.vmap(lambda m: dist.MultivariateNormal(m, COV).log_prob(data))(means)
    np.testing.assert_allclose(ll, expected, atol=1e-5)


def test_explicit_log_z_wins_and_other_energies_default_to_zero():
    x = jax.random.normal(jax.random.key(32), (4, 2))
    energy = GaussianEnergy(MEAN, COV)
    d = ebm.EnergyDistribution(energy, (2,), log_z=0.3)
    np.testing.assert_allclose(d.log_prob(x), -jax.vmap(energy)(x) - 0.3, atol=1e-6)
    mlp = ebm.energies.MLPEnergy(2, hidden=(8,), key=jax.random.key(33))
    d = ebm.EnergyDistribution(mlp, (2,))
    np.testing.assert_allclose(d.log_prob(x), -jax.vmap(mlp)(x), atol=1e-6)
    assert float(d.log_z) == 0.0
    # a conditional energy's log Z depends on the condition: its log_z attribute (one number)
    # is not used; pass log_z per condition
    shifted = jax.tree_util.Partial(lambda e, x, c: e(x - c), energy)
    shifted.log_z = energy.log_z
    d = ebm.EnergyDistribution(shifted, (2,), condition=jnp.zeros((3, 2)))
    assert d.batch_shape == (3,) and float(d.log_z) == 0.0


def test_a_numpy_scalar_log_z_of_the_energy_is_used():
    class StdNormal:
        log_z = np.float32(0.5 * math.log(2 * math.pi))

        def __call__(self, x):
            return 0.5 * x**2

    x = jnp.array([0.3, -1.2])
    d = ebm.EnergyDistribution(StdNormal(), ())
    np.testing.assert_allclose(d.log_prob(x), dist.Normal().log_prob(x), rtol=1e-6)


# each batch shape and each sample shape once, an empty one beside a non-empty one (every
# pairing compiles its own sampler); a single draw of an unbatched distribution is
# test_single_draws_vmapped_over_keys_have_the_target_moments
@pytest.mark.parametrize(
    ("prepend_shape", "batch_shape"), [((), (4,)), ((2,), (3, 1)), ((2, 3), ())]
)
def test_shapes(prepend_shape, batch_shape):
    energy = GaussianEnergy(MEAN, COV)
    log_z = energy.log_z + jnp.arange(math.prod(batch_shape), dtype=float).reshape(batch_shape)
    draws = ebm.samplers.DrawSettings(num_warmup=5)
    d = ebm.EnergyDistribution(energy, (2,), log_z=log_z, draws=draws)
    assert d.batch_shape == batch_shape and d.event_shape == (2,)
    sample = d.sample(jax.random.key(1), prepend_shape)
    assert sample.shape == prepend_shape + batch_shape + (2,)
    log_prob = d.log_prob(sample)
    assert log_prob.shape == prepend_shape + batch_shape
    expected = mvn().log_prob(sample) - (log_z - energy.log_z)
    np.testing.assert_allclose(log_prob, expected, atol=1e-5)
    jitted = jax.jit(lambda d, x: d.log_prob(x))(d, sample)
    np.testing.assert_allclose(jitted, log_prob, atol=2e-5)


@settings(max_examples=20, deadline=None)
@given(
    event_shape=st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple),
)
def test_log_prob_broadcasts_over_any_leading_shape(event_shape, lead):
    energy = jax.tree_util.Partial(lambda scale, x: 0.5 * scale * jnp.sum(x**2), 2.0)
    d = ebm.EnergyDistribution(energy, event_shape, log_z=0.3)
    x = jnp.linspace(-1, 1, math.prod(lead + event_shape)).reshape(lead + event_shape)
    expected = -jnp.sum((x**2).reshape(*lead, -1), -1) - 0.3
    np.testing.assert_allclose(d.log_prob(x), expected, rtol=1e-6, atol=1e-6)


def test_gradient_wrt_energy_parameters_matches_finite_differences():
    x = jax.random.normal(jax.random.key(2), (5, 2))

    def total_log_prob(mean):
        energy = GaussianEnergy(mean, COV.astype(mean.dtype))
        return jnp.sum(ebm.EnergyDistribution(energy, (2,), log_z=energy.log_z).log_prob(x))

    with jax.enable_x64():
        mean = MEAN.astype(jnp.float64)
        x = x.astype(jnp.float64)
        grad = jax.grad(total_log_prob)(mean)
        eps = 1e-6
        for i in range(2):
            step = jnp.zeros(2).at[i].set(eps)
            fd = (total_log_prob(mean + step) - total_log_prob(mean - step)) / (2 * eps)
            np.testing.assert_allclose(grad[i], fd, rtol=1e-6)
        # the analytic answer: d/dμ Σ log N(x; μ, Σ) = Σ⁻¹ Σ (x − μ)
        expected = jnp.linalg.solve(COV.astype(jnp.float64), jnp.sum(x - mean, axis=0))
        np.testing.assert_allclose(grad, expected, rtol=1e-8)


def test_gradient_through_neural_energy_parameters():
    energy = ebm.energies.MLPEnergy(2, hidden=(8,), key=jax.random.key(3))
    x = jax.random.normal(jax.random.key(4), (3, 2))

    def loss(e):
        return jnp.sum(ebm.EnergyDistribution(e, (2,)).log_prob(x))

    grads = eqx.filter_grad(loss)(energy)
    leaf = grads.net.layers[0].weight
    params, unravel = jax.flatten_util.ravel_pytree(eqx.filter(energy, eqx.is_inexact_array))
    i = 0  # the first entry of the first weight matrix
    with jax.enable_x64(False):
        eps = 1e-2
        bump = jnp.zeros_like(params).at[i].set(eps)
        plus = eqx.combine(unravel(params + bump), energy)
        minus = eqx.combine(unravel(params - bump), energy)
        fd = (loss(plus) - loss(minus)) / (2 * eps)
    np.testing.assert_allclose(leaf[0, 0], fd, rtol=2e-2)


# -- pytree round trips ----------------------------------------------------------------------


def test_pytree_round_trip_jit_lax_map_scan():
    d = gaussian_ebm()
    x = jnp.array([[0.3, -0.2], [1.0, 2.0]])
    expected = d.log_prob(x)

    out = jax.jit(lambda d: d)(d)
    assert isinstance(out, ebm.EnergyDistribution) and out.event_shape == (2,)
    np.testing.assert_allclose(out.log_prob(x), expected, atol=1e-6)

    mapped = jax.lax.map(lambda i: jax.jit(lambda d: d)(d).log_prob(x[i]), jnp.arange(2))
    np.testing.assert_allclose(mapped, expected, atol=1e-6)

    def body(carry, xi):
        return carry, carry.log_prob(xi)

    carry, scanned = jax.lax.scan(body, d, x)
    assert isinstance(carry, ebm.EnergyDistribution)
    np.testing.assert_allclose(scanned, expected, atol=1e-6)


def test_vmap_over_log_z():
    energy = GaussianEnergy(MEAN, COV)
    log_zs = energy.log_z + jnp.array([0.0, 1.0, 2.0])

    def make(log_z):
        return ebm.EnergyDistribution(energy, (2,), log_z=log_z)

    axes = vmap_over(make(log_zs[0]), log_z=0)  # NumPyro's convention: only log_z is batched
    batched = jax.vmap(make, out_axes=axes)(log_zs)
    assert batched.energy is not None and batched.energy.mean.shape == (2,)
    in_axes = axes
    x = jnp.array([0.1, 0.2])
    out = jax.vmap(lambda d: d.log_prob(x), in_axes=(in_axes,))(batched)
    np.testing.assert_allclose(out, mvn().log_prob(x) - jnp.array([0.0, 1.0, 2.0]), atol=1e-5)


def test_vmap_over_energy_parameters():
    means = jnp.array([[0.0, 0.0], [1.0, 1.0]])
    x = jnp.array([0.5, -0.5])

    def log_prob(mean):
        energy = GaussianEnergy(mean, COV)
        return ebm.EnergyDistribution(energy, (2,), log_z=energy.log_z).log_prob(x)

    expected = jnp.stack([dist.MultivariateNormal(m, COV).log_prob(x) for m in means])
    np.testing.assert_allclose(jax.vmap(log_prob)(means), expected, atol=1e-5)


def test_vmap_over_energy_with_one_axis_for_all_its_leaves():
    means = jnp.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    log_z, x = GaussianEnergy(MEAN, COV).log_z, jnp.array([0.5, -0.5])

    def apply(f, energy, x):
        return f(energy(x))

    def make(mean):  # jnp.abs: a leaf that is not an array
        energy = jax.tree_util.Partial(apply, jnp.abs, GaussianEnergy(mean, COV))
        return ebm.EnergyDistribution(energy, (2,), log_z)

    axes = vmap_over(make(means[0]), energy=0)
    batched = jax.vmap(make, out_axes=axes)(means)
    out = jax.vmap(lambda d: d.log_prob(x), in_axes=(axes,))(batched)
    np.testing.assert_allclose(out, dist.MultivariateNormal(means, COV).log_prob(x), atol=1e-5)


def test_plain_function_initializer_passes_through_jit():
    d = gaussian_ebm(initializer=lambda key, n: jax.random.normal(key, (n, 2)))
    assert jax.jit(lambda d: d)(d).initializer is d.initializer
    x = jnp.array([0.3, -0.2])
    log_prob = jax.jit(lambda d, x: d.log_prob(x))(d, x)
    np.testing.assert_allclose(log_prob, mvn().log_prob(x), atol=1e-5)


def test_pytree_and_vmap_carry_the_draw_settings():
    settings = ebm.samplers.DrawSettings(num_warmup=3, num_chains=2)
    d = gaussian_ebm(sampler="hmc", draws=settings)
    out = jax.jit(lambda d: d)(d)
    assert out.draws == settings and out.sampler == ebm.samplers.hmc()
    energy = GaussianEnergy(MEAN, COV)

    def make(log_z):
        return ebm.EnergyDistribution(energy, (2,), log_z=log_z, draws=settings)

    axes = vmap_over(make(energy.log_z), log_z=0)
    batched = jax.vmap(make, out_axes=axes)(energy.log_z + jnp.arange(3.0))
    assert batched.draws == settings


def test_draws_must_be_draw_settings_and_sampler_has_no_draw_settings():
    with pytest.raises(TypeError, match="DrawSettings"):
        gaussian_ebm(draws=ebm.samplers.mala())
    with pytest.raises(TypeError, match="num_chains"):
        ebm.samplers.mala(num_chains=4)


# -- NumPyro combinators ---------------------------------------------------------------------


def test_expand_mask_to_event():
    d = gaussian_ebm()
    x = jax.random.normal(jax.random.key(5), (4, 3, 2))
    expanded = d.expand((4, 3))
    assert expanded.batch_shape == (4, 3) and expanded.event_shape == (2,)
    np.testing.assert_allclose(expanded.log_prob(x), mvn().log_prob(x), atol=1e-5)
    mask = jnp.array([True, False, True])
    masked = expanded.mask(mask)
    np.testing.assert_allclose(
        masked.log_prob(x), jnp.where(mask, mvn().log_prob(x), 0.0), atol=1e-5
    )
    independent = expanded.to_event(1)
    assert independent.batch_shape == (4,) and independent.event_shape == (3, 2)
    np.testing.assert_allclose(
        independent.log_prob(x), mvn().log_prob(x).sum(-1), rtol=1e-6, atol=1e-5
    )
    for wrapped in (d, expanded, masked, independent):
        assert not wrapped.has_rsample
    with pytest.raises(NotImplementedError):
        d.rsample(jax.random.key(0))


def test_observed_site_in_plate_and_trace():
    data = jax.random.normal(jax.random.key(6), (10, 2))

    def model():
        with numpyro.plate("data", 10):
            numpyro.sample("x", gaussian_ebm(), obs=data)

    trace = numpyro.handlers.trace(numpyro.handlers.seed(model, 0)).get_trace()
    site = trace["x"]
    assert site["is_observed"] and site["fn"].batch_shape == (10,)
    log_joint, _ = numpyro.infer.util.log_density(model, (), {}, {})
    np.testing.assert_allclose(log_joint, mvn().log_prob(data).sum(), rtol=1e-6)


# -- sampling --------------------------------------------------------------------------------


def assert_iid_gaussian(x, mean, cov, z=4.5):
    """``x`` ``(n, d)`` iid draws of N(mean, cov), within ``z`` Monte Carlo standard errors.

    Mean and covariance entries use ``moment_tolerances`` (the covariance entry's standard
    error is sqrt((Σᵢᵢ Σⱼⱼ + Σᵢⱼ²) / n), i.e. sqrt(2/n) σ² on the diagonal). The sharpest check
    of over- or under-dispersion is the mean of the squared Mahalanobis distance
    (x − μ)ᵀ Σ⁻¹ (x − μ) ~ χ²_d: mean d, variance 2d, so its average has standard error
    sqrt(2d / n).
    """
    x, mean, cov = np.asarray(x, np.float64), np.asarray(mean), np.asarray(cov)
    n, d = x.shape
    tol_mean, tol_cov = moment_tolerances(cov, n, z)
    np.testing.assert_array_less(np.abs(x.mean(0) - mean), tol_mean)
    np.testing.assert_array_less(np.abs(np.cov(x.T) - cov), tol_cov)
    centred = x - mean
    mahalanobis = np.mean(np.sum(centred * np.linalg.solve(cov, centred.T).T, axis=1))
    assert abs(mahalanobis - d) < z * np.sqrt(2 * d / n), (mahalanobis, d)


# n iid draws for the moment checks: the variance's standard error is then 1% of σ², and the
# Mahalanobis average's sqrt(4 / n) = 0.014, enough to see a few percent of under-dispersion
N_IID = 20_000
FAST = ebm.samplers.DrawSettings(num_warmup=200)


def test_single_draws_vmapped_over_keys_have_the_target_moments():
    d = gaussian_ebm(draws=FAST)
    keys = jax.random.split(jax.random.key(20), N_IID)
    x = jax.jit(jax.vmap(lambda k: d.sample(k)))(keys)
    assert x.shape == (N_IID, 2)
    assert_iid_gaussian(x, MEAN, COV)


def test_many_draws_have_the_target_moments():
    x = gaussian_ebm(draws=FAST).sample(jax.random.key(21), (N_IID,))
    assert_iid_gaussian(x, MEAN, COV)  # one chain per draw: iid


def test_predictive_on_a_latent_ebm_site_has_the_target_moments():
    """Predictive vmaps the model over its samples: every sample is ONE draw of the site."""

    def model():
        return numpyro.sample("x", gaussian_ebm(draws=FAST))

    out = Predictive(model, num_samples=N_IID, parallel=True)(jax.random.key(22))
    assert_iid_gaussian(out["x"], MEAN, COV)


def test_sample_with_trace_returns_its_chains_and_the_target_moments():
    n, num_chains = N_IID, N_IID // 4
    d = gaussian_ebm(draws=FAST.replace(num_chains=num_chains, thinning=10))
    x, draws = d.sample_with_trace(jax.random.key(23), (n,))
    assert draws.positions.shape == (num_chains, 4, 2)
    # draw-major: the first num_chains samples are every chain's first draw
    np.testing.assert_array_equal(x[:num_chains], draws.positions[:, 0])
    # 4 draws per chain, 10 MALA steps apart: nearly independent; allow for an ESS of n / 2
    assert_iid_gaussian(x[: n // 2], MEAN, COV)
    assert_iid_gaussian(x[n // 2 :], MEAN, COV)


def conditional_gaussian(num_chains=None):
    """x | c ~ N(MEAN + c, COV): the Gaussian energy shifted by a 2-D condition."""
    energy = GaussianEnergy(MEAN, COV)
    shifted = jax.tree_util.Partial(lambda e, x, c: e(x - c), energy)
    conditions = jnp.array([[0.0, 0.0], [3.0, -1.0]])
    draws = FAST.replace(num_chains=num_chains)
    d = ebm.EnergyDistribution(shifted, (2,), energy.log_z, condition=conditions, draws=draws)
    return d, conditions


def test_conditional_sample_has_the_target_moments_per_condition():
    d, conditions = conditional_gaussian()
    x = d.sample(jax.random.key(24), (N_IID // 2,))
    assert x.shape == (N_IID // 2, 2, 2)
    for i in range(2):  # one chain per draw: iid within each condition
        assert_iid_gaussian(x[:, i], MEAN + conditions[i], COV)


def test_conditional_sample_honours_num_chains():
    """``num_chains`` chains per condition, each recording draws_per_chain draws."""
    d, conditions = conditional_gaussian(num_chains=8)
    x, draws = d.sample_with_trace(jax.random.key(25), (100,))
    assert x.shape == (100, 2, 2)
    # leading batch axis: draws[i] (jax.tree.map(lambda a: a[i], draws)) is condition i's chains
    assert draws.positions.shape == (2, 8, 13, 2)
    assert draws.info.acceptance_rate.shape == (2, 8, 13) and draws.step.shape == (2, 13)
    for i in range(2):
        mine = jnp.swapaxes(draws.positions[i], 0, 1).reshape(-1, 2)[:100]
        np.testing.assert_array_equal(x[:, i], mine)
        # 8 chains × 13 draws around the right mean (ESS ≥ 8 chains: a loose but real check)
        assert np.all(np.abs(x[:, i].mean(0) - (MEAN + conditions[i])) < 4.5 * np.sqrt(2 / 8))


def test_conditional_log_prob_broadcasts_values_against_batch_shape():
    d, conditions = conditional_gaussian()
    for shape in [(2,), (4, 1, 2)]:
        x = jax.random.normal(jax.random.key(41), shape)
        expected = dist.MultivariateNormal(MEAN + conditions, COV).log_prob(x)
        assert d.log_prob(x).shape == expected.shape
        np.testing.assert_allclose(d.log_prob(x), expected, atol=1e-5)


def test_sample_moments_match_the_gaussian():
    n = 4000
    d = gaussian_ebm(draws=ebm.samplers.DrawSettings(num_warmup=500))
    x = np.asarray(d.sample(jax.random.key(7), (n,)))
    # one independent chain per draw: the draws are (approximately) iid
    tol_mean, tol_cov = moment_tolerances(COV, n)
    np.testing.assert_array_less(np.abs(x.mean(0) - MEAN), tol_mean)
    np.testing.assert_array_less(np.abs(np.cov(x.T) - COV), tol_cov)


def test_sample_with_fewer_chains_and_thinning():
    settings = ebm.samplers.DrawSettings(num_warmup=300, num_chains=50, thinning=5)
    d = gaussian_ebm(draws=settings)
    x = np.asarray(d.sample(jax.random.key(8), (2000,)))
    assert x.shape == (2000, 2)
    # 40 thinned draws per chain are autocorrelated: allow for an ESS of a quarter of n
    tol_mean, _ = moment_tolerances(COV, 2000 / 4)
    np.testing.assert_array_less(np.abs(x.mean(0) - MEAN), tol_mean)


def test_draw_settings_are_honoured():
    """num_chains chains, one draw every thinning steps, starts from Normal(0, init_scale²)."""
    settings = ebm.samplers.DrawSettings(num_warmup=0, thinning=3, num_chains=4)
    x, draws = gaussian_ebm(draws=settings).sample_with_trace(jax.random.key(12), (10,))
    assert x.shape == (10, 2) and draws.positions.shape == (4, 3, 2)  # ceil(10 / 4) per chain
    np.testing.assert_array_equal(draws.step, [3, 6, 9])
    np.testing.assert_array_equal(draws.info.num_integration_steps, 3)
    # a kernel that barely moves keeps the chains where init_scale put them
    frozen = ebm.samplers.mala(step_size=1e-6, adapt_step_size=False)
    for scale in (1.0, 100.0):
        wide = ebm.samplers.DrawSettings(num_warmup=0, init_scale=scale, num_chains=2000)
        x = gaussian_ebm(sampler=frozen, draws=wide).sample(jax.random.key(13), (2000,))
        assert abs(float(jnp.std(x)) / scale - 1.0) < 0.1


@pytest.mark.parametrize("kernel", ["hmc", "barker", "ula"])
def test_sample_with_other_kernels(kernel):
    settings = ebm.samplers.DrawSettings(num_warmup=400)
    d = gaussian_ebm(sampler=kernel, draws=settings)
    x = np.asarray(d.sample(jax.random.key(9), (3000,)))
    tol_mean, tol_cov = moment_tolerances(COV, 3000)
    np.testing.assert_array_less(np.abs(x.mean(0) - MEAN), tol_mean)
    if kernel != "ula":  # ULA's O(h) bias inflates the covariance; checked in test_samplers
        np.testing.assert_array_less(np.abs(np.cov(x.T) - COV), tol_cov)


def test_sample_under_x64_gives_float64_draws():
    with jax.enable_x64():  # HMC and Barker: test_samplers' x64 warm-up test
        d = gaussian_ebm(draws=ebm.samplers.DrawSettings(num_warmup=4, num_chains=2))
        assert d.sample(jax.random.key(0), (3,)).dtype == jnp.float64


def test_sample_keys_are_respected():
    d = gaussian_ebm(draws=ebm.samplers.DrawSettings(num_warmup=10))
    a = d.sample(jax.random.key(0), (5,))
    np.testing.assert_array_equal(a, d.sample(jax.random.key(0), (5,)))
    assert not np.allclose(a, d.sample(jax.random.key(1), (5,)))


def test_sample_under_jit_compiles_once():
    traces = []

    def energy(x):
        traces.append(1)
        return 0.5 * jnp.sum(x**2)

    settings = ebm.samplers.DrawSettings(num_warmup=10)
    fn = jax.jit(
        lambda key, log_z: ebm.EnergyDistribution(energy, (2,), log_z, draws=settings).sample(
            key, (3,)
        )
    )
    fn(jax.random.key(0), 0.0)
    count = len(traces)
    fn(jax.random.key(1), 1.0)
    assert len(traces) == count


def test_predictive():
    settings = ebm.samplers.DrawSettings(num_warmup=300)

    def model(n):
        with numpyro.plate("n", n):
            return numpyro.sample("x", gaussian_ebm(draws=settings))

    out = Predictive(model, num_samples=2)(jax.random.key(10), 500)
    assert out["x"].shape == (2, 500, 2)
    x = np.asarray(out["x"]).reshape(-1, 2)
    tol_mean, _ = moment_tolerances(COV, x.shape[0])
    np.testing.assert_array_less(np.abs(x.mean(0) - MEAN), tol_mean)


def test_nuts_with_ebm_latent_recovers_gaussian():
    def model():
        numpyro.sample("x", gaussian_ebm())

    mcmc = MCMC(NUTS(model), num_warmup=500, num_samples=4000, num_chains=1, progress_bar=False)
    mcmc.run(jax.random.key(11))
    x = np.asarray(mcmc.get_samples()["x"])
    ess = numpyro.diagnostics.effective_sample_size(x[None])
    tol_mean, tol_cov = moment_tolerances(COV, np.min(ess))
    np.testing.assert_array_less(np.abs(x.mean(0) - MEAN), tol_mean)
    np.testing.assert_array_less(np.abs(np.cov(x.T) - COV), tol_cov)


# -- validation ------------------------------------------------------------------------------


def test_vector_valued_energy_is_rejected():
    with pytest.raises(ValueError, match="must return a scalar"):
        ebm.EnergyDistribution(lambda x: x**2, event_shape=(2,))


def test_wrong_event_shape_is_rejected():
    energy = ebm.energies.MLPEnergy(2, hidden=(4,), key=jax.random.key(0))
    with pytest.raises(ValueError, match="ONE event of shape \\(3,\\)"):
        ebm.EnergyDistribution(energy, event_shape=(3,))
    d = ebm.EnergyDistribution(energy, event_shape=(2,))
    with pytest.raises(ValueError, match="does not end with event_shape"):
        d.log_prob(jnp.zeros((4, 3)))


def test_non_callable_and_bad_sampler_are_rejected():
    with pytest.raises(TypeError, match="callable"):
        ebm.EnergyDistribution(jnp.zeros(2), event_shape=(2,))
    with pytest.raises(ValueError, match="unknown sampler"):
        ebm.EnergyDistribution(lambda x: jnp.sum(x), (2,), sampler="gibbs")


def test_initializer_sampler_refuses_a_condition():
    shifted = jax.tree_util.Partial(lambda e, x, c: e(x - c), GaussianEnergy(MEAN, COV))
    init = jax.tree_util.Partial(lambda key, n: jax.random.normal(key, (n, 2)))
    with pytest.raises(ValueError, match='sampler="initializer" cannot draw from a conditional'):
        ebm.EnergyDistribution(
            shifted, (2,), condition=jnp.zeros((2, 2)), initializer=init, sampler="initializer"
        )


def test_invalid_log_z_raises_with_validation():
    with pytest.raises(ValueError, match="log_z"):
        gaussian_ebm().__class__(GaussianEnergy(MEAN), (2,), log_z=jnp.nan, validate_args=True)


def test_out_of_support_and_nan_values_follow_numpyro_validation():
    d = gaussian_ebm(validate_args=True)
    x = jnp.array([[0.0, 0.0], [jnp.nan, 0.0], [jnp.inf, 1.0]])
    with pytest.warns(UserWarning, match="Out-of-support"):
        out = d.log_prob(x)
    assert np.isfinite(out[0]) and out[1] == -np.inf and out[2] == -np.inf
    # without validation NaN propagates, as in NumPyro
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(gaussian_ebm(validate_args=False).log_prob(x)[1])


def test_repr_names_the_energy():
    assert "GaussianEnergy" in repr(gaussian_ebm())
