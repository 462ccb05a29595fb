"""MaximumLikelihood: the ML gradient of a whole NumPyro model with EBM sites."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro import handlers
from numpyro.contrib.module import eqx_module

import numpyro_ebm as ebm
from numpyro_ebm.training.model import _site_events

# The learners below are about parameters and gradients, not log Z: they run without the log Z
# tracker (``track_log_z=False``), whose compilation would double each test's time. The
# tracker in ``MaximumLikelihood`` is tested in test_training.py.


def scaled_energy(mu, log_sigma):
    """E(x) = ½‖x − μ‖² / σ²: log Z = d log σ + (d/2) log 2π depends on σ."""
    return jax.tree_util.Partial(
        lambda m, s, x: 0.5 * jnp.sum((x - m) ** 2) * jnp.exp(-2 * s), mu, log_sigma
    )


def gaussian_model(x, y):
    mu = numpyro.param("mu", jnp.zeros(2))
    log_sigma = numpyro.param("log_sigma", jnp.zeros(()))
    b = numpyro.param("b", jnp.zeros(()))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", ebm.EnergyDistribution(scaled_energy(mu, log_sigma), (2,)), obs=x)
    with numpyro.plate("other", y.shape[0]):
        numpyro.sample("y", dist.Normal(b, 1.0), obs=y)


def test_update_follows_the_exact_ml_gradient():
    """One SGD step recovers the gradient; with data drawn from the model itself the chains
    (started at data) are exact, so the EBM site's gradient equals the exact NLL gradient up to
    the Monte Carlo error of the negatives' mean, and the Normal site's gradient is exact."""
    n, num_chains, lr = 500, 4096, 1e-3
    x = 0.7 * jax.random.normal(jax.random.key(0), (n, 2))  # model at mu=0, sigma=0.7
    y = 1.0 + jax.random.normal(jax.random.key(1), (50,))
    learner = ebm.MaximumLikelihood(
        gaussian_model,
        optax.sgd(lr),
        num_chains=num_chains,
        ema_decay=None,
        energy_l2=0.0,
        track_log_z=False,
    )
    state = learner.init(jax.random.key(2), x, y)
    state = state._replace(params={**state.params, "log_sigma": jnp.log(0.7)})
    new, info = learner.update(jax.random.key(3), state, x, y)
    grad = jax.tree.map(lambda a, b: (a - b) / lr, state.params, new.params)

    sigma = 0.7
    exact_mu = -jnp.sum(x, axis=0) / sigma**2  # Σ ∇_μ E(x_i); ∇_μ log Z = 0
    exact_log_sigma = -jnp.sum(x**2) / sigma**2 + n * 2  # Σ −‖x‖²/σ² + N d
    # MC error of N × mean over chains: sd of ∇_μ E under the model is 1/σ per coordinate, of
    # ∇_{log σ} E it is sqrt(2d) = 2; the chains are not independent of the data (restarts),
    # so allow 5 standard errors
    se_mu = n / sigma / np.sqrt(num_chains)
    se_log_sigma = n * 2.0 / np.sqrt(num_chains)
    assert np.all(np.abs(grad["mu"] - exact_mu) < 5 * se_mu), (grad["mu"], exact_mu)
    assert abs(grad["log_sigma"] - exact_log_sigma) < 5 * se_log_sigma
    np.testing.assert_allclose(grad["b"], -jnp.sum(y - 0.0), rtol=1e-4)  # Normal site, exact
    assert bool(info.is_finite)
    assert set(info.sites) == {"x"}


def test_run_recovers_the_gaussian_mle():
    key = jax.random.key(4)
    x = jnp.array([1.0, -2.0]) + 0.5 * jax.random.normal(key, (2000, 2))
    y = jnp.zeros((1,))

    learner = ebm.MaximumLikelihood(
        gaussian_model, optax.adam(0.03, b1=0.5), num_chains=256, track_log_z=False
    )
    res = learner.run(jax.random.key(5), 600, x, y, progress_bar=False)
    mle_mu = jnp.mean(x, axis=0)
    mle_sigma = jnp.sqrt(jnp.mean((x - mle_mu) ** 2))
    # each step's negatives estimate the model mean with sd 0.5/√256 = 0.031; the averaged
    # parameters must sit well inside that
    np.testing.assert_allclose(res.params["mu"], mle_mu, atol=0.03)
    assert abs(float(jnp.exp(res.params["log_sigma"])) - float(mle_sigma)) < 0.03
    assert res.history["x.acceptance_rate"][-100:].mean() == pytest.approx(0.574, abs=0.05)
    assert res.history["loss"].shape == (600,) and res.history["is_finite"].all()


def test_eqx_module_sites_and_subsampling_train():
    def model(data):
        energy = eqx_module(
            "energy", ebm.energies.MLPEnergy(2, hidden=(16,), key=jax.random.key(0))
        )
        with numpyro.plate("data", data.shape[0], subsample_size=64):
            batch = numpyro.subsample(data, event_dim=1)
            numpyro.sample("x", ebm.EnergyDistribution(energy, (2,)), obs=batch)

    data = ebm.datasets.toy("8gaussians").sample(jax.random.key(1), 1000)
    learner = ebm.MaximumLikelihood(
        model, optax.adam(1e-3), num_chains=64, num_mcmc_steps=5, track_log_z=False
    )
    res = learner.run(jax.random.key(2), 30, data, progress_bar=False, steps_per_call=10)
    before = learner.init(jax.random.key(2), data).params["energy$params"]
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, res.params["energy$params"])
    assert any(jax.tree.leaves(changed))
    assert res.state.negatives["x"].bank.shape == (64, 2)


def test_latent_sites_and_models_without_params_are_rejected():
    def latent(x):
        numpyro.param("a", 0.0)
        numpyro.sample("z", dist.Normal())

    with pytest.raises(ValueError, match="latent"):
        ebm.MaximumLikelihood(latent, optax.adam(1e-3)).init(jax.random.key(0), None)

    def no_params(x):
        numpyro.sample("x", dist.Normal(), obs=x)

    with pytest.raises(ValueError, match=r"no numpyro\.param"):
        ebm.MaximumLikelihood(no_params, optax.adam(1e-3)).init(jax.random.key(0), jnp.zeros(3))
    with pytest.raises(ValueError, match="unknown negatives"):
        ebm.MaximumLikelihood(no_params, optax.adam(1e-3), negatives="cd")
    with pytest.raises(TypeError, match="optax"):
        ebm.MaximumLikelihood(no_params, "adam")
    bad = jnp.zeros((10, 2)).at[3, 1].set(jnp.nan)
    with pytest.raises(ValueError, match="site 'x'"):
        ebm.MaximumLikelihood(gaussian_model, optax.adam(1e-3)).init(
            jax.random.key(0), bad, jnp.zeros(2)
        )


def test_constrained_params_are_optimised_unconstrained():
    def model(x):
        scale = numpyro.param("scale", 1.0, constraint=dist.constraints.positive)
        energy = jax.tree_util.Partial(lambda s, v: 0.5 * jnp.sum(v**2) / s**2, scale)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", ebm.EnergyDistribution(energy, (1,)), obs=x)

    x = 3.0 * jax.random.normal(jax.random.key(0), (500, 1))
    learner = ebm.MaximumLikelihood(model, optax.adam(0.05), num_chains=256, track_log_z=False)
    res = learner.run(jax.random.key(1), 300, x, progress_bar=False)
    assert float(res.params["scale"]) == pytest.approx(float(jnp.std(x)), abs=0.3)
    assert float(res.params["scale"]) > 0


def test_handlers_treat_ebm_sites_like_any_site():
    energy = ebm.energies.GaussianEnergy(jnp.zeros(2))
    d = ebm.EnergyDistribution(energy, (2,), log_z=energy.log_z)

    def model():
        return numpyro.sample("x", d)

    tr = handlers.trace(handlers.seed(model, jax.random.key(0))).get_trace()
    assert tr["x"]["value"].shape == (2,) and not tr["x"]["is_observed"]
    value = jnp.array([0.5, -1.0])
    tr = handlers.trace(handlers.substitute(model, data={"x": value})).get_trace()
    np.testing.assert_allclose(tr["x"]["value"], value)
    tr = handlers.trace(handlers.condition(model, data={"x": value})).get_trace()
    assert tr["x"]["is_observed"]
    log_joint, _ = numpyro.infer.util.log_density(model, (), {}, {"x": value})
    np.testing.assert_allclose(
        log_joint, dist.MultivariateNormal(jnp.zeros(2), jnp.eye(2)).log_prob(value), rtol=1e-5
    )


def test_ebm_prior_with_gaussian_likelihood_matches_the_analytic_posterior():
    """A Gaussian energy as the PRIOR, Gaussian observations: NUTS must give the conjugate
    posterior N(m, S), S = (S0⁻¹ + K R⁻¹)⁻¹, m = S (S0⁻¹ m0 + R⁻¹ Σ y_k)."""
    m0 = jnp.array([1.0, -1.0])
    s0 = jnp.array([[1.0, 0.5], [0.5, 2.0]])
    r = 0.5 * jnp.eye(2)
    y = jnp.array([[0.3, 0.2], [0.8, -0.5], [0.1, 0.4]])
    prior = ebm.EnergyDistribution(ebm.energies.GaussianEnergy(m0, s0), (2,))

    def model(y):
        x = numpyro.sample("x", prior)
        with numpyro.plate("obs", y.shape[0]):
            numpyro.sample("y", dist.MultivariateNormal(x, r), obs=y)

    mcmc = numpyro.infer.MCMC(
        numpyro.infer.NUTS(model), num_warmup=500, num_samples=4000, progress_bar=False
    )
    mcmc.run(jax.random.key(6), y)
    x = np.asarray(mcmc.get_samples()["x"], np.float64)
    s_post = np.linalg.inv(np.linalg.inv(s0) + y.shape[0] * np.linalg.inv(r))
    m_post = s_post @ (np.linalg.solve(s0, m0) + np.linalg.solve(r, y.sum(0)))
    ess = float(np.min(numpyro.diagnostics.effective_sample_size(x[None])))
    # standard errors of a mean and of a covariance entry from ess effective draws
    se_mean = np.sqrt(np.diag(s_post) / ess)
    d = np.sqrt(np.diag(s_post))
    se_cov = np.sqrt((np.outer(d, d) ** 2 + s_post**2) / ess)
    np.testing.assert_array_less(np.abs(x.mean(0) - m_post), 5 * se_mean)
    np.testing.assert_array_less(np.abs(np.cov(x.T) - s_post), 5 * se_cov)


def _scale_posterior(log_z_of):
    """NUTS over log σ of E(x) = ½x²/σ², with ``log_z_of(energy, log_sigma)`` as log Z."""

    def model(x):
        log_sigma = numpyro.sample("log_sigma", dist.Normal(0.0, 1.0))
        energy = jax.tree_util.Partial(
            lambda s, v: 0.5 * jnp.sum(v**2) * jnp.exp(-2 * s), log_sigma
        )
        d = ebm.EnergyDistribution(energy, (1,), log_z=log_z_of(energy, log_sigma))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", d, obs=x)

    x = 1.5 * jax.random.normal(jax.random.key(7), (20, 1))
    mcmc = numpyro.infer.MCMC(
        numpyro.infer.NUTS(model), num_warmup=500, num_samples=3000, progress_bar=False
    )
    mcmc.run(jax.random.key(8), x)
    draws = np.asarray(mcmc.get_samples()["log_sigma"], np.float64)
    ess = float(numpyro.diagnostics.effective_sample_size(draws[None]))
    # the exact posterior of log σ by quadrature: N(0, 1) prior × Π N(x_i; 0, σ²)
    grid = np.linspace(-3, 4, 20001)
    sum_sq = float(jnp.sum(x**2))
    log_post = -0.5 * grid**2 - x.shape[0] * grid - 0.5 * sum_sq * np.exp(-2 * grid)
    weights = np.exp(log_post - log_post.max())
    weights /= weights.sum()
    mean = float(np.sum(weights * grid))
    sd = float(np.sqrt(np.sum(weights * (grid - mean) ** 2)))
    return draws.mean(), mean, sd / np.sqrt(ess)


def test_nuts_over_energy_parameters_needs_log_z_of_theta():
    """Doubly intractable: the likelihood of θ is exp(−E_θ(x)) / Z(θ). Dropping Z(θ) (log_z=0)
    gives a wrong posterior; Z(θ) exact or by traced quadrature gives the right one."""
    wrong, truth, se = _scale_posterior(lambda energy, s: 0.0)
    assert abs(wrong - truth) > 20 * se, (wrong, truth, se)

    exact, truth, se = _scale_posterior(lambda energy, s: s + 0.5 * jnp.log(2 * jnp.pi))
    assert abs(exact - truth) < 5 * se, (exact, truth, se)

    by_grid, truth, se = _scale_posterior(
        lambda energy, s: ebm.logz.grid_traced(energy, [[-40.0, 40.0]], 2048)
    )
    assert abs(by_grid - truth) < 5 * se, (by_grid, truth, se)


def test_predictive_uses_the_trained_params():
    """Params from MaximumLikelihood go into Predictive like SVI's: the EBM site then samples
    by MCMC from the trained energy."""

    def model(n, x=None):
        mu = numpyro.param("mu", jnp.zeros(2))
        log_sigma = numpyro.param("log_sigma", jnp.zeros(()))
        d = ebm.EnergyDistribution(
            scaled_energy(mu, log_sigma), (2,), draws=ebm.samplers.DrawSettings(num_warmup=300)
        )
        with numpyro.plate("data", n):
            numpyro.sample("x", d, obs=x)

    x = jnp.array([2.0, -1.0]) + 0.5 * jax.random.normal(jax.random.key(9), (1000, 2))
    learner = ebm.MaximumLikelihood(
        model, optax.adam(0.03, b1=0.5), num_chains=256, track_log_z=False
    )
    res = learner.run(jax.random.key(10), 400, 1000, x, progress_bar=False)
    out = numpyro.infer.Predictive(model, params=res.params, num_samples=1)(
        jax.random.key(11), 2000
    )
    draws = np.asarray(out["x"]).reshape(-1, 2)
    sigma = float(jnp.exp(res.params["log_sigma"]))
    # 2000 independent chains: the mean's standard error is sigma / sqrt(2000)
    np.testing.assert_array_less(
        np.abs(draws.mean(0) - np.asarray(res.params["mu"])), 5 * sigma / np.sqrt(2000)
    )
    np.testing.assert_allclose(draws.std(0), sigma, rtol=0.1)  # se of a std: 1.6%


# -- conditional energies ----------------------------------------------------------------------


def linear_gaussian(a, log_s):
    """E(y | c) = ½ (y − a c)² / s²: the regression y ~ N(a c, s²)."""
    return jax.tree_util.Partial(
        lambda a, ls, y, c: 0.5 * jnp.sum((y - a * c) ** 2) * jnp.exp(-2 * ls), a, log_s
    )


def test_conditional_log_prob_and_sampling_per_condition():
    a, log_s = jnp.array(1.5), jnp.log(0.5)
    conditions = jnp.array([[-2.0], [3.0]])
    log_z = log_s + 0.5 * jnp.log(2 * jnp.pi)
    d = ebm.EnergyDistribution(
        linear_gaussian(a, log_s),
        (1,),
        log_z=log_z,
        condition=conditions,
        draws=ebm.samplers.DrawSettings(num_warmup=300),
    )
    assert d.batch_shape == (2,) and d.event_shape == (1,)
    y = jnp.array([[[-3.0], [4.0]], [[0.0], [5.0]]])  # (sample 2, batch 2, event 1)
    expected = dist.Normal(a * conditions[:, 0], 0.5).log_prob(y[..., 0])
    np.testing.assert_allclose(d.log_prob(y), expected, rtol=1e-5)

    samples = d.sample(jax.random.key(12), (2000,))
    assert samples.shape == (2000, 2, 1)
    # 2000 independent chains per condition: the mean's standard error is 0.5 / sqrt(2000)
    np.testing.assert_array_less(
        np.abs(samples.mean(0)[:, 0] - a * conditions[:, 0]), 5 * 0.5 / np.sqrt(2000)
    )
    np.testing.assert_allclose(samples.std(0)[:, 0], 0.5, rtol=0.1)

    with pytest.raises(ValueError, match="condition"):
        ebm.EnergyDistribution(linear_gaussian(a, log_s), (1,), condition=1.0)
    with pytest.raises(ValueError, match="NaN or inf"):
        ebm.EnergyDistribution(
            linear_gaussian(a, log_s), (1,), condition=conditions.at[0, 0].set(jnp.inf)
        )
    with pytest.raises(ValueError, match="ONE condition"):
        ebm.EnergyDistribution(scaled_energy(jnp.zeros(1), 0.0), (1,), condition=conditions)


def test_maximum_likelihood_refuses_a_site_whose_observed_rows_are_one_point():
    learner = ebm.MaximumLikelihood(gaussian_model, optax.adam(0.1), track_log_z=False)
    with pytest.raises(ValueError, match=r"site 'x'.* all the same point"):
        learner.run(jax.random.key(0), 2, jnp.ones((10, 2)), jnp.zeros(3), progress_bar=False)


def test_maximum_likelihood_of_a_conditional_energy_recovers_least_squares():
    c = jax.random.uniform(jax.random.key(13), (1000, 1), minval=-2, maxval=2)
    y = 0.8 * c + 0.3 * jax.random.normal(jax.random.key(14), (1000, 1))

    def model(c, y):
        a = numpyro.param("a", 0.0)
        log_s = numpyro.param("log_s", 0.0)
        d = ebm.EnergyDistribution(linear_gaussian(a, log_s), (1,), condition=c)
        with numpyro.plate("data", c.shape[0]):
            numpyro.sample("y", d, obs=y)

    learner = ebm.MaximumLikelihood(model, optax.adam(0.03, b1=0.5), num_mcmc_steps=10)
    res = learner.run(jax.random.key(15), 500, c, y, progress_bar=False)
    a_hat = float(jnp.sum(c * y) / jnp.sum(c * c))
    s_hat = float(jnp.sqrt(jnp.mean((y - a_hat * c) ** 2)))
    # one chain per point (1000 per step): the negative phase's noise on a is ~s/sqrt(1000·var c)
    assert float(res.params["a"]) == pytest.approx(a_hat, abs=0.03)
    assert float(jnp.exp(res.params["log_s"])) == pytest.approx(s_hat, abs=0.03)


def test_a_conditional_site_pairs_one_observed_event_with_every_condition():
    """An observed value that only broadcasts against the conditions (one event, three
    conditions) is each condition's event, as ``log_prob`` pairs them."""
    conditions = jnp.array([[-2.0], [0.0], [3.0]])
    d = ebm.EnergyDistribution(linear_gaussian(0.5, 0.0), (1,), condition=conditions)
    events, paired, lead_shape = _site_events({"value": jnp.array([1.0])}, d)
    assert lead_shape == (3,) and events.shape == (3, 1)
    np.testing.assert_array_equal(paired, conditions)
    energies = jax.vmap(d.energy)(events, paired)
    np.testing.assert_allclose(-energies - d.log_z, d.log_prob(jnp.array([1.0])), rtol=1e-6)


