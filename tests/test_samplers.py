"""The sampler layer: every kernel targets exp(logdensity) at temperature 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpyro_ebm as ebm
from numpyro_ebm import samplers
from numpyro_ebm.energies import GaussianEnergy


def standard_normal(x):
    return -0.5 * jnp.sum(x**2)


def run(
    sampler, key, num_chains=2000, dim=2, num_warmup=300, num_steps=50, logdensity=standard_normal
):
    k_init, k_warm, k_run = jax.random.split(key, 3)
    states = sampler.init_chains(jax.random.normal(k_init, (num_chains, dim)), logdensity)
    states, step_size, warm = samplers.warmup(k_warm, sampler, logdensity, states, num_warmup)
    states, trace, _ = samplers.run_chains(k_run, sampler, logdensity, states, step_size, num_steps)
    return states, step_size, warm, trace


@pytest.mark.parametrize("kernel", ["mala", "hmc", "barker"])
def test_warmup_reaches_target_acceptance(kernel):
    sampler = samplers.get_sampler(kernel)
    # unequal scales: on an isotropic Gaussian HMC's acceptance is periodic in the step size
    scales = jnp.linspace(0.5, 1.5, 10)
    _, step_size, _, trace = run(
        sampler,
        jax.random.key(0),
        num_chains=256,
        dim=10,
        logdensity=lambda x: -0.5 * jnp.sum((x / scales) ** 2),
    )
    acceptance = float(jnp.mean(trace.acceptance_rate))
    # dual averaging's averaged iterate lands close to (usually a little above) the target
    assert abs(acceptance - sampler.target) < 0.08, (acceptance, float(step_size))


@pytest.mark.parametrize("kernel", ["mala", "hmc", "barker"])
def test_exact_kernels_preserve_the_target_variance(kernel):
    n = 4000
    states, *_ = run(samplers.get_sampler(kernel), jax.random.key(1), num_chains=n)
    x = np.asarray(states.position)
    # var of a sample variance of n standard normals is 2/n
    assert np.all(np.abs(x.var(0) - 1.0) < 4.5 * np.sqrt(2 / n))
    assert np.all(np.abs(x.mean(0)) < 4.5 / np.sqrt(n))


def test_ula_has_its_known_step_size_bias():
    """ULA on N(0, 1) with step h is the AR(1) x' = (1-h)x + sqrt(2h)ξ: var = 1 / (1 - h/2)."""
    h, n = 0.4, 8000
    states, *_ = run(
        samplers.ula(step_size=h), jax.random.key(2), num_chains=n, num_warmup=0, num_steps=100
    )
    var = np.asarray(states.position).var(0)
    expected = 1.0 / (1.0 - h / 2)
    assert np.all(np.abs(var - expected) < 4.5 * expected * np.sqrt(2 / n))
    assert np.all(var > 1.0 + 6 * np.sqrt(2 / n))  # and the bias is visible, not noise


def test_run_chains_records_thinned_positions():
    sampler = samplers.mala()
    states = sampler.init_chains(jnp.zeros((3, 2)), standard_normal)
    final, trace, positions = samplers.run_chains(
        jax.random.key(3),
        sampler,
        standard_normal,
        states,
        0.5,
        12,
        thinning=4,
        keep_positions=True,
    )
    assert positions.shape == (3, 3, 2) and trace.acceptance_rate.shape == (3, 3)
    np.testing.assert_array_equal(positions[-1], final.position)
    np.testing.assert_allclose(
        trace.logdensity[-1], jax.vmap(standard_normal)(final.position), rtol=1e-6
    )
    with pytest.raises(ValueError, match="multiple of thinning"):
        samplers.run_chains(
            jax.random.key(3), sampler, standard_normal, states, 0.5, 10, thinning=4
        )


def test_same_key_same_chain_different_key_different_chain():
    sampler = samplers.mala()
    states = sampler.init_chains(jnp.zeros((4, 2)), standard_normal)
    a, _, _ = samplers.run_chains(jax.random.key(4), sampler, standard_normal, states, 0.3, 5)
    b, _, _ = samplers.run_chains(jax.random.key(4), sampler, standard_normal, states, 0.3, 5)
    c, _, _ = samplers.run_chains(jax.random.key(5), sampler, standard_normal, states, 0.3, 5)
    np.testing.assert_array_equal(a.position, b.position)
    assert not np.allclose(a.position, c.position)
    # chains get different noise
    assert not np.allclose(a.position[0], a.position[1])


