"""The directed generator, its entropy estimators and generator-based training."""

import math
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.stats import norm

import numpyro_ebm as ebm
from numpyro_ebm import generator as gen
from numpyro_ebm import training
from numpyro_ebm.energies import GaussianEnergy
from numpyro_ebm.training import checkpoint


def linear_generator(mean, scale_tril):
    """``x = μ + L z`` with ``z ~ N(0, I)``: exactly ``N(μ, L Lᵀ)``."""
    g = gen.Generator(
        (mean.shape[0],),
        mean.shape[0],
        hidden=(),
        key=jax.random.key(0),
        latent="normal",
        batch_norm=False,
    )
    return eqx.tree_at(lambda g: (g.layers[0].weight, g.layers[0].bias), g, (scale_tril, mean))


def zero_entropy(generator, samples):
    return jnp.zeros(())


# -- the network ---------------------------------------------------------------------------------


def test_generator_shapes_latents_and_noise():
    g = gen.Generator((2, 3), 4, hidden=(16, 16), key=jax.random.key(1), noise_scale=0.2)
    assert g(jax.random.key(2), 7).shape == (7, 2, 3)
    z, eps = g.sample_inputs(jax.random.key(3), 1000)
    assert z.shape == (1000, 4) and eps.shape == (1000, 6)
    assert float(z.min()) >= -1 and float(z.max()) <= 1  # U(−1, 1) latents by default
    np.testing.assert_allclose(jnp.exp(g.log_noise_scale), 0.2, rtol=1e-6)
    # the noise enters additively with scale σ
    x0, _ = g.generate(z, jnp.zeros_like(eps), train=False)
    x1, _ = g.generate(z, eps, train=False)
    np.testing.assert_allclose((x1 - x0) / eps, 0.2, rtol=1e-3)
    deterministic = gen.Generator(2, 4, key=jax.random.key(4))
    assert not deterministic.noisy
    _, eps = deterministic.sample_inputs(jax.random.key(5), 3)
    assert not bool(jnp.any(eps))


def test_generator_rejects_bad_settings():
    with pytest.raises(ValueError, match="latent_dim"):
        gen.Generator(2, 0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="latent"):
        gen.Generator(2, 2, key=jax.random.key(0), latent="cauchy")
    with pytest.raises(ValueError, match="noise_scale"):
        gen.Generator(2, 2, key=jax.random.key(0), noise_scale=0.0)