def test_conditional_ebm_beats_every_gaussian_conditional_on_a_two_branch_response():
    """y | x ~ ½ N(x, 0.2²) + ½ N(−x, 0.2²): a short MaximumLikelihood run of a conditional MLP
    energy, normalised per test x by quadrature over y, has a lower held-out NLL than the
    population-optimal Gaussian conditional N(0, x² + 0.04)."""

    def sample(key, n):
        k_x, k_b, k_e = jax.random.split(key, 3)
        x = jax.random.uniform(k_x, (n, 1), minval=-2.0, maxval=2.0)
        sign = jnp.where(jax.random.bernoulli(k_b, 0.5, (n, 1)), 1.0, -1.0)
        return x, sign * x + 0.2 * jax.random.normal(k_e, (n, 1))

    template = ebm.energies.MLPEnergy(2, hidden=(32, 32), key=jax.random.key(16))

    def energy_of(net):
        return jax.tree_util.Partial(lambda net, y, c: net(jnp.concatenate([y, c])), net)

    def model(x, y):
        net = eqx_module("energy", template)
        with numpyro.plate("data", x.shape[0], subsample_size=256) as rows:
            d = ebm.EnergyDistribution(energy_of(net), (1,), condition=x[rows])
            numpyro.sample("y", d, obs=y[rows])

    x, y = sample(jax.random.key(17), 2000)
    learner = ebm.MaximumLikelihood(model, optax.adam(3e-3, b1=0.5))
    res = learner.run(jax.random.key(18), 600, x, y, progress_bar=False)
    trained = energy_of(
        eqx.combine(res.params["energy$params"], eqx.partition(template, eqx.is_inexact_array)[1])
    )
    x_test, y_test = sample(jax.random.key(19), 1000)
    grid = jnp.linspace(-4.0, 4.0, 513)
    mid, cell = 0.5 * (grid[1:] + grid[:-1])[:, None], grid[1] - grid[0]

    def nll(c, v):
        log_z = jax.nn.logsumexp(-jax.vmap(lambda g: trained(g, c))(mid)) + jnp.log(cell)
        return trained(v, c) + log_z

    ebm_nll = np.asarray(jax.vmap(nll)(x_test, y_test), np.float64)
    gauss_nll = -np.asarray(
        jax.scipy.stats.norm.logpdf(y_test[:, 0], 0.0, jnp.sqrt(x_test[:, 0] ** 2 + 0.04))
    )
    diff = gauss_nll - ebm_nll
    assert diff.mean() > 5 * diff.std(ddof=1) / np.sqrt(diff.size), diff.mean()


