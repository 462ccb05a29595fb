"""The training package's composable pieces: ``fit`` on a ``TrainConfig`` with overrides,
configured negative samplers, every negative sampler and checkpoints in ``MaximumLikelihood``,
conditional energies in ``fit``, and ``load``."""

import copy
import dataclasses
import importlib
import math
import types

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
import pytest

import numpyro_ebm as ebm
from numpyro_ebm import generator as gen
from numpyro_ebm.logz import tracking
from numpyro_ebm.training import checkpoint, core

TINY = dict(
    num_steps=6,
    num_chains=16,
    num_mcmc_steps=2,
    batch_size=16,
    steps_per_call=2,
    progress_bar=False,
)


def toy_data(n=512):
    return jax.random.normal(jax.random.key(0), (n, 2)) * jnp.array([1.0, 2.0]) + 1.0


def gaussian_energy():
    return ebm.energies.GaussianEnergy(jnp.zeros(2))


def crash_after_save(monkeypatch, step):
    """Make the checkpoint writer raise KeyboardInterrupt just after it saved ``step``."""
    real_save = checkpoint.save_checkpoint

    def save_then_stop(folder, state, history, meta):
        real_save(folder, state, history, meta)
        if meta["step"] == step:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_stop)


def assert_trees_equal(a, b, **tolerance):
    a_arrays, a_static = eqx.partition(a, eqx.is_array)
    b_arrays, b_static = eqx.partition(b, eqx.is_array)
    assert eqx.tree_equal(a_static, b_static)
    for x, y in zip(jax.tree.leaves(a_arrays), jax.tree.leaves(b_arrays), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tolerance)


# -- fit: a config plus keyword overrides (the fixture resolved_config_of: conftest.py) -------


SGD = optax.sgd(1e-3)
GENERATOR_ADAM = optax.adam(1e-4)
CD = ebm.negatives.ContrastiveDivergence(num_mcmc_steps=3)