def test_batch_norm_uses_batch_statistics_in_training_and_running_averages_after():
    g = gen.Generator(2, 3, hidden=(8,), key=jax.random.key(6), momentum=0.5)
    z, eps = g.sample_inputs(jax.random.key(7), 512)
    _, updated = g.generate(z, eps, train=True)
    h = jax.vmap(g.layers[0])(z)
    # running averages move half-way (momentum 0.5) to the batch statistics; nothing else moves
    np.testing.assert_allclose(updated.running_means[0], 0.5 * h.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(updated.running_vars[0], 0.5 + 0.5 * h.var(0), rtol=1e-5, atol=1e-6)
    assert eqx.tree_equal(updated.layers, g.layers)
    # in training mode an output depends on the rest of the batch; sampling mode does not
    x_batch, _ = g.generate(z, eps, train=True)
    x_pair, _ = g.generate(z[:2], eps[:2], train=True)
    assert not np.allclose(x_batch[:2], x_pair)
    x_eval, _ = updated.generate(z, eps, train=False)
    x_eval_pair, _ = updated.generate(z[:2], eps[:2], train=False)
    np.testing.assert_allclose(x_eval[:2], x_eval_pair, rtol=1e-5)
    # the running averages are not trained
    spec = gen.trainable(g)
    assert spec.running_means == (False,) and spec.running_vars == (False,)
    assert spec.scales == (True,) and spec.layers[0].weight is True


# -- entropy estimators --------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 2])
def test_nearest_neighbour_entropy_matches_a_gaussian(dim):
    """Mean over 20 independent batches of 2048 within 4 standard errors of the closed form."""
    estimator = jax.jit(lambda x: gen.NearestNeighbourEntropy()(None, x))
    scale = math.sqrt(0.5)
    values = np.array(
        [
            float(estimator(scale * jax.random.normal(jax.random.key(i), (2048, dim))))
            for i in range(20)
        ]
    )
    truth = 0.5 * dim * math.log(2 * math.pi * math.e * scale**2)
    stderr = values.std(ddof=1) / math.sqrt(len(values))
    assert abs(values.mean() - truth) < 4 * stderr


def test_nearest_neighbour_entropy_shifts_by_log_determinant():
    """H(a x + b) = H(x) + D log a, exactly, for the estimator too (distances scale by a)."""
    x = jax.random.normal(jax.random.key(30), (500, 3))
    h = gen.NearestNeighbourEntropy(k=3)
    np.testing.assert_allclose(h(None, 2.5 * x + 7.0), h(None, x) + 3 * math.log(2.5), atol=1e-3)
    with pytest.raises(ValueError, match="more than k"):
        h(None, x[:3])


def test_batch_norm_entropy_is_the_papers_formula():
    g = gen.Generator(2, 3, hidden=(4, 5), key=jax.random.key(8))
    gammas = (jnp.array([0.5, 1.0, 2.0, 3.0]), jnp.linspace(0.1, 1.0, 5))
    g = eqx.tree_at(lambda g: g.scales, g, gammas)
    expected = sum(
        0.5 * math.log(2 * math.pi * math.e * float(v) ** 2) for gs in gammas for v in gs
    )
    np.testing.assert_allclose(gen.BatchNormEntropy()(g, None), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="batch_norm=True"):
        gen.BatchNormEntropy()(gen.Generator(2, 3, key=jax.random.key(0), batch_norm=False), None)


def test_energy_distance_matches_the_closed_form_for_shifted_normals():
    """N(0,1) vs N(μ,1): 2E|X−Y| − E|X−X'| − E|Y−Y'| with X − Y ~ N(−μ, 2), X − X' ~ N(0, 2)."""
    mu, n = 1.0, 4000
    x = jax.random.normal(jax.random.key(9), (n, 1))
    y = mu + jax.random.normal(jax.random.key(10), (n, 1))
    s = math.sqrt(2.0)
    mean_abs_shifted = s * math.sqrt(2 / math.pi) * math.exp(-(mu**2) / (2 * s**2)) + mu * (
        1 - 2 * norm.cdf(-mu / s)
    )
    exact = 2 * mean_abs_shifted - 2 * s * math.sqrt(2 / math.pi)
    got = float(gen.energy_distance(x, y))
    # U-statistic standard error, order 1/sqrt(n) times the spread of |X − Y| (≈ 1)
    assert abs(got - exact) < 4 / math.sqrt(n)
    same = float(gen.energy_distance(x, jax.random.normal(jax.random.key(11), (n, 1))))
    assert abs(same) < 4 / math.sqrt(n)
    # differentiable, and finite with coinciding points
    grad = jax.grad(lambda a: gen.energy_distance(a, y))(jnp.concatenate([x[:10], x[:10]]))
    assert bool(jnp.all(jnp.isfinite(grad)))


def noisy_linear_generator(mean, scale_tril, noise):
    g = linear_generator(mean, scale_tril)
    return eqx.tree_at(
        lambda g: g.log_noise_scale,
        g,
        jnp.full(mean.shape, math.log(noise)),
        is_leaf=lambda x: x is None,
    )


def test_proposal_log_density_is_the_noisy_generators_density():
    """x = μ + z + σε with z ~ N(0, I): q = N(μ, (1 + σ²) I); the batch estimate matches it."""
    mean, sigma, n = jnp.array([0.5, -1.0]), 0.5, 4000
    g = noisy_linear_generator(mean, jnp.eye(2), sigma)
    z, eps = g.sample_inputs(jax.random.key(31), n)
    means, _ = g.generate(z, jnp.zeros_like(eps), train=False)
    x, _ = g.generate(z, eps, train=False)
    got = gen.proposal_log_density(means, g.log_noise_scale, x)
    var = 1 + sigma**2
    exact = -0.5 * jnp.sum((x - mean) ** 2, 1) / var - jnp.log(2 * jnp.pi * var)
    bulk = jnp.sum((x - mean) ** 2, 1) < 4 * var  # the estimate's relative error grows in tails
    # kernel average over n = 4000 components: relative standard error ~ 2% in the bulk
    assert float(jnp.mean(jnp.abs(got - exact)[bulk])) < 0.05


def test_importance_resampling_restores_the_model_share_of_each_mode():
    """Broad Gaussian proposal, target 0.8 N(−2, ½²) + 0.2 N(2, ½²): resampled share of x > 0."""
    target = ebm.energies.GaussianMixtureEnergy(
        jnp.log(jnp.array([0.8, 0.2])), jnp.array([[-2.0], [2.0]]), jnp.full((2, 1, 1), 0.25)
    )
    g = noisy_linear_generator(jnp.zeros(1), jnp.array([[2.5]]), 0.5)
    n = 4000
    z, eps = g.sample_inputs(jax.random.key(32), n)
    means, _ = g.generate(z, jnp.zeros_like(eps), train=False)
    x, _ = g.generate(z, eps, train=False)
    out = gen.resample_towards_model(jax.random.key(33), target, means, g.log_noise_scale, x)
    share = float(jnp.mean(out.samples[:, 0] > 0))
    assert float(jnp.mean(x[:, 0] > 0)) > 0.4  # the proposal itself is symmetric
    # multinomial resampling from weights with effective sample size ess·n
    assert abs(share - 0.2) < 4 * math.sqrt(0.2 * 0.8 / (float(out.ess) * n)) + 4 * math.sqrt(
        0.2 * 0.8 / n
    )
    # degenerate weights (ESS below the threshold): the batch is returned unchanged
    kept = gen.resample_towards_model(
        jax.random.key(33), target, means, g.log_noise_scale, x, min_ess=1.01
    )
    np.testing.assert_array_equal(kept.samples, x)


def test_get_entropy_by_name():
    assert isinstance(gen.get_entropy("batch_norm"), gen.BatchNormEntropy)
    assert gen.get_entropy("nearest_neighbour") == gen.NearestNeighbourEntropy()
    with pytest.raises(ValueError, match="unknown entropy"):
        gen.get_entropy("vera")


# -- the gradient --------------------------------------------------------------------------------


def test_generator_negatives_give_the_ml_gradient_when_the_generator_is_the_model():
    """A linear generator equal in distribution to a Gaussian energy's model: the energy update
    of the generator-mode training step is the maximum-likelihood gradient."""
    mean = jnp.array([0.3, -0.1])
    tril = jnp.array([[1.2, 0.0], [0.3, 0.8]])
    model = GaussianEnergy(mean, scale_tril=tril)
    generator = linear_generator(mean, tril)
    data = jax.random.multivariate_normal(
        jax.random.key(12), jnp.array([1.0, -2.0]), jnp.eye(2), (256,)
    )
    n = 100_000
    config = ebm.TrainConfig(
        optimizer=optax.sgd(1.0),  # the update is −gradient
        negatives="generator",
        num_chains=n,
        batch_size=256,
        energy_l2=0.0,
        ema_decay=None,
        generator_optimizer=optax.set_to_zero(),  # keep the generator equal to the model
        entropy=zero_entropy,
        track_log_z=False,  # the energy's update does not use it
    ).resolve(schedule_steps=1, generator=generator)
    state = training.energy_init(jax.random.key(13), model, data, config)
    new_state, _ = eqx.filter_jit(training.energy_step)(jax.random.key(14), state, data, config)
    got = jax.tree.map(lambda a, b: a - b, model, new_state.params)
    exact = jax.grad(lambda e: jnp.mean(jax.vmap(e)(data)) + e.log_z)(model)
    # Monte Carlo standard error of the negative-phase term, from per-sample gradients
    samples = generator(jax.random.key(15), n)
    per_sample = jax.vmap(jax.grad(lambda e, x: e(x)), in_axes=(None, 0))(model, samples)
    se = jax.tree.map(lambda g: jnp.std(g, axis=0) / np.sqrt(n), per_sample)
    for g, want, err in zip(
        jax.tree.leaves(got), jax.tree.leaves(exact), jax.tree.leaves(se), strict=True
    ):
        np.testing.assert_array_less(np.abs(g - want), 5 * err + 1e-5)
    # the generator was not changed by its zero update
    assert eqx.tree_equal(new_state.negatives["x"].generator.layers, generator.layers)


def test_generator_loss_is_minimised_by_the_model_among_gaussian_generators():
    """For a Gaussian energy, mean E(G(z)) − H over scaled linear generators x = μ + s L z with
    the exact entropy H = D log s + const is minimised at s = 1 (KL(P_φ ‖ P_θ) = 0)."""
    mean = jnp.array([0.5, 1.0])
    tril = jnp.array([[1.0, 0.0], [0.4, 0.6]])
    model = GaussianEnergy(mean, scale_tril=tril)
    z = jax.random.normal(jax.random.key(16), (200_000, 2))

    def exact_entropy(g, x):
        return jnp.sum(jnp.log(jnp.abs(jnp.diag(g.layers[0].weight))))

    def loss(s):
        g = linear_generator(mean, s * tril)
        params, static = eqx.partition(g, gen.trainable(g))
        return gen.generator_loss(params, static, model, z, jnp.zeros_like(z), exact_entropy)[0]

    scales = jnp.linspace(0.5, 1.5, 101)
    best = float(scales[jnp.argmin(jax.vmap(loss)(scales))])
    assert abs(best - 1.0) < 0.02


# -- fit -------------------------------------------------------------------------------------


def small_fit(data, key, **kwargs):
    # about the negative phase, not log Z: no tracker (its compilation doubles a small fit's)
    defaults = dict(
        track_log_z=False,
        num_steps=20,
        num_chains=64,
        num_mcmc_steps=5,
        batch_size=64,
        steps_per_call=10,
        progress_bar=False,
        generator=gen.Generator(2, 4, hidden=(16,), key=jax.random.key(40), noise_scale=0.1),
    )
    return ebm.fit(GaussianEnergy(jnp.zeros(2)), data, key=key, **{**defaults, **kwargs})


@pytest.mark.parametrize(
    "negatives, entropy",
    [
        ("generator", "batch_norm"),
        ("generator", "nearest_neighbour"),
        ("hybrid", "nearest_neighbour"),
    ],
)
def test_generator_modes_train_and_return_a_generator(negatives, entropy):
    data = jax.random.multivariate_normal(
        jax.random.key(17), jnp.array([1.0, -2.0]), jnp.eye(2), (2000,)
    )
    res = small_fit(
        data,
        jax.random.key(18),
        negatives=negatives,
        entropy=entropy,
        learning_rate=5e-2,
        num_steps=60,
    )
    h = res.history
    assert bool(np.all(h["is_finite"]))
    assert np.all(np.isfinite(h["generator_energy"])) and np.all(
        np.isfinite(h["generator_entropy"])
    )
    if negatives == "hybrid":
        assert np.all(np.isfinite(h["acceptance_rate"])) and np.all(h["amortization"] >= -0.05)
        assert np.all((h["resampling_ess"] > 0) & (h["resampling_ess"] <= 1))
    else:
        assert np.all(np.isnan(h["acceptance_rate"]))
    # the energy moved towards the data
    assert float(jnp.linalg.norm(res.energy.mean - jnp.array([1.0, -2.0]))) < 1.5
    draws = res.generator(jax.random.key(19), 5)
    assert draws.shape == (5, 2) and bool(jnp.all(jnp.isfinite(draws)))
    # the distribution starts its chains at the generator, or returns its draws directly
    d = res.distribution()
    assert d.initializer is res.generator
    assert d.sample(jax.random.key(20), (3,)).shape == (3, 2)
    direct = ebm.EnergyDistribution(
        res.energy, (2,), sampler="initializer", initializer=res.generator
    )
    np.testing.assert_allclose(
        direct.sample(jax.random.key(21), (4,)), res.generator(jax.random.key(21), 4)
    )


def test_generator_settings_are_checked_before_compute():
    data = jax.random.normal(jax.random.key(22), (100, 2))
    with pytest.raises(ValueError, match="shape"):
        small_fit(
            data,
            jax.random.key(23),
            negatives="hybrid",
            generator=gen.Generator(3, 4, key=jax.random.key(0)),
        )
    with pytest.raises(ValueError, match="noise_scale"):
        small_fit(
            data,
            jax.random.key(23),
            negatives="generator",
            generator=gen.Generator(2, 1, key=jax.random.key(0)),
        )
    with pytest.raises(ValueError, match="unknown entropy"):
        small_fit(data, jax.random.key(23), negatives="generator", entropy="magic")
    with pytest.raises(ValueError, match="initializer"):
        ebm.EnergyDistribution(GaussianEnergy(jnp.zeros(2)), (2,), sampler="initializer")
    with pytest.raises(ValueError, match=r"\(n, \*event_shape\)"):
        ebm.EnergyDistribution(
            GaussianEnergy(jnp.zeros(2)),
            (2,),
            initializer=gen.Generator(3, 2, key=jax.random.key(0)),
        )


def test_chains_started_at_a_matching_generator_sample_the_model():
    """Chains started at exact draws (a linear generator equal to the model) need no warm-up:
    after 10 MALA steps the sample moments match the closed form within Monte Carlo error."""
    mean = jnp.array([1.0, -1.0])
    tril = jnp.array([[0.8, 0.0], [0.4, 0.5]])
    energy = GaussianEnergy(mean, scale_tril=tril)
    d = ebm.EnergyDistribution(
        energy,
        (2,),
        log_z=energy.log_z,
        draws=ebm.samplers.DrawSettings(num_warmup=10),
        initializer=linear_generator(mean, tril),
    )
    n = 4000
    x = d.sample(jax.random.key(34), (n,))
    sd = jnp.sqrt(jnp.diag(energy.covariance))
    # one draw per chain, chains independent: standard error sd/√n per coordinate
    np.testing.assert_array_less(jnp.abs(x.mean(0) - mean), 4 * sd / math.sqrt(n))
    # variance: standard error ≈ var·√(2/n) for a Gaussian
    var = jnp.diag(energy.covariance)
    np.testing.assert_array_less(jnp.abs(x.var(0) - var), 4 * var * math.sqrt(2 / n))


def test_hybrid_run_resumes_on_the_same_trajectory(tmp_path, monkeypatch):
    """The generator and its optimizer state are checkpointed with the rest of the state."""
    data = ebm.datasets.toy("8gaussians").sample(jax.random.key(35), 2000)
    settings = dict(negatives="hybrid", num_steps=20, steps_per_call=5, checkpoint_every=10)
    straight = small_fit(data, jax.random.key(36), **settings)
    real_save = checkpoint.save_checkpoint

    def crash_after_first_save(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(checkpoint, "save_checkpoint", crash_after_first_save)
    with pytest.raises(KeyboardInterrupt):
        small_fit(data, jax.random.key(36), checkpoint_dir=tmp_path, **settings)
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    resumed = small_fit(data, jax.random.key(36), checkpoint_dir=tmp_path, **settings)
    for a, b in zip(
        jax.tree.leaves(straight.generator), jax.tree.leaves(resumed.generator), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        straight.history["generator_entropy"], resumed.history["generator_entropy"], rtol=1e-5
    )
    assert not any(name.startswith(".tmp") for name in os.listdir(tmp_path))


class _Rescaled(eqx.Module):
    """``E(y / factor)``: the same density as ``energy``, for data in units ``factor`` times
    smaller."""

    energy: GaussianEnergy
    factor: float = eqx.field(static=True)

    def __call__(self, y):
        return self.energy(y / self.factor)


def test_hybrid_generator_update_is_invariant_to_the_datas_units():
    """One hybrid step on data ``x`` and on ``c·x`` (energy ``E(·/c)``, generator ``c·G``, MALA
    step ``c²h``: every chain and resampling draw is the same up to the factor c) moves the
    generator's shared hidden layer identically: the amortization pull does not depend on the
    data's units. Before it was scaled by the data's spread, the pull was c times stronger on
    ``c·x``. SGD, not Adam, so that the update is proportional to the gradient."""
    c = 10.0
    data = ebm.datasets.toy("8gaussians").sample(jax.random.key(37), 512)
    energy = GaussianEnergy(jnp.array([0.5, -0.5]), scale_tril=2.0 * jnp.eye(2))
    g = gen.Generator(2, 4, hidden=(16,), key=jax.random.key(38), noise_scale=0.1)
    g_c = eqx.tree_at(
        lambda g: (g.layers[-1].weight, g.layers[-1].bias, g.log_noise_scale),
        g,
        (c * g.layers[-1].weight, c * g.layers[-1].bias, g.log_noise_scale + math.log(c)),
    )

    def one_step(energy, data, generator, step_size):
        config = ebm.TrainConfig(
            optimizer=optax.sgd(0.0),
            sampler=ebm.samplers.mala(step_size=step_size),
            negatives="hybrid",
            num_chains=256,
            num_mcmc_steps=2,
            batch_size=64,
            generator_optimizer=optax.sgd(1e-2),
            entropy=gen.NearestNeighbourEntropy(),
            num_recorded_chains=0,
            track_log_z=False,
        ).resolve(schedule_steps=1, generator=generator)
        state = training.energy_init(jax.random.key(39), energy, data, config)
        step = eqx.filter_jit(training.energy_step)  # compiled: faster than op by op
        new, info = step(jax.random.key(40), state, data[:64], config)
        moved = new.negatives["x"].generator.layers[0].weight - generator.layers[0].weight
        return moved, info.sites["x"].metrics

    moved, info = one_step(energy, data, g, 0.05)
    moved_c, info_c = one_step(_Rescaled(energy, c), c * data, g_c, 0.05 * c**2)
    assert float(info["resampling_ess"]) > 0.05  # the resampling ran, in both
    np.testing.assert_allclose(info_c["resampling_ess"], info["resampling_ess"], rtol=1e-3)
    # float32 rounding of c·x and x/c is the only difference: agreement to 1e-3 of the update
    np.testing.assert_allclose(moved_c, moved, atol=1e-3 * float(jnp.max(jnp.abs(moved))))
    # the recorded term is the dimensionless one the weight multiplies
    np.testing.assert_allclose(info_c["amortization"], info["amortization"], rtol=1e-3)


def hybrid_step_config(generator, step_size, num_chains, batch_size, **hybrid):
    """One hybrid step's resolved config: one MALA step of ``step_size``, no tracker, and the
    ``Hybrid`` settings ``hybrid``."""
    config = ebm.TrainConfig(
        sampler=ebm.samplers.mala(step_size=step_size),
        negatives="hybrid",
        num_chains=num_chains,
        num_mcmc_steps=1,
        batch_size=batch_size,
        num_recorded_chains=0,
        track_log_z=False,
    ).resolve(schedule_steps=1, generator=generator)
    return config.replace(negatives=config.negatives.replace(**hybrid))


@pytest.mark.parametrize("fraction", [0.3, 1.0])
def test_hybrid_chains_that_are_not_restarted_continue_from_their_last_negative(fraction):
    """``restart_fraction``: each chain starts from the generator with that probability and
    otherwise from its last negative. The generator draws near (50, 50), the last negatives
    are data rows near 0, and the chains barely move (step size 1e-6): after one step the
    share of negatives near the generator is the fraction within 4 binomial standard errors,
    and the others are the previous negatives."""
    data = jax.random.normal(jax.random.key(60), (512, 2))
    g = gen.Generator(2, 4, hidden=(16,), key=jax.random.key(61), noise_scale=0.1)
    g = eqx.tree_at(lambda g: g.layers[-1].bias, g, jnp.full(2, 50.0))
    config = hybrid_step_config(g, 1e-6, 256, 64, restart_fraction=fraction)
    energy = GaussianEnergy(jnp.zeros(2), scale_tril=30.0 * jnp.eye(2))
    state = training.energy_init(jax.random.key(62), energy, data, config)
    new, _ = training.energy_step(jax.random.key(63), state, data[:64], config)
    before, after = state.negatives["x"].bank, new.negatives["x"].bank
    restarted = np.asarray(jnp.linalg.norm(after - 50.0, axis=1) < 10.0)
    share = restarted.mean()
    assert abs(share - fraction) <= 4 * np.sqrt(fraction * (1 - fraction) / 256) + 1e-9, share
    np.testing.assert_allclose(after[~restarted], before[~restarted], atol=1e-2)
    with pytest.raises(ValueError, match="restart_fraction"):
        config.negatives.replace(restart_fraction=0.0)


def test_generator_and_entropy_settings_are_refused_before_compute():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="noise_scale must be a finite number"):
        gen.Generator(2, 2, key=key, noise_scale=math.inf)
    for momentum in (math.nan, 1.0, -0.1):
        with pytest.raises(ValueError, match="momentum must be in"):
            gen.Generator(2, 2, key=key, momentum=momentum)
    with pytest.raises(ValueError, match="hidden widths"):
        gen.Generator(2, 2, hidden=(8, 0), key=key)
    for k in (0, -1):
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            gen.NearestNeighbourEntropy(k=k)
    with pytest.raises(ValueError, match="max_samples must be an integer >= 6"):
        gen.NearestNeighbourEntropy(max_samples=5)
    with pytest.raises(ValueError, match="at least 2 rows"):
        gen.energy_distance(jnp.zeros((1, 2)), jnp.ones((4, 2)))


def test_generator_negatives_need_two_chains_and_more_than_k():
    adam = optax.adam(1e-3)
    for kind in ("generator", "hybrid"):
        with pytest.raises(ValueError, match="num_chains must be an integer >= 2"):
            ebm.negatives.build(
                kind, num_chains=1, num_recorded_chains=1, entropy="batch_norm", optimizer=adam
            )
        with pytest.raises(ValueError, match=r"exceed the nearest-neighbour entropy's k \(5\)"):
            ebm.negatives.build(kind, num_chains=5, num_recorded_chains=1, optimizer=adam)
    ebm.negatives.build("hybrid", num_chains=2, entropy="batch_norm", num_recorded_chains=1,
                        optimizer=adam)  # fmt: skip


def test_energy_distance_leaves_out_the_pairs_made_from_the_same_sample():
    """Target rows refined from (resampled) rows of x, by a move that keeps N(0, I): both
    batches are N(0, I), the distance 0. Told the sources, the estimate averages to 0 within
    4 Monte Carlo standard errors; blind to them, the dependent pairs bias it by about
    −2/m · E‖X − X'‖ (paired rows) and about −1/m · E‖X − X'‖ (rows resampled uniformly)."""
    m, rho = 128, 0.99

    def one(key):
        k_x, k_move, k_rows = jax.random.split(key, 3)
        x = jax.random.normal(k_x, (m, 2))
        rows = jax.random.randint(k_rows, (m,), 0, m)
        noise = math.sqrt(1 - rho**2) * jax.random.normal(k_move, (m, 2))
        paired, resampled = rho * x + noise, rho * x[rows] + noise
        return jnp.stack([
            gen.energy_distance(x, paired, jnp.arange(m)),
            gen.energy_distance(x, resampled, rows),
            gen.energy_distance(x, paired),
            gen.energy_distance(x, resampled),
        ])  # fmt: skip

    values = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(70), 400)))
    mean, se = values.mean(0), values.std(0, ddof=1) / math.sqrt(len(values))
    assert np.all(np.abs(mean[:2]) < 4 * se[:2]), (mean, se)
    bias = math.sqrt(math.pi) / m  # E‖X − X'‖ = √π for N(0, I₂)
    np.testing.assert_allclose(mean[2:], [-2 * bias, -bias], rtol=0.15)