def test_energy_l2_leaves_the_density_parameters_the_pure_ml_gradient():
    """The penalty moves only free additive constants: an energy without one (μ, σ here) takes
    exactly the same step with and without it."""
    x = 0.7 * jax.random.normal(jax.random.key(40), (200, 2))
    y = jnp.ones((5,))
    steps = {}
    for l2 in (0.0, 1.0):
        learner = ebm.MaximumLikelihood(
            gaussian_model,
            optax.sgd(1e-3),
            num_chains=64,
            ema_decay=None,
            energy_l2=l2,
            track_log_z=False,
        )
        state = learner.init(jax.random.key(41), x, y)
        steps[l2] = learner.update(jax.random.key(42), state, x, y)[0].params
    for name in ("mu", "log_sigma", "b"):  # float32 rounding of two backward passes aside
        np.testing.assert_allclose(steps[0.0][name], steps[1.0][name], rtol=1e-6, atol=1e-9)


def test_energy_l2_is_per_data_point_as_in_fit():
    """Same meaning as in fit: ``α (mean E(obs)² + mean E(neg)²)`` per observed point (N times
    that for the site, N counting the plate's scale), its gradient on every parameter."""
    data = ebm.datasets.toy("8gaussians").sample(jax.random.key(43), 64)
    energy = ebm.energies.MLPEnergy(2, hidden=(8,), key=jax.random.key(44))

    def model(data):
        e = eqx_module("energy", energy)
        # 64 points standing for 256 (as a subsampling plate's scale would say)
        with numpyro.plate("data", data.shape[0]), handlers.scale(scale=4.0):
            numpyro.sample("x", ebm.EnergyDistribution(e, (2,)), obs=data)

    lr, alpha = 1e-3, 0.5
    new = {}
    for l2 in (0.0, alpha):
        learner = ebm.MaximumLikelihood(
            model,
            optax.sgd(lr),
            num_chains=32,
            num_mcmc_steps=3,
            ema_decay=None,
            energy_l2=l2,
            track_log_z=False,
        )
        state = learner.init(jax.random.key(45), data)
        new[l2] = learner.update(jax.random.key(46), state, data)[0]
    before = state.params["energy$params"]
    static = eqx.filter(energy, eqx.is_inexact_array, inverse=True)
    negatives = new[alpha].negatives["x"].bank  # persistent chains: the step's negatives
    np.testing.assert_array_equal(negatives, new[0.0].negatives["x"].bank)

    def penalty(params):
        e = eqx.combine(params, static)
        return jnp.mean(jax.vmap(e)(data) ** 2) + jnp.mean(jax.vmap(e)(negatives) ** 2)

    grad = jax.grad(penalty)(before)
    after = {l2: s.params["energy$params"] for l2, s in new.items()}
    # −lr · d(N α penalty)/dθ with N = 256, on top of the maximum-likelihood step
    for a, b, g in zip(
        *(jax.tree.leaves(t) for t in (after[alpha], after[0.0], grad)), strict=True
    ):
        np.testing.assert_allclose(a - b, -lr * 256 * alpha * g, rtol=1e-3, atol=1e-6)