# field -> (value, negatives to run it with, where the resolved config must show it)
FIELDS = {
    "optimizer": (SGD, "persistent", lambda c: c.optimizer is SGD),
    "learning_rate": (1e-3, "persistent", lambda c: c.learning_rate == 1e-3),
    "weight_decay": (0.1, "persistent", lambda c: c.weight_decay == 0.1),
    "negatives": ("replay", "replay", lambda c: isinstance(c.negatives, ebm.negatives.Replay)),
    "objective": (
        ebm.training.LikelihoodObjective(),
        "persistent",
        lambda c: c.objective == ebm.training.LikelihoodObjective(),
    ),
    "sampler": ("hmc", "persistent", lambda c: c.negatives.sampler.kernel == "hmc"),
    "num_chains": (32, "persistent", lambda c: c.negatives.num_chains == 32),
    "num_mcmc_steps": (3, "persistent", lambda c: c.negatives.num_mcmc_steps == 3),
    "batch_size": (32, "persistent", lambda c: c.batch_size == 32),
    "energy_l2": (0.5, "persistent", lambda c: c.energy_l2 == 0.5),
    "energy_l2_decay": (None, "persistent", lambda c: c.energy_l2_decay is None),
    "ema_decay": (0.9, "persistent", lambda c: c.ema_decay == 0.9),
    "buffer_size": (77, "replay", lambda c: c.negatives.buffer_size == 77),
    "reinit_fraction": (0.3, "persistent", lambda c: c.negatives.reinit_fraction == 0.3),
    "step_size_gain": (0.05, "persistent", lambda c: c.negatives.step_size_gain == 0.05),
    "log_z_learning_rate": (0.02, "persistent", lambda c: c.log_z_learning_rate == 0.02),
    "track_log_z": (False, "persistent", lambda c: c.track_log_z is False),
    "log_z_particles": (
        128, "persistent", lambda c: c.log_z_tracker().num_particles == 128
    ),
    "log_z_groups": (4, "persistent", lambda c: c.log_z_tracker().num_groups == 4),
    "log_z_first_anchor": (
        50, "persistent", lambda c: c.log_z_tracker().first_anchor == 50
    ),
    "log_z_bridge_steps": (
        3, "persistent", lambda c: c.log_z_tracker().max_bridge_steps == 3
    ),
    "log_z_floor_samples": (
        0, "persistent", lambda c: c.log_z_tracker().floor_samples == 0
    ),
    "log_z_floor_every": (1, "persistent", lambda c: c.log_z_tracker().floor_every == 1),
    "log_z_floor_half_life": (
        0, "persistent", lambda c: c.log_z_tracker().floor_half_life == 0
    ),
    "log_z_fuse_ess": (None, "persistent", lambda c: c.log_z_tracker().fuse_ess is None),
    "generator_optimizer": (
        GENERATOR_ADAM, "hybrid", lambda c: c.negatives.optimizer is GENERATOR_ADAM
    ),
    "generator_learning_rate": (1e-4, "generator", lambda c: c.generator_learning_rate == 1e-4),
    "entropy": (
        "batch_norm",
        "generator",
        lambda c: isinstance(c.negatives.entropy, gen.BatchNormEntropy),
    ),
    "amortization_weight": (10.0, "hybrid", lambda c: c.negatives.amortization_weight == 10.0),
    "resample": (False, "hybrid", lambda c: c.negatives.resample is False),
    "num_temperatures": (3, "parallel_tempering", lambda c: c.negatives.num_temperatures == 3),
    "adapt_temperatures": (
        False, "parallel_tempering", lambda c: c.negatives.adapt_temperatures is False
    ),
    "ladder_gain": (0.5, "parallel_tempering", lambda c: c.negatives.ladder_gain == 0.5),
    "negatives_per_ladder": (
        2, "parallel_tempering", lambda c: c.negatives.negatives_per_ladder == 2
    ),
    "num_recorded_chains": (4, "persistent", lambda c: c.negatives.num_recorded_chains == 4),
    "record_every": (5, "persistent", lambda c: c.record_every == 5),
    "matmul_precision": (
        "tensorfloat32", "persistent", lambda c: c.matmul_precision == "tensorfloat32"
    ),
    "conditional_negatives": (CD, "persistent", lambda c: c.conditional_negatives is CD),
}  # fmt: skip


def test_every_train_config_field_is_listed_here():
    """A new ``TrainConfig`` field must be added to ``FIELDS`` (``sharding`` is built by ``fit``
    from ``devices``, ``schedule_steps`` by ``resolve``)."""
    names = {f.name for f in dataclasses.fields(ebm.TrainConfig)}
    assert names == set(FIELDS) | {"sharding", "schedule_steps"}


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_every_train_config_field_is_reachable_through_fit(name, resolved_config_of):
    value, negatives, check = FIELDS[name]
    settings = {"negatives": negatives, name: value}
    assert check(resolved_config_of(**settings)), name
    # the same through config=
    config = ebm.TrainConfig(**settings)
    assert check(resolved_config_of(config=config)), name


def test_keyword_overrides_win_over_the_config(resolved_config_of):
    config = ebm.TrainConfig(num_chains=64, batch_size=32, step_size_gain=0.0, learning_rate=0.1)
    resolved = resolved_config_of(config=config, num_chains=16, learning_rate=0.2)
    assert resolved.negatives.num_chains == 16 and resolved.num_chains == 16
    assert resolved.batch_size == 32 and resolved.negatives.step_size_gain == 0.0
    assert resolved.learning_rate == 0.2
    assert config.num_chains == 64  # the caller's config is not changed


def test_an_unknown_setting_is_a_type_error_before_compute(resolved_config_of):
    with pytest.raises(TypeError, match="num_chain"):
        resolved_config_of(num_chain=16)
    with pytest.raises(TypeError, match="bogus"):
        resolved_config_of(config=ebm.TrainConfig(), bogus=1)