def test_configuration_errors():
    with pytest.raises(ValueError, match="unknown sampler kernel"):
        samplers.Sampler(kernel="gibbs")
    with pytest.raises(ValueError, match="step_size must be a finite number > 0"):
        samplers.mala(step_size=-1.0)
    with pytest.raises(ValueError, match="target_acceptance must be in"):
        samplers.mala(target_acceptance=1.5)
    with pytest.raises(ValueError, match="ULA has no accept"):
        samplers.ula(target_acceptance=0.5)
    with pytest.raises(ValueError, match="thinning must be an integer"):
        samplers.DrawSettings(thinning=0)
    with pytest.raises(TypeError, match="num_warmup"):  # draw settings are not the kernel's
        samplers.mala(num_warmup=7)
    with pytest.raises(TypeError, match="sampler must be a name"):
        samplers.get_sampler(3)
    assert samplers.get_sampler("hmc").target == 0.65
    assert not samplers.ula().adapts
    assert samplers.DrawSettings().replace(num_warmup=7).num_warmup == 7


def test_flat_logdensity_reshapes_events():
    logdensity = samplers.flat_logdensity(lambda x: jnp.sum(x[0] * x[1]), (2, 3))
    z = jnp.arange(6.0)
    assert float(logdensity(z)) == -float(jnp.sum(z[:3] * z[3:]))


def test_warmup_tunes_then_holds_the_tuned_step_size_fixed():
    """The last iterate of an adaptive chain is not a draw from the target; the second half of
    warm-up runs a fixed, target-invariant kernel with the averaged step size it returns."""
    sampler = samplers.mala()
    states = sampler.init_chains(jnp.zeros((8, 2)), standard_normal)
    _, step_size, info = samplers.warmup(
        jax.random.key(6), sampler, standard_normal, states, num_steps=100
    )
    assert info.step_size.shape == (100,)
    np.testing.assert_allclose(info.step_size[50:], step_size, rtol=1e-6)
    assert float(jnp.std(info.step_size[:50])) > 0.0  # the first half does adapt


@pytest.mark.parametrize("kernel", ["mala", "hmc", "barker"])
def test_one_chain_one_draw_has_the_target_variance(kernel):
    """One chain per call, one draw per chain (what ``EnergyDistribution.sample(key)`` does),
    vmapped over n keys: the n draws are iid, so their variance has standard error
    sqrt(2/n) σ² (Var of a sample variance of Gaussians ≈ 2σ⁴/n); 4.5 standard errors."""
    n = 20_000
    sampler = samplers.get_sampler(kernel)
    settings = samplers.DrawSettings(num_warmup=200)

    def one(key):
        k_init, k_run = jax.random.split(key)
        start = jax.random.normal(k_init, (1, 1))
        draws, _ = samplers.sample_chains(k_run, sampler, standard_normal, start, 1, draws=settings)
        return draws.positions[0, 0, 0]

    x = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(7), n)))
    assert abs(x.var() - 1.0) < 4.5 * np.sqrt(2 / n), x.var()
    assert abs(x.mean()) < 4.5 / np.sqrt(n)


# -- the registry, the step-size rules and the draw settings -----------------------------------


def test_warmup_tunes_in_the_dtype_of_the_chains_under_x64():
    with jax.enable_x64():
        for kernel in ("mala", "hmc", "barker"):
            sampler = samplers.get_sampler(kernel)
            states = sampler.init_chains(jnp.zeros((2, 3), jnp.float64), standard_normal)
            _, h, info = samplers.warmup(jax.random.key(0), sampler, standard_normal, states, 4)
            assert h.dtype == info.step_size.dtype == jnp.float64


