"""Score-matching objectives: closed forms, their expectations, and training through ``fit``."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
import pytest

import numpyro_ebm as ebm
from numpyro_ebm.energies import GaussianEnergy, MLPEnergy, NoiseConditionalEnergy
from numpyro_ebm.training import (
    DenoisingScoreMatching,
    ScoreMatching,
    SlicedScoreMatching,
    build_objective,
)

MEAN = jnp.array([1.0, -0.5, 0.3])
COV = jnp.array([[1.0, 0.6, 0.2], [0.6, 1.5, -0.3], [0.2, -0.3, 0.5]])


def gaussian_data(key, n=20_000):
    return jax.random.multivariate_normal(key, MEAN, COV, (n,))


def test_score_matching_loss_of_a_gaussian_is_its_closed_form():
    energy = GaussianEnergy(MEAN, COV)
    x = jax.random.normal(jax.random.key(0), (5, 3))
    precision = jnp.linalg.inv(COV)
    score = (x - MEAN) @ precision  # ∇ₓE
    expected = 0.5 * jnp.sum(score**2, axis=1) - jnp.trace(precision)
    terms = ScoreMatching().terms(energy, x, None)
    np.testing.assert_allclose(terms.per_event, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(terms.metrics["score_matching_loss"], expected.mean(), rtol=1e-5)
    # an event of any shape (here 2×2 images): the Hessian is taken of the flattened event
    flat_energy = GaussianEnergy(jnp.zeros(4), jnp.diag(jnp.array([1.0, 2.0, 0.5, 1.5])))
    images = jax.random.normal(jax.random.key(1), (5, 2, 2))
    as_images = ScoreMatching().terms(lambda z: flat_energy(jnp.ravel(z)), images, None)
    as_vectors = ScoreMatching().terms(flat_energy, images.reshape(5, 4), None)
    np.testing.assert_allclose(as_images.per_event, as_vectors.per_event, rtol=1e-6)


@pytest.mark.parametrize("projection", ["rademacher", "gaussian"])
@pytest.mark.parametrize("variance_reduction", [True, False])
def test_sliced_score_matching_equals_score_matching_in_expectation(projection, variance_reduction):
    energy = MLPEnergy(3, hidden=(16, 16), key=jax.random.key(1))
    x = 1.5 * jax.random.normal(jax.random.key(2), (4, 3))
    exact = ScoreMatching().terms(energy, x, None).per_event
    ssm = SlicedScoreMatching(1, variance_reduction, projection)
    keys = jax.random.split(jax.random.key(3), 4000)
    draws = jax.vmap(lambda k: ssm.terms(energy, x, None, key=k).per_event)(keys)  # (4000, 4)
    mean = draws.mean(0)
    stderr = draws.std(0) / np.sqrt(draws.shape[0])
    assert np.all(stderr > 0)
    # each event's sliced loss is unbiased for its exact loss: within 4 standard errors
    assert np.all(np.abs(mean - exact) < 4 * stderr), (mean, exact, stderr)


def test_denoising_loss_is_minimised_by_the_blurred_score():
    """For N(μ, Σ) data, the DSM loss at σ is smallest at the score of N(μ, Σ + σ²I)."""
    sigma = 0.5
    data = gaussian_data(jax.random.key(4), 200_000)
    dsm = DenoisingScoreMatching(sigma)
    key = jax.random.key(5)

    def loss(scale):  # covariance Σ + scale · I
        energy = GaussianEnergy(MEAN, COV + scale * jnp.eye(3))
        return float(dsm.terms(energy, data, None, key=key).per_event.mean())

    grid = [0.0, 0.15, 0.25, 0.35, 0.5]
    losses = [loss(s) for s in grid]
    assert int(np.argmin(losses)) == grid.index(0.25), losses


def fit_gaussian(objective, key, **settings):
    data = gaussian_data(jax.random.key(6))
    res = ebm.fit(
        GaussianEnergy(jnp.zeros(3)),
        data,
        key=key,
        objective=objective,
        num_steps=600,
        batch_size=512,
        learning_rate=2e-2,
        track_log_z=False,
        progress_bar=False,
        **settings,
    )
    return data, res


def test_score_matching_recovers_the_gaussian_mle_without_chains():
    data, res = fit_gaussian("sm", jax.random.key(7))
    # Score matching's optimum in the Gaussian family is the MLE: the data's mean and
    # covariance. What separates the averaged iterate from it is the minibatch noise (512
    # events a step, Adam at 2e-3 at the end, averaging over ~200 steps): about 0.01 per entry.
    np.testing.assert_allclose(res.energy.mean, data.mean(0), atol=0.05)
    np.testing.assert_allclose(res.energy.covariance, jnp.cov(data.T), atol=0.05)
    assert res.config.negatives_name == "none" and res.chains is None
    assert np.all(np.isnan(res.history["acceptance_rate"]))
    loss = res.history["score_matching_loss"]
    assert loss[-50:].mean() < loss[:10].mean()


def test_denoising_score_matching_recovers_the_blurred_covariance():
    sigma = 0.5
    data, res = fit_gaussian(DenoisingScoreMatching(sigma), jax.random.key(8))
    np.testing.assert_allclose(res.energy.mean, data.mean(0), atol=0.05)
    blurred = jnp.cov(data.T) + sigma**2 * jnp.eye(3)
    np.testing.assert_allclose(res.energy.covariance, blurred, atol=0.06)
    # and not the data's own: the σ² = 0.25 on the diagonal is well outside the tolerance
    assert np.all(np.diag(res.energy.covariance - jnp.cov(data.T)) > 0.15)


def test_a_score_matched_mlp_energy_gets_a_tracked_log_z_and_runs_chains_only_when_asked():
    toy = ebm.datasets.toy("8gaussians")
    data = toy.sample(jax.random.key(9), 2000)
    energy = MLPEnergy(2, hidden=(16, 16), key=jax.random.key(10))
    settings = dict(num_steps=20, batch_size=64, progress_bar=False, steps_per_call=10)
    res = ebm.fit(energy, data, key=jax.random.key(11), objective="ssm", **settings)
    assert np.isfinite(res.log_z.value) and np.isfinite(res.log_z.stderr)
    assert res.log_z.method == "tracked"
    assert np.all(np.isfinite(res.history["score_matching_loss"]))
    assert "energy_gap" not in res.history
    with_chains = ebm.fit(
        energy,
        data,
        key=jax.random.key(11),
        objective="ssm",
        negatives="persistent",
        num_chains=64,
        num_mcmc_steps=2,
        track_log_z=False,
        **settings,
    )
    assert np.all(with_chains.history["acceptance_rate"] > 0)
    assert with_chains.chains.shape == (64, 2)


def test_annealed_dsm_trains_a_noise_conditional_energy():
    data = ebm.datasets.toy("8gaussians").sample(jax.random.key(12), 2000)
    energy = NoiseConditionalEnergy(2, 0.1, hidden=(16, 16), key=jax.random.key(13))
    objective = DenoisingScoreMatching((1.0, 0.3, 0.1))
    res = ebm.fit(
        energy,
        data,
        key=jax.random.key(14),
        objective=objective,
        num_steps=30,
        batch_size=64,
        track_log_z=False,
        progress_bar=False,
    )
    loss = res.history["denoising_loss"]
    assert np.all(np.isfinite(loss)) and loss[-10:].mean() < loss[:5].mean()
    x = jnp.ones(2)
    assert res.energy(x) == res.energy.at_noise(x, 0.1)


def test_objective_settings_are_checked_before_any_compute():
    x = jnp.ones((4, 2))
    with pytest.raises(ValueError, match="needs negatives"):
        ebm.TrainConfig(objective="ml", negatives="none")
    with pytest.raises(ValueError, match="unknown objective"):
        build_objective("nce")
    with pytest.raises(ValueError, match="noise scales"):
        DenoisingScoreMatching((0.1, -1.0))
    with pytest.raises(ValueError, match="num_projections"):
        SlicedScoreMatching(0)
    with pytest.raises(ValueError, match="projection"):
        SlicedScoreMatching(1, projection="sphere")
    with pytest.raises(ValueError, match="key="):
        SlicedScoreMatching().terms(GaussianEnergy(jnp.zeros(2)), x, None)
    with pytest.raises(ValueError, match="noise-conditional"):
        DenoisingScoreMatching((0.3, 0.1)).terms(
            GaussianEnergy(jnp.zeros(2)), x, None, key=jax.random.key(0)
        )
    wrong_level = NoiseConditionalEnergy(2, 0.05, hidden=(4,), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"noise_scale 0\.05"):
        DenoisingScoreMatching((0.3, 0.1)).terms(wrong_level, x, None, key=jax.random.key(0))
    assert ebm.TrainConfig(objective="dsm").negatives_name == "none"
    assert ebm.TrainConfig().negatives_name == "persistent"


def test_maximum_likelihood_learner_takes_a_score_matching_objective():
    def energy_of(params, x):
        mu, log_sigma = params
        return 0.5 * jnp.sum((x - mu) ** 2) * jnp.exp(-2 * log_sigma)

    def model(x):
        mu = numpyro.param("mu", jnp.zeros(2))
        log_sigma = numpyro.param("log_sigma", jnp.zeros(()))
        energy = jax.tree_util.Partial(energy_of, (mu, log_sigma))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", ebm.EnergyDistribution(energy, (2,)), obs=x)

    x = jnp.array([1.0, -2.0]) + 0.5 * jax.random.normal(jax.random.key(15), (2000, 2))
    learner = ebm.MaximumLikelihood(
        model, optax.adam(0.03, b1=0.5), objective="sm", track_log_z=False
    )
    res = learner.run(jax.random.key(16), 600, x, progress_bar=False)
    # the whole data every step: the gradient is exact, and score matching's optimum for an
    # isotropic Gaussian is the MLE (mean; root mean squared deviation)
    mle_mu = jnp.mean(x, axis=0)
    mle_sigma = jnp.sqrt(jnp.mean((x - mle_mu) ** 2))
    np.testing.assert_allclose(res.params["mu"], mle_mu, atol=0.01)
    assert abs(float(jnp.exp(res.params["log_sigma"])) - float(mle_sigma)) < 0.01
    assert res.state.negatives["x"] == ()  # no chains
    assert np.isfinite(res.history["x.score_matching_loss"]).all()