@pytest.mark.parametrize(
    "settings, match",
    [
        *((dict(condition=toy_data(), calibrate_log_z=v), "calibrate_log_z") for v in (True, {})),
        (dict(data=jnp.ones((1, 2))), "at least 2"),
        (dict(data=jnp.ones((5, 2))), "all the same point"),
        *((dict(checkpoint_every=v), "checkpoint_every") for v in (-3, 0, 0.5, "10")),
    ],
)
def test_fit_refuses_inputs_that_fail_late_before_compute(settings, match, monkeypatch):
    monkeypatch.setattr(core, "init", lambda *a: pytest.fail("fit started to compute"))
    energy = linear_gaussian(0.0, jnp.array(0.0)) if "condition" in settings else gaussian_energy()
    with pytest.raises(ValueError, match=match):
        ebm.fit(energy, key=jax.random.key(1), **{"data": toy_data(), **settings, **TINY})


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_data_is_trained_in_float32(dtype):
    x = toy_data(8).astype(dtype)
    args = (linear_gaussian(0.0, jnp.array(0.0)), x[:, :1], x[:, 1:], (x[:4, :1], x[:4, 1:]))
    inputs, validation, _ = ebm.training.inputs.checked_inputs(*args, 6, 2, 10, None)
    assert {a.dtype for a in (*inputs, *validation)} == {jnp.dtype(jnp.float32)}


def test_fit_keys_init_loop_and_calibration_apart(monkeypatch):
    fit_module, seen = importlib.import_module("numpyro_ebm.training.fit"), []
    state = types.SimpleNamespace(_replace=lambda best: state)
    record = lambda at, out: lambda *a, **k: seen.append(k["key"] if at is None else a[at]) or out
    monkeypatch.setattr(core, "init", record(0, state))
    monkeypatch.setattr(fit_module.loop, "train", record(None, (state, {}, {})))
    monkeypatch.setattr(fit_module, "_calibration", record(2, None))
    monkeypatch.setattr(fit_module, "fit_result", lambda *a: types.SimpleNamespace(energy=0))
    key = jax.random.key(1)
    ebm.fit(gaussian_energy(), toy_data(), key=key, calibrate_log_z=True, **TINY)
    k_init, k_loop = jax.random.split(key)  # the training trajectory is the same as before
    used = [k_init, k_loop, *(jax.random.fold_in(k_init, i) for i in range(4))]
    got, used = (jax.random.key_data(jnp.stack(keys)) for keys in (seen, used))
    np.testing.assert_array_equal(got[:2], used[:2])
    assert not np.any(np.all(got[2] == used, axis=1))  # AIS has a key of its own


def test_fit_with_a_config_and_overrides_trains_with_them():
    """A fixed step size (``step_size_gain=0``, settable only through the config before) keeps
    the chains' step size; the override of ``num_chains`` sets the number of chains."""
    config = ebm.TrainConfig(
        num_chains=64, num_mcmc_steps=2, batch_size=16, step_size_gain=0.0
    )  # fmt: skip
    settings = dict(num_steps=6, steps_per_call=2, progress_bar=False)
    res = ebm.fit(
        gaussian_energy(), toy_data(), key=jax.random.key(2), config=config, num_chains=24,
        track_log_z=False, **settings,
    )  # fmt: skip
    assert res.chains.shape == (24, 2)
    np.testing.assert_allclose(res.history["step_size"], config.sampler.step_size, rtol=1e-6)
    adapted = ebm.fit(
        gaussian_energy(), toy_data(), key=jax.random.key(2), track_log_z=False, **TINY
    )
    assert np.ptp(adapted.history["step_size"]) > 0  # the default gain does move it


def test_a_configured_negative_sampler_is_used_by_fit():
    replay = ebm.negatives.Replay(num_chains=32, buffer_size=100)
    res = ebm.fit(
        gaussian_energy(), toy_data(), key=jax.random.key(3), negatives=replay,
        track_log_z=False, **TINY,
    )  # fmt: skip
    assert res.config.negatives == replay
    assert res.chains.shape == (100, 2)
    assert res.state.negatives["x"].bank.shape == (100, 2)
    assert bool(np.all(res.history["is_finite"]))