def test_the_registry_is_the_one_table_of_kernels():
    assert samplers.KERNELS == tuple(samplers.REGISTRY) == ("mala", "hmc", "ula", "barker")
    for name, kernel in samplers.REGISTRY.items():
        sampler = samplers.get_sampler(name)
        assert sampler.target == samplers.TARGET_ACCEPTANCE[name] == kernel.target_acceptance
        assert sampler.adapts == kernel.adapts and sampler.step_size == kernel.step_size
    assert samplers.Sampler("hmc").step_size == 0.05  # the dataclass default, not the factory's


def test_adapt_step_size_moves_log_h_toward_the_target_and_stays_in_bounds():
    h = jnp.float32(0.1)
    mala = samplers.mala()  # target 0.574
    np.testing.assert_allclose(
        samplers.adapt_step_size(h, 0.874, mala, gain=0.5), 0.1 * np.exp(0.5 * 0.3), rtol=1e-6
    )
    assert samplers.adapt_step_size(h, 0.2, mala, gain=0.5) < h
    assert samplers.adapt_step_size(h, 0.3, mala, gain=0.5).dtype == jnp.float32
    low, high = samplers.STEP_SIZE_BOUNDS
    assert float(samplers.adapt_step_size(h, 1.0, mala, gain=1e3)) == pytest.approx(high)
    assert float(samplers.adapt_step_size(h, 0.0, mala, gain=1e3)) == pytest.approx(low)
    for fixed in (samplers.ula(), samplers.mala(adapt_step_size=False)):  # no adaptation
        np.testing.assert_allclose(samplers.adapt_step_size(h, 1.0, fixed, gain=1.0), h, rtol=1e-6)


def test_adapt_step_size_multiplicative_is_the_ais_rule():
    for h, acc in [(0.1, 0.9), (0.3, 0.2), (5.0, 1.0), (1e-6, 0.0)]:
        expected = np.clip(h * np.exp(2.0 * (acc - 0.65)), *samplers.STEP_SIZE_BOUNDS)
        got = samplers.adapt_step_size_multiplicative(jnp.float32(h), acc, 0.65)
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_sample_chains_reads_warmup_and_thinning_from_its_draw_settings():
    sampler = samplers.mala()
    starts = jnp.zeros((3, 2))
    settings = samplers.DrawSettings(num_warmup=10, thinning=4)
    draws, _ = samplers.sample_chains(
        jax.random.key(8), sampler, standard_normal, starts, 5, draws=settings
    )
    assert draws.positions.shape == (3, 5, 2)
    np.testing.assert_array_equal(draws.step, 4 * np.arange(1, 6))
    np.testing.assert_array_equal(draws.info.num_integration_steps, 4)  # 4 steps per record
    default, _ = samplers.sample_chains(jax.random.key(8), sampler, standard_normal, starts, 5)
    np.testing.assert_array_equal(default.step, np.arange(1, 6))  # DrawSettings(): thinning 1
    with pytest.raises(TypeError, match="DrawSettings"):
        samplers.sample_chains(
            jax.random.key(8), sampler, standard_normal, starts, 5, draws=sampler
        )


def test_draw_settings_are_validated():
    with pytest.raises(ValueError, match="num_warmup must be an integer"):
        samplers.DrawSettings(num_warmup=-1)
    with pytest.raises(ValueError, match="num_chains must be None"):
        samplers.DrawSettings(num_chains=0)
    for bad in (0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="init_scale must be a finite number > 0"):
            samplers.DrawSettings(init_scale=bad)
    assert samplers.DrawSettings() == samplers.DrawSettings(1000, 1, None, 1.0)