class SiluMLPEnergy(eqx.Module):
    """An energy as equinox users write it: eqx.nn.MLP keeps its activation as a field.
    ``E(x) = mlp(x) + ½‖x‖²``; with the MLP's last layer zeroed it is exactly N(0, I)."""

    mlp: eqx.nn.MLP

    def __init__(self, dim, *, key, zero_last=False):
        mlp = eqx.nn.MLP(dim, "scalar", 8, 2, activation=jax.nn.silu, key=key)
        if zero_last:
            last = mlp.layers[-1]
            mlp = eqx.tree_at(lambda m: (m.layers[-1].weight, m.layers[-1].bias), mlp,
                              (jnp.zeros_like(last.weight), jnp.zeros_like(last.bias)))  # fmt: skip
        self.mlp = mlp

    def __call__(self, x):
        return self.mlp(x) + 0.5 * jnp.sum(x**2)


def test_maximum_likelihood_trains_an_eqx_nn_mlp_energy():
    def model(data):
        energy = eqx_module("energy", SiluMLPEnergy(2, key=jax.random.key(50)))
        with numpyro.plate("data", data.shape[0]):
            numpyro.sample("x", ebm.EnergyDistribution(energy, (2,)), obs=data)

    data = jax.random.normal(jax.random.key(51), (128, 2))
    learner = ebm.MaximumLikelihood(
        model, optax.adam(1e-3), num_chains=32, num_mcmc_steps=3, track_log_z=False
    )
    res = learner.run(jax.random.key(52), 20, data, progress_bar=False, steps_per_call=10)
    before = learner.init(jax.random.key(52), data).params["energy$params"]
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, res.params["energy$params"])
    assert any(jax.tree.leaves(moved)) and res.history["is_finite"].all()