def test_resampling_reports_the_row_each_sample_is():
    g = noisy_linear_generator(jnp.zeros(1), jnp.array([[2.5]]), 0.5)
    target = GaussianEnergy(jnp.array([1.0]))
    z, eps = g.sample_inputs(jax.random.key(71), 256)
    means, _ = g.generate(z, jnp.zeros_like(eps), train=False)
    x, _ = g.generate(z, eps, train=False)
    out = gen.resample_towards_model(jax.random.key(72), target, means, g.log_noise_scale, x)
    np.testing.assert_array_equal(out.samples, x[out.rows])
    assert len(set(np.asarray(out.rows).tolist())) < 256  # it did resample
    kept = gen.resample_towards_model(
        jax.random.key(72), target, means, g.log_noise_scale, x, min_ess=1.01
    )
    np.testing.assert_array_equal(kept.rows, np.arange(256))


def test_hybrid_amortization_is_zero_when_the_chains_do_not_move():
    """No resampling and chains that barely move (step size 1e-8): the refined negatives are
    the generator's samples, the energy distance between them 0, up to float32 rounding. With
    the pairs (x_i, its own refinement) in the cross term it was −2/m · E‖X − X'‖ / scale,
    about −0.03 here."""
    data = jax.random.normal(jax.random.key(73), (256, 2))
    g = gen.Generator(2, 4, hidden=(16,), key=jax.random.key(74), noise_scale=0.5)
    config = hybrid_step_config(g, 1e-8, 64, 32, resample=False)
    energy = GaussianEnergy(jnp.zeros(2))
    state = training.energy_init(jax.random.key(75), energy, data, config)
    step = eqx.filter_jit(training.energy_step)
    _, info = step(jax.random.key(76), state, data[:32], config)
    assert abs(float(info.sites["x"].metrics["amortization"])) < 1e-3