# -- MaximumLikelihood: every negative sampler, checkpoints, recorded chains -------------------


MEAN = jnp.array([1.0, -2.0])


def scaled_energy(mu, log_sigma):
    return jax.tree_util.Partial(
        lambda m, s, x: 0.5 * jnp.sum((x - m) ** 2) * jnp.exp(-2 * s), mu, log_sigma
    )


def gaussian_model(x):
    mu = numpyro.param("mu", jnp.zeros(2))
    log_sigma = numpyro.param("log_sigma", jnp.zeros(()))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", ebm.EnergyDistribution(scaled_energy(mu, log_sigma), (2,)), obs=x)


def model_data():
    return MEAN + 0.5 * jax.random.normal(jax.random.key(4), (500, 2))


@pytest.mark.parametrize("negatives", ["generator", "hybrid"])
def test_generator_negatives_train_a_numpyro_model(negatives):
    x = model_data()
    small = gen.Generator(2, 4, hidden=(16,), key=jax.random.key(5), noise_scale=0.1)
    cls = ebm.negatives.Hybrid if negatives == "hybrid" else ebm.negatives.GeneratorNegatives
    sampler = cls(optimizer=optax.adam(1e-3, b1=0.5), num_chains=64, generator=small)
    if negatives == "hybrid":
        sampler = sampler.replace(num_mcmc_steps=3)
    learner = ebm.MaximumLikelihood(
        gaussian_model, optax.adam(0.05), negatives=sampler, track_log_z=False
    )
    res = learner.run(jax.random.key(6), 40, x, progress_bar=False, steps_per_call=20)
    h = res.history
    assert bool(np.all(h["is_finite"]))
    for column in ("x.generator_energy", "x.generator_entropy", "x.amortization"):
        assert np.all(np.isfinite(h[column])), column
    if negatives == "hybrid":
        assert np.all(np.isfinite(h["x.acceptance_rate"]))
        assert np.all((h["x.resampling_ess"] > 0) & (h["x.resampling_ess"] <= 1))
    else:
        assert np.all(np.isnan(h["x.acceptance_rate"]))  # no chains run
    state = res.state.negatives["x"]
    assert isinstance(state, ebm.negatives.GeneratorState) and state.bank.shape == (64, 2)
    assert state.generator(jax.random.key(7), 3).shape == (3, 2)
    # the energy moved towards the data (its mean starts at 0, ‖MEAN‖ ≈ 2.2 away)
    assert float(jnp.linalg.norm(res.params["mu"] - MEAN)) < 0.7 * float(jnp.linalg.norm(MEAN))


def ml_learner(**settings):
    """The learner of the two tests below, without the log Z tracker (which
    test_maximum_likelihood_tracks_each_sites_log_z_with_an_error_bar tests). Each learner
    compiles its own step."""
    return ebm.MaximumLikelihood(
        gaussian_model, optax.adam(0.05), num_chains=32, num_mcmc_steps=2, record_every=5,
        num_recorded_chains=4, track_log_z=False, **settings,
    )  # fmt: skip