@pytest.mark.parametrize("kernel", samplers.KERNELS)
def test_chains_from_cached_values_are_the_states_init_chains_builds(kernel):
    sampler = samplers.get_sampler(kernel)

    def logdensity(x):
        return -0.5 * jnp.sum(x**2 / jnp.array([1.0, 4.0, 0.25]))

    positions = jax.random.normal(jax.random.key(0), (5, 3))
    values, grads = jax.vmap(jax.value_and_grad(logdensity))(positions)
    built = sampler.chains_from(positions, values, grads)
    expected = sampler.init_chains(positions, logdensity)
    assert type(built) is type(expected)
    for got, want in zip(jax.tree.leaves(built), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(got, want)
    # moved from either, the chains are the same
    moved = [samplers.run_chains(jax.random.key(1), sampler, logdensity, s, 0.1, 3)[0]
             for s in (built, expected)]  # fmt: skip
    np.testing.assert_array_equal(moved[0].position, moved[1].position)


def test_chains_from_refuses_values_of_the_wrong_shape():
    sampler = samplers.get_sampler("mala")
    positions = jnp.zeros((5, 3))
    with pytest.raises(ValueError, match=r"gradient of shape \(5, 3\)"):
        sampler.chains_from(positions, jnp.zeros(5), jnp.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"log-density of shape \(5,\)"):
        sampler.chains_from(positions, jnp.zeros((5, 1)), jnp.zeros((5, 3)))


def test_infinite_step_size_and_zero_thinning_are_refused():
    with pytest.raises(ValueError, match="step_size must be a finite number > 0"):
        samplers.mala(step_size=float("inf"))
    logdensity = lambda x: -0.5 * jnp.sum(x**2)
    sampler = samplers.mala()
    states = sampler.init_chains(jnp.zeros((2, 2)), logdensity)
    with pytest.raises(ValueError, match="thinning must be an integer >= 1"):
        samplers.run_chains(jax.random.key(0), sampler, logdensity, states, 0.1, 10, thinning=0)


def test_step_size_bounds_widen_with_the_targets_variances_and_never_narrow():
    assert samplers.step_size_bounds() == samplers.STEP_SIZE_BOUNDS

    def bounds(*variances):
        return tuple(float(b) for b in samplers.step_size_bounds(jnp.array(variances)))

    # by powers of two: at or below the largest variance, at or above the smallest
    assert bounds(0.25, 400.0) == pytest.approx((2.5e-7, 2560.0))
    assert bounds(2.0, 3.0) == pytest.approx((1e-6, 20.0))  # wider: the low end stays
    assert bounds(0.01) == pytest.approx((1e-6 / 64, 10.0))  # narrower: the high end stays
    # about unit scale (standardized data, the fitted variances' jitter): exactly as before
    unit = pytest.approx(samplers.STEP_SIZE_BOUNDS, rel=1e-7)  # float32's 1e-6
    assert bounds(0.6, 1.0015, 1.9) == unit
    assert bounds(float("nan"), float("inf"), 0.0, 1.0) == unit
    h = jnp.float32(1.0)
    wide = samplers.step_size_bounds(jnp.array([400.0]))
    mala = samplers.mala()
    assert float(samplers.adapt_step_size(h, 1.0, mala, 1e3, wide)) == pytest.approx(2560.0)
    assert float(samplers.adapt_step_size_multiplicative(h, 1.0, 0.65, 1e3, wide)) == (
        pytest.approx(2560.0)
    )


def test_ais_with_a_base_whose_variance_is_not_finite():
    """A Cauchy base has no variance (NumPyro: NaN): AIS keeps the bounds of unit scale and
    gets log Z, instead of a NaN step size that freezes the particles."""
    import numpyro.distributions as dist

    base = dist.Cauchy(jnp.zeros(2), 3.0).to_event(1)
    energy = GaussianEnergy(jnp.zeros(2))
    est = ebm.logz.ais(
        energy, (2,), key=jax.random.key(0), base=base, num_temperatures=50, num_particles=200
    )
    assert abs(est.value - float(energy.log_z)) < 4 * est.stderr + 0.01
    assert float(np.min(est.info["acceptance"][1:])) > 0.1


def test_ais_tunes_its_step_size_to_a_wide_target():
    """AIS on N(0, 30²): the step size between temperatures goes past the unit-scale bound of
    10 (MALA's best step near β = 1 is about 1000), and log Z is right."""
    energy = GaussianEnergy(jnp.zeros(2), 900.0 * jnp.eye(2))
    data = 30.0 * jax.random.normal(jax.random.key(0), (1000, 2))
    est = ebm.logz.ais(
        energy, (2,), key=jax.random.key(1), data=data, num_temperatures=50, num_particles=200
    )
    assert abs(est.value - float(energy.log_z)) < 4 * est.stderr + 0.01
    assert float(np.mean(est.info["acceptance"][-10:])) < 0.9  # a tuned step, not a tiny one
