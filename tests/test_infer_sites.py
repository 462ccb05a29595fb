"""MaximumLikelihood: which EBM sites it takes, how it weighs them, and its PRNG keys."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro import handlers
from numpyro.distributions.transforms import AffineTransform

import numpyro_ebm as ebm
from numpyro_ebm.training import core, keys

# Every learner here is about set-up and gradients: no log Z tracker, few chains and steps.
SMALL = dict(num_chains=32, num_mcmc_steps=2, track_log_z=False)


def gaussian(mu, s):
    """E(x) = ½‖(x − μ)/s‖²."""
    return jax.tree_util.Partial(lambda m, s, x: 0.5 * jnp.sum(((x - m) / s) ** 2), mu, s)


def learner(model, **settings):
    return ebm.MaximumLikelihood(model, optax.adam(1e-2), **{**SMALL, **settings})


DATA = 1.0 + 2.0 * jax.random.normal(jax.random.key(0), (200, 2))


def test_an_energy_inside_a_transformed_distribution_is_refused():
    """No negative phase reaches an EBM under a transform: it would be trained as an ordinary
    (unnormalised) site and run away. It is refused at init, naming the site."""

    def model(data):
        mu = numpyro.param("mu", jnp.zeros(2))
        d = ebm.EnergyDistribution(gaussian(mu, 1.0), (2,))
        with numpyro.plate("data", data.shape[0]):
            numpyro.sample(
                "x", dist.TransformedDistribution(d, AffineTransform(0.0, 2.0)), obs=data
            )

    with pytest.raises(ValueError, match=r"site 'x'.*TransformedDistribution.*Transform the data"):
        learner(model).init(jax.random.key(1), DATA)


@pytest.mark.parametrize("how", ["Distribution.mask", "handlers.mask"])
def test_a_masked_ebm_site_is_refused_at_init(how):
    """Masked rows would still start the chains, fit the base and count as data: refused."""
    mask = jnp.arange(DATA.shape[0]) % 2 == 0

    def model(data, mask):
        mu = numpyro.param("mu", jnp.zeros(2))
        d = ebm.EnergyDistribution(gaussian(mu, 1.0), (2,))
        with numpyro.plate("data", data.shape[0]):
            if how == "Distribution.mask":
                numpyro.sample("x", d.mask(mask), obs=data)
            else:
                with handlers.mask(mask=mask):
                    numpyro.sample("x", d, obs=data)

    with pytest.raises(ValueError, match=r"site 'x': masks .* obs=data\[mask\]"):
        learner(model).init(jax.random.key(1), DATA, mask)


def test_observed_values_of_the_wrong_event_shape_are_refused_naming_the_site():
    def model(data):
        mu = numpyro.param("mu", jnp.zeros(2))
        with numpyro.plate("data", data.shape[0]):
            numpyro.sample("x", ebm.EnergyDistribution(gaussian(mu, 1.0), (2,)), obs=data)

    wrong = jax.random.normal(jax.random.key(2), (100, 3))  # 300 numbers: reshapes to (150, 2)
    with pytest.raises(ValueError, match=r"site 'x'.*shape \(100, 3\).*event_shape \(2,\)"):
        learner(model).init(jax.random.key(1), wrong)


def test_an_energy_that_no_param_reaches_is_refused():
    """An equinox energy not registered with eqx_module is a constant of the model: it would
    never be trained. Refused at init with the fix; the same energy through eqx_module is
    accepted."""
    from numpyro.contrib.module import eqx_module

    mlp = ebm.energies.MLPEnergy(2, hidden=(8,), key=jax.random.key(3))
    y = jax.random.normal(jax.random.key(4), (200,))

    def model(data, y, register):
        sigma = numpyro.param("sigma", 1.0, constraint=dist.constraints.positive)
        energy = eqx_module("energy", mlp) if register else mlp
        with numpyro.plate("data", data.shape[0]):
            numpyro.sample("x", ebm.EnergyDistribution(energy, (2,)), obs=data)
            numpyro.sample("y", dist.Normal(0.0, sigma), obs=y)

    with pytest.raises(ValueError, match=r"site 'x'.*no numpyro.param / eqx_module.*eqx_module"):
        learner(model).init(jax.random.key(1), DATA, y, False)
    state = learner(model).init(jax.random.key(1), DATA, y, True)
    assert "energy$params" in state.params


def two_site_model(data, record):
    w = numpyro.param("w", lambda k: record.append(k) or jax.random.normal(k, (2,)))
    s = numpyro.param("s", jnp.ones(2), constraint=dist.constraints.positive)
    with numpyro.plate("data", data.shape[0]):
        numpyro.sample("x", ebm.EnergyDistribution(gaussian(w, s), (2,)), obs=data)
        numpyro.sample("y", ebm.EnergyDistribution(gaussian(-w, s), (2,)), obs=-data)


def test_a_params_random_initialiser_gets_a_key_of_its_own():
    """The init key goes (folded in per site) to the sites' negative samplers: a param's
    initialiser must not draw from any of those keys."""
    record = []
    key = jax.random.key(5)
    learner(two_site_model).init(key, DATA, record)
    drawn = {tuple(np.asarray(jax.random.key_data(k)).tolist()) for k in record}
    assert drawn, "the initialiser was not called"
    site_keys = keys.site_keys(key, ("x", "y"))
    used = {tuple(np.asarray(jax.random.key_data(k)).tolist()) for k in site_keys.values()}
    used.add(tuple(np.asarray(jax.random.key_data(key)).tolist()))
    assert not drawn & used


def test_init_validates_the_subsample_that_init_fits():
    """With subsampling, init checks the rows of the trace core.init fits the site's base and
    chains on (seeded with ``model_key(key)``): a NaN row there is refused at init, not left to
    reject every step."""

    def model(data):
        mu = numpyro.param("mu", jnp.zeros(2))
        with numpyro.plate("data", data.shape[0], subsample_size=16):
            batch = numpyro.subsample(data, event_dim=1)
            numpyro.sample("x", ebm.EnergyDistribution(gaussian(mu, 1.0), (2,)), obs=batch)

    key = jax.random.key(6)

    def rows(k):
        return set(
            np.asarray(
                handlers.trace(handlers.seed(model, k)).get_trace(DATA)["data"]["value"]
            ).tolist()
        )

    fitted_only = sorted(rows(keys.model_key(key)) - rows(key))
    assert fitted_only  # 16 of 200 rows: the two subsamples differ
    bad = DATA.at[fitted_only[0], 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"site 'x'.*non-finite"):
        learner(model).init(key, bad)


def weighted_model(data, weights):
    """A Gaussian energy with a free additive constant ``c`` (so ``energy_l2`` applies)."""
    mu = numpyro.param("mu", jnp.zeros(2))
    log_s = numpyro.param("log_s", jnp.zeros(()))
    c = numpyro.param("c", jnp.zeros(()))
    energy = jax.tree_util.Partial(
        lambda m, ls, c, x: 0.5 * jnp.sum((x - m) ** 2) * jnp.exp(-2 * ls) + c, mu, log_s, c
    )
    with numpyro.plate("data", data.shape[0]), handlers.scale(scale=weights):
        numpyro.sample("x", ebm.EnergyDistribution(energy, (2,)), obs=data)


def _objective(data, weights, negatives, energy_l2):
    ml = learner(weighted_model, energy_l2=energy_l2, ema_decay=None)
    state = ml.init(jax.random.key(7), data, weights)
    params, static = eqx.partition(state.params, eqx.is_inexact_array)
    batch = ((data, weights), {})
    (loss, terms), grads = core.objective_grad(
        params, static, ml.problem, jax.random.key(8), batch, {"x": negatives}, ml.config,
        state.free_constant, state.step,
    )  # fmt: skip
    return loss, terms["x"].count, grads


@pytest.mark.parametrize("energy_l2", [0.0, 0.3])
def test_per_point_scales_weigh_points_as_duplicating_them(energy_l2):
    """``handlers.scale`` with per-point weights (as in SVI): a weight of 2 on every point is
    the data twice over: the same count, loss and gradient, the ``energy_l2`` penalty (N
    times its per-point value) included."""
    negatives = 1.0 + 2.0 * jax.random.normal(jax.random.key(9), (64, 2))
    n = DATA.shape[0]
    loss, count, grads = _objective(DATA, 2.0 * jnp.ones(n), negatives, energy_l2)
    twice = jnp.concatenate([DATA, DATA])
    loss2, count2, grads2 = _objective(twice, 1.0, negatives, energy_l2)
    assert float(count) == float(count2) == 2 * n
    np.testing.assert_allclose(loss, loss2, rtol=1e-5)
    for g, g2 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2), strict=True):
        np.testing.assert_allclose(g, g2, rtol=1e-4, atol=1e-3)


def test_unequal_point_weights_give_the_weighted_likelihoods_gradient():
    """Weights 1 and 2 alternating: the maximum-likelihood gradient and count of the data with
    every second point duplicated."""
    negatives = 1.0 + 2.0 * jax.random.normal(jax.random.key(10), (64, 2))
    n = DATA.shape[0]
    weights = 1.0 + (jnp.arange(n) % 2)
    loss, count, grads = _objective(DATA, weights, negatives, 0.0)
    duplicated = jnp.concatenate([DATA, DATA[1::2]])
    loss2, count2, grads2 = _objective(duplicated, 1.0, negatives, 0.0)
    assert float(count) == float(count2) == 1.5 * n
    np.testing.assert_allclose(loss, loss2, rtol=1e-5)
    for g, g2 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2), strict=True):
        np.testing.assert_allclose(g, g2, rtol=1e-4, atol=1e-3)


def simple_model(data):
    mu = numpyro.param("mu", jnp.zeros(2))
    s = numpyro.param("s", jnp.ones(2), constraint=dist.constraints.positive)
    with numpyro.plate("data", data.shape[0]):
        numpyro.sample("x", ebm.EnergyDistribution(gaussian(mu, s), (2,)), obs=data)


def test_update_needs_init_and_a_new_learner_resumes_a_state():
    """``update`` before ``init`` says so; ``run(init_state=...)`` on a new learner traces the
    model itself and continues the same trajectory as the learner that made the state."""
    first = learner(simple_model)
    state = first.init(jax.random.key(11), DATA)
    fresh = learner(simple_model)
    with pytest.raises(RuntimeError, match=r"call init\(key"):
        fresh.update(jax.random.key(12), state, DATA)
    kw = dict(init_state=state, progress_bar=False)
    resumed = fresh.run(jax.random.key(13), 5, DATA, **kw)
    again = first.run(jax.random.key(13), 5, DATA, **kw)
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(again.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(resumed.state.step) == 5

    def other(data):
        numpyro.param("a", jnp.zeros(3))
        simple_model(data)

    with pytest.raises(ValueError, match="init_state does not fit this model"):
        learner(other).run(jax.random.key(13), 5, DATA, **kw)