def test_maximum_likelihood_resumes_a_killed_run_on_the_same_trajectory(tmp_path, monkeypatch):
    x = model_data()
    settings = dict(progress_bar=False, steps_per_call=5)
    learner = ml_learner()  # the straight and the killed run: one compiled step
    straight = learner.run(jax.random.key(8), 20, x, **settings)
    crash_after_save(monkeypatch, 10)
    with pytest.raises(KeyboardInterrupt):
        learner.run(jax.random.key(8), 20, x, checkpoint_dir=tmp_path, **settings)
    assert ebm.training.checkpoint_step(tmp_path) == 10
    monkeypatch.undo()
    # a new learner resumes, as a restarted process would
    resumed = ml_learner().run(jax.random.key(8), 20, x, checkpoint_dir=tmp_path, **settings)
    assert int(resumed.state.step) == 20 and ebm.training.checkpoint_step(tmp_path) == 20
    for name in ("mu", "log_sigma"):
        np.testing.assert_allclose(resumed.params[name], straight.params[name], rtol=1e-6)
    assert sorted(resumed.history) == sorted(straight.history)
    for name in ("loss", "x.energy_gap", "x.step_size"):
        np.testing.assert_allclose(resumed.history[name], straight.history[name], rtol=1e-6)
    np.testing.assert_allclose(
        resumed.recorded_chains["x"].positions, straight.recorded_chains["x"].positions, rtol=1e-6
    )
    # a second writer of other settings is refused by name
    with pytest.raises(ValueError, match=r"num_chains: 32 .*16"):
        ebm.MaximumLikelihood(
            gaussian_model, optax.adam(0.05), num_chains=16, track_log_z=False
        ).run(jax.random.key(8), 20, x, checkpoint_dir=tmp_path, **settings)


def test_maximum_likelihood_records_its_chains():
    x = model_data()
    res = ml_learner().run(jax.random.key(9), 20, x, progress_bar=False, steps_per_call=10)
    draws = res.recorded_chains["x"]
    assert draws.positions.shape == (4, 4, 2)  # 4 chains, one draw every 5 of 20 steps
    np.testing.assert_array_equal(draws.step, [5, 10, 15, 20])
    assert draws.info.acceptance_rate.shape == (4, 4)
    # persistent chains are followed through training: the last draw is the bank's first rows
    np.testing.assert_array_equal(draws.positions[:, -1], res.state.negatives["x"].bank[:4])
    tree = ebm.diagnostics.to_datatree(draws)
    assert tree["posterior"]["x"].shape[:2] == (4, 4)


# -- conditional energies in fit -------------------------------------------------------------


def linear_gaussian(a, log_s):
    """E(y | c) = ½ (y − a c)² / s²: the regression y ~ N(a c, s²)."""
    return jax.tree_util.Partial(
        lambda a, ls, y, c: 0.5 * jnp.sum((y - a * c) ** 2) * jnp.exp(-2 * ls), a, log_s
    )


def test_fit_learns_the_conditional_mean_of_a_conditional_gaussian():
    c = jax.random.uniform(jax.random.key(10), (1000, 1), minval=-2, maxval=2)
    y = 0.8 * c + 0.3 * jax.random.normal(jax.random.key(11), (1000, 1))
    res = ebm.fit(
        linear_gaussian(jnp.array(0.0), jnp.array(0.0)), y, condition=c, key=jax.random.key(12),
        num_steps=400, batch_size=256, num_mcmc_steps=10, learning_rate=0.05,
        steps_per_call=100, progress_bar=False,
    )  # fmt: skip
    a_hat = float(jnp.sum(c * y) / jnp.sum(c * c))  # least squares = the conditional MLE
    s_hat = float(jnp.sqrt(jnp.mean((y - a_hat * c) ** 2)))
    # Tolerance. The data term of one step's gradient in a has sd ≈ √E[c²]/s / √256 ≈ 0.24
    # and the negatives' term as much again (0.34 together); the curvature E[c²]/s² ≈ 15
    # turns that into ≈ 0.023 in a per step, which the decayed learning rate and the parameter
    # average shrink several-fold. Contrastive divergence from the data is unbiased at the
    # truth (a chain started at a draw of the model stays in it), which is within the MLE's
    # own error s/√Σc² ≈ 0.008 of a_hat. 0.03 is > 1 per-step sd and ~4 MLE errors.
    assert float(res.energy.args[0]) == pytest.approx(a_hat, abs=0.03)
    assert float(jnp.exp(res.energy.args[1])) == pytest.approx(s_hat, abs=0.03)
    # the conditional mean a·c it implies, over the conditions' range
    grid = jnp.linspace(-2, 2, 5)
    np.testing.assert_allclose(res.energy.args[0] * grid, a_hat * grid, atol=0.06)
    assert res.log_z is None  # log Z depends on c: none is learned
    assert bool(np.all(res.history["is_finite"]))
    assert res.chains is None  # contrastive divergence keeps no samples between steps