@pytest.mark.parametrize(
    "energy",
    [SiluMLPEnergy(2, key=jax.random.key(53), zero_last=True), lambda x: 0.5 * jnp.sum(x**2)],
    ids=["eqx.nn.MLP", "plain function"],
)
def test_energy_distribution_with_static_leaves_under_jit_and_nuts(energy):
    """Both energies are exactly ½‖x‖², i.e. N(0, I) with log Z = log 2π."""
    traces = []

    @jax.jit
    def log_prob(d, x):
        traces.append(1)  # runs only while tracing
        return d.log_prob(x)

    x = jnp.array([0.3, -1.2])
    exact = dist.Normal().log_prob(x).sum()
    for _ in range(2):  # a new distribution object each call: the same trace
        d = ebm.EnergyDistribution(energy, (2,), log_z=jnp.log(2 * jnp.pi))
        np.testing.assert_allclose(log_prob(d, x), exact, rtol=1e-5)
    assert len(traces) == 1

    def model():
        numpyro.sample("x", ebm.EnergyDistribution(energy, (2,)))

    mcmc = numpyro.infer.MCMC(
        numpyro.infer.NUTS(model), num_warmup=300, num_samples=2000, progress_bar=False
    )
    mcmc.run(jax.random.key(54))
    draws = np.asarray(mcmc.get_samples()["x"])
    # N(0, I): NUTS draws are nearly independent here; 5 standard errors with an effective
    # size of at least half the draws (se of the mean √(2/n), of the variance √(2·2/n))
    n = draws.shape[0]
    np.testing.assert_array_less(np.abs(draws.mean(0)), 5 * np.sqrt(2 / n))
    np.testing.assert_array_less(np.abs(draws.var(0) - 1), 5 * np.sqrt(4 / n))
