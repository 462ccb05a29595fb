"""The public names of DESIGN.md §3, each imported and called at tiny size: the contract that
users, notebooks and docs rely on (a rename or a dropped argument fails here first)."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro.infer import MCMC, NUTS, Predictive

import numpyro_ebm as ebm

TINY = dict(num_steps=2, num_chains=16, num_mcmc_steps=2, batch_size=16, steps_per_call=2)
HISTORY = ("loss", "energy_gap", "acceptance_rate", "step_size", "grad_norm", "log_z")
# one optimizer object for the sampler cases: the optimizer is part of the compiled step, so a
# new one per case would compile the same step again
ADAM = optax.adam(1e-3)


@pytest.fixture(scope="module")
def data():
    return ebm.datasets.toy("8gaussians").sample(jax.random.key(0), 256)


def gaussian():
    return ebm.energies.GaussianEnergy(jnp.zeros(2))


def test_energy_distribution():
    energy = gaussian()
    d = ebm.EnergyDistribution(energy, event_shape=(2,), log_z=0.0)
    x = jnp.ones((3, 2))
    np.testing.assert_allclose(d.log_prob(x), -jax.vmap(energy)(x), rtol=1e-6)
    d = ebm.EnergyDistribution(energy, (2,), log_z=energy.log_z, sampler="mala")
    assert d.sample(jax.random.key(1), (5,)).shape == (5, 2)

    def model(obs=None):
        with numpyro.plate("n", 4):
            numpyro.sample("x", d, obs=obs)

    trace = numpyro.handlers.trace(numpyro.handlers.seed(model, 0)).get_trace(jnp.zeros((4, 2)))
    assert trace["x"]["fn"].batch_shape == (4,)
    assert d.expand((3,)).batch_shape == (3,) and d.mask(False).event_shape == (2,)
    draws = Predictive(model, num_samples=2)(jax.random.key(2))["x"]
    assert draws.shape == (2, 4, 2)

    def prior():
        numpyro.sample("z", d)

    mcmc = MCMC(NUTS(prior), num_warmup=10, num_samples=10, progress_bar=False)
    mcmc.run(jax.random.key(3))
    assert mcmc.get_samples()["z"].shape == (10, 2)


def test_energies():
    mlp = ebm.energies.MLPEnergy(2, hidden=(8, 8), key=jax.random.key(4))
    deep = ebm.energies.DeepEnergy(2, key=jax.random.key(5))
    separable = ebm.energies.SeparableEnergy(2, key=jax.random.key(5))
    for energy in (mlp, ebm.energies.MLPEnergy(2, key=jax.random.key(4)), deep, separable):
        assert energy(jnp.zeros(2)).shape == ()
    assert "SeparableEnergy" in ebm.energies.__all__
    assert ebm.EnergyDistribution(separable, (2,)).log_z == separable.log_z


# every sampler by name trains through fit in test_train.py
# (test_every_sampler_and_negative_source_trains); here a name and a Sampler object
@pytest.mark.parametrize("sampler", ["mala", ebm.samplers.mala()])
def test_fit_with_each_sampler(sampler, data, tmp_path):
    res = ebm.fit(
        ebm.energies.MLPEnergy(2, hidden=(8,), key=jax.random.key(6)), data,
        key=jax.random.key(7), sampler=sampler, negatives="persistent",
        optimizer=ADAM, progress_bar=False, checkpoint_dir=tmp_path, **TINY,
    )  # fmt: skip
    assert isinstance(res, ebm.FitResult)
    assert res.energy(jnp.zeros(2)).shape == ()
    assert np.isfinite(getattr(res.log_z, "value", res.log_z))
    assert res.chains.shape == (16, 2)
    for name in HISTORY:
        assert res.history[name].shape == (2,), name
    assert res.generator is None
    d = res.distribution()
    assert isinstance(d, ebm.EnergyDistribution) and d.event_shape == (2,)
    assert ebm.training.checkpoint_step(tmp_path) == 2


# persistent, replay and short_run train through fit in test_train.py
# (test_every_sampler_and_negative_source_trains); test_fit_with_each_sampler checks
# that a persistent run has no generator
@pytest.mark.parametrize("negatives", ["generator", "hybrid"])
def test_fit_with_each_negative_source(negatives, data):
    res = ebm.fit(
        gaussian(), data, key=jax.random.key(8), negatives=negatives, buffer_size=64,
        track_log_z=False, progress_bar=False, **TINY,
    )  # fmt: skip
    assert bool(np.all(res.history["is_finite"]))
    assert res.generator(jax.random.key(9), 3).shape == (3, 2)


def test_coming_names_that_work_today(data, tmp_path):
    res = ebm.fit(gaussian(), data, key=jax.random.key(10), objective="ml", track_log_z=False,
                  progress_bar=False, checkpoint_dir=tmp_path, **TINY)  # fmt: skip
    loaded = ebm.load(tmp_path, energy=gaussian())
    assert isinstance(loaded, ebm.FitResult) and int(loaded.state.step) == int(res.state.step)


def test_fit_with_a_condition():
    c = jnp.linspace(-1, 1, 64)[:, None]
    energy = jax.tree_util.Partial(lambda m, x, c: 0.5 * jnp.sum((x - m * c) ** 2), jnp.zeros(()))
    cond = ebm.fit(energy, c + 0.1, condition=c, key=jax.random.key(11), progress_bar=False,
                   **TINY)  # fmt: skip
    assert bool(np.all(cond.history["is_finite"])) and cond.log_z is None


def test_maximum_likelihood(data):
    def model(x):
        mu = numpyro.param("mu", jnp.zeros(2))
        energy = jax.tree_util.Partial(lambda m, v: 0.5 * jnp.sum((v - m) ** 2), mu)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("x", ebm.EnergyDistribution(energy, (2,)), obs=x)

    learner = ebm.MaximumLikelihood(
        model, optax.adam(1e-3), sampler="mala", num_chains=16, track_log_z=False
    )
    res = learner.run(jax.random.key(12), 2, data, progress_bar=False, steps_per_call=2)
    assert res.params["mu"].shape == (2,) and res.history["loss"].shape == (2,)


def test_log_z_estimators():
    energy = gaussian()
    exact = float(energy.log_z)
    proposal = dist.MultivariateNormal(jnp.zeros(2), 2 * jnp.eye(2))
    estimates = (
        ebm.logz.grid(energy, [[-8.0, 8.0], [-8.0, 8.0]], 128),
        ebm.logz.importance(energy, proposal, key=jax.random.key(13), num_samples=1000),
        ebm.logz.ais(
            energy, (2,), key=jax.random.key(14), num_particles=64, num_temperatures=8,
            num_runs=2,
        ),
    )  # fmt: skip
    for estimate in estimates:
        assert isinstance(estimate, ebm.logz.LogZEstimate)
        assert abs(estimate.value - exact) < 0.5


def test_datasets():
    toy = ebm.datasets.toy("8gaussians")
    x = toy.sample(jax.random.key(15), 10)
    assert x.shape == (10, 2) and toy.log_prob(x).shape == (10,)
    assert np.isfinite(toy.entropy()) and len(toy.bounds) == 2
    digits = ebm.datasets.digits()
    assert digits.train.shape[1] == 64 and digits.test.shape[1] == 64


def test_diagnostics_to_datatree(data):
    res = ebm.fit(gaussian(), data, key=jax.random.key(16), num_recorded_chains=4,
                  record_every=1, track_log_z=False, progress_bar=False, **TINY)  # fmt: skip
    for source in (res, res.recorded_chains):
        tree = ebm.diagnostics.to_datatree(source)
        assert "posterior" in tree and "sample_stats" in tree


def test_bounded_data_through_a_logit_box():
    box = ebm.bounded.logit_box(-1.0, 1.0)
    y, log_jacobian = ebm.bounded.unbounded(jnp.array([[-0.99, 0.3]]), box)
    assert y.shape == (1, 2) and log_jacobian.shape == (1,)
    on_box = dist.TransformedDistribution(
        ebm.EnergyDistribution(gaussian(), event_shape=(2,), log_z=gaussian().log_z), box
    )
    draws = on_box.sample(jax.random.key(3), (4,))
    assert draws.shape == (4, 2) and bool(jnp.all(jnp.abs(draws) < 1.03))