def test_a_conditional_fit_checks_its_conditions():
    y = jnp.zeros((10, 1))
    energy = linear_gaussian(jnp.array(0.0), jnp.array(0.0))
    with pytest.raises(ValueError, match="one condition per data point"):
        ebm.fit(energy, y, condition=jnp.zeros((9, 1)), key=jax.random.key(0), **TINY)


# -- load ---------------------------------------------------------------------------------------


def mlp(seed):
    return ebm.energies.MLPEnergy(2, hidden=(8,), key=jax.random.key(seed))


def test_load_returns_the_result_of_a_finished_run(tmp_path):
    data = toy_data()
    res = ebm.fit(
        mlp(13), data, key=jax.random.key(14), checkpoint_dir=tmp_path, record_every=2, **TINY
    )
    loaded = ebm.load(tmp_path, energy=mlp(99))  # other values, same architecture
    assert isinstance(loaded, ebm.FitResult)
    assert_trees_equal(loaded.energy, res.energy, rtol=0, atol=0)
    assert_trees_equal(loaded.last_energy, res.last_energy, rtol=0, atol=0)
    np.testing.assert_array_equal(loaded.chains, res.chains)
    assert sorted(loaded.history) == sorted(res.history)
    for name in res.history:
        np.testing.assert_array_equal(loaded.history[name], res.history[name], err_msg=name)
    np.testing.assert_array_equal(loaded.recorded_chains.positions, res.recorded_chains.positions)
    np.testing.assert_array_equal(loaded.recorded_chains.step, res.recorded_chains.step)
    assert loaded.log_z.value == res.log_z.value and loaded.log_z.stderr == res.log_z.stderr
    assert loaded.event_shape == res.event_shape == (2,)
    assert int(loaded.state.step) == TINY["num_steps"]
    assert loaded.config.describe() == res.config.describe()
    x = jnp.zeros((3, 2))
    np.testing.assert_array_equal(loaded.distribution().log_prob(x), res.distribution().log_prob(x))


def test_load_returns_an_interrupted_run_at_its_last_checkpoint(tmp_path, monkeypatch):
    crash_after_save(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        ebm.fit(mlp(13), toy_data(), key=jax.random.key(14), checkpoint_dir=tmp_path, **TINY)
    monkeypatch.undo()
    loaded = ebm.load(tmp_path, energy=mlp(0))
    assert int(loaded.state.step) == 4 and len(loaded.history["loss"]) == 4
    # and the run resumes from there to the uninterrupted result
    finished = ebm.fit(mlp(13), toy_data(), key=jax.random.key(14), checkpoint_dir=tmp_path, **TINY)
    straight = ebm.fit(mlp(13), toy_data(), key=jax.random.key(14), **TINY)
    assert_trees_equal(finished.energy, straight.energy, rtol=1e-6, atol=1e-7)


def test_load_of_a_generator_run_returns_its_generator(tmp_path):
    generator = gen.Generator(2, 4, hidden=(8,), key=jax.random.key(15), noise_scale=0.1)
    res = ebm.fit(
        gaussian_energy(), toy_data(), key=jax.random.key(16), negatives="hybrid",
        generator=generator, checkpoint_dir=tmp_path, track_log_z=False, **TINY,
    )  # fmt: skip
    other = gen.Generator(2, 4, hidden=(8,), key=jax.random.key(17), noise_scale=0.1)
    loaded = ebm.load(tmp_path, energy=gaussian_energy(), generator=other)
    assert_trees_equal(loaded.generator, res.generator, rtol=0, atol=0)
    for name in ("generator_energy", "resampling_ess"):
        np.testing.assert_array_equal(loaded.history[name], res.history[name])


def test_load_needs_a_checkpoint_and_an_energy(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ebm.load(tmp_path, energy=mlp(0))
    ebm.fit(mlp(13), toy_data(), key=jax.random.key(14), checkpoint_dir=tmp_path, **TINY)
    with pytest.raises(ValueError, match="energy="):
        ebm.load(tmp_path)


@pytest.mark.parametrize("decay", [-0.1, 1.5, float("nan"), "half", True])
def test_a_bad_energy_l2_decay_is_refused_by_name(decay):
    with pytest.raises(ValueError, match="energy_l2_decay"):
        ebm.TrainConfig(energy_l2_decay=decay)


@pytest.mark.parametrize("value", [-1, 2.5, "five", float("nan")])
@pytest.mark.parametrize(
    "name", ["log_z_floor_samples", "log_z_floor_every", "log_z_floor_half_life"]
)
def test_a_bad_floor_setting_is_refused_by_name(name, value):
    with pytest.raises(ValueError, match=name):
        ebm.TrainConfig(**{name: value})
    with pytest.raises(ValueError, match=name.removeprefix("log_z_")):
        tracking.TrackerSettings(**{name.removeprefix("log_z_"): -1}).check()


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5, "half", float("nan"), True])
def test_a_bad_fuse_setting_is_refused_by_name(value):
    with pytest.raises(ValueError, match="log_z_fuse_ess"):
        ebm.TrainConfig(log_z_fuse_ess=value)
    with pytest.raises(ValueError, match="fuse_ess"):
        tracking.TrackerSettings(fuse_ess=value).check()


def test_maximum_likelihood_tracks_each_sites_log_z_with_an_error_bar():
    """The site's energy is ½‖x − μ‖²/σ²: log Z = log(2π) + 2 log σ, exact whatever training
    did; the tracked value of the averaged parameters must match it within its error bar."""
    learner = ebm.MaximumLikelihood(
        gaussian_model, optax.adam(0.05), num_chains=128, num_mcmc_steps=5, log_z_particles=256
    )
    # 150 steps: tracked for 50 updates since the re-anchor at update 100
    res = learner.run(jax.random.key(8), 150, model_data(), progress_bar=False)
    estimate = res.log_z["x"]
    assert isinstance(estimate, ebm.logz.LogZEstimate) and estimate.method == "tracked"
    exact = math.log(2 * math.pi) + 2 * float(res.params["log_sigma"])
    error = estimate.value - exact
    # the standard error comes from 8 groups: |t₇| > 4 has probability 0.5%
    assert 0 < estimate.stderr < 0.1 and abs(error) <= 4 * estimate.stderr, (error, estimate)
    assert np.isfinite(res.history["x.log_z_stderr"]).all()


def test_a_history_column_new_since_the_checkpoint_is_nan_before_it():
    """A run resumed from a checkpoint written before a column existed (here ``log_z_bound``)
    keeps every column one row per step: the new one is NaN for the rows before it."""
    data = ebm.datasets.toy("8gaussians").sample(jax.random.key(0), 500)
    energy = ebm.energies.MLPEnergy(2, hidden=(8,), key=jax.random.key(1))
    config = ebm.TrainConfig(num_chains=16, batch_size=16, log_z_particles=32).resolve(10)
    problem = ebm.training.EnergyProblem(config.batch_size)
    state = ebm.training.energy_init(jax.random.key(2), energy, data, config)
    options = dict(key=jax.random.key(3), data=data, problem=problem, config=config)
    options |= dict(steps_per_call=3, progress_bar=False)
    state, history, _ = ebm.training.train(state, num_steps=3, **options)
    del history["log_z_bound"]
    _, history, _ = ebm.training.train(state, num_steps=6, history=history, **options)
    bound = history["log_z_bound"]
    assert {len(column) for column in history.values()} == {6}
    assert np.isnan(bound[:3]).all() and np.isfinite(bound[3:]).all()


def test_the_default_optimizers_weight_decay_shrinks_parameters_by_the_learning_rate():
    """With a zero gradient Adam leaves parameters alone; AdamW's decoupled decay shrinks them
    by ``learning_rate × weight_decay`` per step (the first step's learning rate, before the
    cosine decay)."""
    params = {"w": jnp.array([1.0, -2.0])}
    zero = {"w": jnp.zeros(2)}
    for decay, expected in ((0.0, [1.0, -2.0]), (0.1, [1.0 - 5e-4, -2.0 * (1 - 5e-4)])):
        optimizer = ebm.training.default_optimizer(100, 5e-3, weight_decay=decay)
        updates, _ = optimizer.update(zero, optimizer.init(params), params)
        moved = optax.apply_updates(params, updates)
        np.testing.assert_allclose(moved["w"], expected, rtol=1e-6)


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf"), "0.1", True])
def test_a_bad_weight_decay_is_refused_by_name(value):
    with pytest.raises(ValueError, match="weight_decay"):
        ebm.training.default_optimizer(100, 5e-3, weight_decay=value)


def test_train_config_weight_decay_builds_the_decayed_default_optimizer():
    """``TrainConfig.weight_decay`` reaches the default optimizer: resolved, it shrinks a
    parameter with a zero gradient by ``learning_rate × weight_decay`` per step; checkpoints
    record it by name (0 for one written before the setting existed)."""
    params = {"w": jnp.array([1.0, -2.0])}
    zero = {"w": jnp.zeros(2)}
    for decay in (0.0, 0.1):
        config = ebm.TrainConfig(learning_rate=5e-3, weight_decay=decay).resolve(100)
        updates, _ = config.optimizer.update(zero, config.optimizer.init(params), params)
        moved = optax.apply_updates(params, updates)
        np.testing.assert_allclose(moved["w"], np.array([1.0, -2.0]) * (1 - 5e-3 * decay), 1e-6)
        assert config.describe()["weight_decay"] == decay
    assert ebm.TrainConfig().describe_defaults()["weight_decay"] == 0.0


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf"), "0.1", True])
def test_a_bad_train_config_weight_decay_is_refused_by_name(value):
    with pytest.raises(ValueError, match="weight_decay"):
        ebm.TrainConfig(weight_decay=value)


def test_weight_decay_with_a_custom_optimizer_is_refused():
    """The decay is the default optimizer's: with one's own optimizer it would be silently
    ignored, so the pair is refused (before any compute) and the message says what to do."""
    with pytest.raises(ValueError, match=r"custom optimizer.*optax\.adamw"):
        ebm.TrainConfig(optimizer=optax.adam(1e-3), weight_decay=0.1)
    ebm.TrainConfig(optimizer=optax.adam(1e-3), weight_decay=0.0)  # no decay: fine


def test_a_decay_is_refused_with_any_optimizer_but_resolves_own():
    """The refusal does not hang on ``schedule_steps``: a custom optimizer with the field set
    by hand is refused, and so is a resolved config whose decay no longer matches its
    optimizer's; resolve's own AdamW passes, also when the config is resolved again."""
    with pytest.raises(ValueError, match=r"custom optimizer"):
        ebm.TrainConfig(optimizer=optax.adam(1e-3), weight_decay=0.1, schedule_steps=10)
    resolved = ebm.TrainConfig(weight_decay=0.1).resolve(schedule_steps=10)
    assert resolved.resolve(schedule_steps=20).optimizer is resolved.optimizer
    with pytest.raises(ValueError, match=r"custom optimizer"):
        resolved.replace(weight_decay=0.2)
    plain = ebm.TrainConfig().resolve(schedule_steps=10)  # Adam, no decay
    with pytest.raises(ValueError, match=r"custom optimizer"):
        plain.replace(weight_decay=0.1)
    copied = copy.deepcopy(resolved)  # the same optimizer, rebuilt
    assert copied.optimizer is not resolved.optimizer
    assert copied.replace(schedule_steps=20).weight_decay == 0.1
