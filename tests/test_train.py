"""Maximum-likelihood training: the gradient, recovery of a known model, guards, resume."""

import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import numpyro_ebm as ebm
from numpyro_ebm import training
from numpyro_ebm.energies import GaussianEnergy
from numpyro_ebm.training import checkpoint, core, loop

MEAN = jnp.array([1.0, -2.0])
COV = jnp.array([[1.0, 0.5], [0.5, 0.8]])


def small_fit(energy, data, key, **kwargs):
    """A short ``fit``; the log Z tracker is off unless asked for (its compilation would double
    most tests' time; the tests that need it say so)."""
    defaults = dict(
        track_log_z=False,
        num_steps=20,
        num_chains=64,
        num_mcmc_steps=5,
        batch_size=64,
        steps_per_call=5,
        progress_bar=False,
    )
    return ebm.fit(energy, data, key=key, **{**defaults, **kwargs})


def test_gradient_estimator_equals_the_ml_gradient_with_exact_negatives():
    """E_data[∇E] − mean over exact model samples of ∇E  ≈  ∇(mean E(data) + log Z)."""
    model = GaussianEnergy(jnp.array([0.3, -0.1]), jnp.array([[1.5, 0.2], [0.2, 0.7]]))
    data = jax.random.multivariate_normal(jax.random.key(0), MEAN, COV, (500,))
    n = 100_000
    negatives = jax.random.multivariate_normal(
        jax.random.key(1), model.mean, model.covariance, (n,)
    )

    def estimate(e):
        return jnp.mean(training.LikelihoodObjective().terms(e, data, negatives).per_event)

    def exact_nll(e):
        return jnp.mean(jax.vmap(e)(data)) + e.log_z

    est = jax.grad(estimate)(model)
    exact = jax.grad(exact_nll)(model)
    # Monte Carlo standard error of the negative-phase term, per parameter
    per_sample = jax.vmap(jax.grad(lambda e, x: e(x)), in_axes=(None, 0))(model, negatives)
    se = jax.tree.map(lambda g: jnp.std(g, axis=0) / np.sqrt(n), per_sample)
    for got, want, err in zip(
        jax.tree.leaves(est), jax.tree.leaves(exact), jax.tree.leaves(se), strict=True
    ):
        np.testing.assert_array_less(np.abs(got - want), 5 * err + 1e-6)
    # and the estimator is NOT the gradient of a log-sum over training points (the classic bug)
    wrong = jax.grad(lambda e: jnp.mean(jax.vmap(e)(data)) + jax.nn.logsumexp(-jax.vmap(e)(data)))(
        model
    )
    assert np.abs(wrong.mean - exact.mean).max() > 0.1


def _fit_gaussian(data, **settings):
    """A ``GaussianEnergy`` fitted to ``data`` with settings under which it converges."""
    settings = dict(num_steps=600, num_chains=512, num_mcmc_steps=10, batch_size=512) | settings
    return ebm.fit(
        GaussianEnergy(jnp.zeros(2)),
        data,
        key=jax.random.key(3),
        learning_rate=2e-2,
        energy_l2=0.0,
        progress_bar=False,
        **settings,
    )


def test_gaussian_energy_trained_on_gaussian_data_recovers_mean_and_covariance():
    data = jax.random.multivariate_normal(jax.random.key(2), MEAN, COV, (20_000,))
    res = _fit_gaussian(data)
    # The maximum-likelihood answer is the data's own mean and covariance. The stochastic
    # gradient noise of the averaged iterate (512 chains + 512 data per step, Adam at lr 2e-3 at
    # the end, averaging window ~200 steps) is about 0.01 per entry; 0.05 is 5 of those.
    mle_mean = data.mean(0)
    mle_cov = jnp.cov(data.T)
    np.testing.assert_allclose(res.energy.mean, mle_mean, atol=0.05)
    np.testing.assert_allclose(res.energy.covariance, mle_cov, atol=0.05)
    assert bool(np.all(res.history["is_finite"]))
    assert res.history["loss"].shape == (600,)
    # the log Z tracked on the way matches the trained Gaussian's exact log Z within its error
    # bar, and so does the noise-contrastive one learned beside it
    error = res.log_z.value - float(res.energy.log_z)
    assert res.log_z.method == "tracked"
    assert abs(error) < min(0.05, 3 * res.log_z.stderr), (error, res.log_z.stderr)
    assert abs(res.log_z.info["nce"] - float(res.energy.log_z)) < 0.05


def test_augmented_batches_are_what_is_fitted():
    """``augment`` adds N(0, 0.5²) noise to every batch: the maximum-likelihood Gaussian of
    the noisy data is the data's mean and covariance + 0.25 I."""
    data = jax.random.multivariate_normal(jax.random.key(2), MEAN, COV, (20_000,))

    def blur(key, points):
        return points + 0.5 * jax.random.normal(key, points.shape)

    res = _fit_gaussian(data, track_log_z=False, augment=blur)
    # as in the test above, ~0.01 of gradient noise per entry (a little more with the
    # noise's variance): 0.05 is about 4 of those, and the 0.25 shift is 20
    np.testing.assert_allclose(res.energy.mean, data.mean(0), atol=0.05)
    blurred = jnp.cov(data.T) + 0.25 * jnp.eye(2)
    np.testing.assert_allclose(res.energy.covariance, blurred, atol=0.05)


def test_augment_must_be_a_function():
    with pytest.raises(ValueError, match="augment must be a function"):
        ebm.fit(GaussianEnergy(jnp.zeros(2)), jnp.ones((8, 2)), key=jax.random.key(0), augment=3)


@pytest.mark.parametrize(
    ("augment", "message"),
    [
        (lambda key, x: x[:, :1], "shape and dtype"),
        (lambda key, x: x.astype(jnp.int32), "shape and dtype"),
        (lambda key: key, "fails on a batch"),
    ],
)
def test_an_augment_that_breaks_the_batch_is_refused_before_training(augment, message):
    with pytest.raises(ValueError, match=message):
        ebm.fit(
            GaussianEnergy(jnp.zeros(2)), jnp.ones((8, 2)), key=jax.random.key(0), augment=augment
        )


def test_augment_touches_a_conditional_batch_s_points_not_its_conditions():
    problem = training.EnergyProblem(4, conditional=True, augment=lambda key, x: x + 1.0)
    points, conditions = jnp.zeros((10, 2)), jnp.arange(10.0)[:, None]
    augmented, kept = problem.batch(jax.random.key(0), (points, conditions))
    np.testing.assert_array_equal(augmented, jnp.ones((4, 2)))
    assert kept.shape == (4, 1) and set(np.asarray(kept[:, 0]).tolist()) <= set(range(10))


def test_nce_loss_is_minimised_at_the_true_log_z():
    energy = GaussianEnergy(jnp.array([0.5, -0.5]), jnp.array([[1.0, 0.3], [0.3, 0.6]]))
    n = 200_000
    model = jax.random.multivariate_normal(jax.random.key(20), energy.mean, energy.covariance, (n,))
    base = ebm.negatives.fit_base(jax.random.normal(jax.random.key(21), (5000, 2)) * 1.5)
    noise = base.sample(jax.random.key(22), n)
    # the loss is convex in c (a logistic loss of a logit affine in c): its minimiser is where
    # the derivative changes sign, found by bisection on [log Z − 0.3, log Z + 0.3]
    gradient = jax.jit(jax.grad(ebm.logz.nce_log_z_loss))

    def slope(c):
        return float(gradient(jnp.float32(c), energy, model, noise, base))

    low, high = float(energy.log_z) - 0.3, float(energy.log_z) + 0.3
    assert slope(low) < 0 < slope(high)
    for _ in range(12):  # to 0.6 / 2¹² ≈ 1.5e-4
        middle = 0.5 * (low + high)
        low, high = (low, middle) if slope(middle) > 0 else (middle, high)
    best = 0.5 * (low + high)
    # NCE's asymptotic standard error for c with n + n samples and a decent noise is ~1/sqrt(n)
    assert abs(best - float(energy.log_z)) < 5 / np.sqrt(n) + 1e-3


def test_bad_data_is_rejected_before_compute():
    energy = ebm.energies.MLPEnergy(2, hidden=(8,), key=jax.random.key(0))
    data = np.ones((10, 2), np.float32)
    data[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        small_fit(energy, data, jax.random.key(1))
    with pytest.raises(ValueError, match="float"):
        small_fit(energy, np.ones((10, 2), np.int32), jax.random.key(1))
    with pytest.raises(ValueError, match="ONE event of shape \\(3,\\)"):
        small_fit(energy, np.ones((10, 3), np.float32), jax.random.key(1))
    with pytest.raises(ValueError, match="unknown negatives"):
        small_fit(energy, np.ones((10, 2), np.float32), jax.random.key(1), negatives="cd")
    conditional = jax.tree_util.Partial(lambda a, y, c: jnp.sum((y - a * c) ** 2), jnp.ones(()))
    y, c = np.ones((10, 1), np.float32), np.zeros((10, 1), np.float32)
    for validation, match in ((y, "pair"), ((y, c[:9]), "one condition per point")):
        with pytest.raises(ValueError, match=match):
            small_fit(conditional, y, jax.random.key(1), condition=c, validation_data=validation)


@pytest.mark.parametrize(
    "energy",
    [
        lambda x: jnp.sum(x**2),  # a plain function: nothing to train
        jax.tree_util.Partial(lambda s, x: s * jnp.sum(x**2), 1.0),  # a Python float is static
    ],
)
def test_an_energy_with_nothing_to_train_is_refused_with_what_to_do(energy):
    with pytest.raises(ValueError, match=r"Partial\(fn, params\).*eqx.Module"):
        small_fit(energy, np.ones((10, 2), np.float32), jax.random.key(1))


@pytest.mark.parametrize(
    "setting",
    [
        {"max_nonfinite": 0},
        {"learning_rate": -1e-3},
        {"learning_rate": 0.0},
        {"learning_rate": float("nan")},
        {"log_z_learning_rate": -0.01},
        {"log_z_learning_rate": float("inf")},
        {"generator_learning_rate": -1e-3, "negatives": "generator"},
    ],
)
def test_bad_learning_rates_and_max_nonfinite_are_refused_before_compute(setting, monkeypatch):
    def no_compute(*args, **kwargs):
        raise AssertionError("reached the training step")

    monkeypatch.setattr(core, "init", no_compute)
    energy = ebm.energies.MLPEnergy(2, hidden=(8,), key=jax.random.key(0))
    name = next(k for k in setting if k != "negatives")
    with pytest.raises(ValueError, match=name):
        small_fit(energy, np.ones((10, 2), np.float32), jax.random.key(1), **setting)


MEAN3 = jnp.array([0.5, -1.0, 2.0])
COV3 = jnp.array([[1.0, 0.6, 0.3], [0.6, 1.5, -0.4], [0.3, -0.4, 0.8]])


def test_the_default_energy_penalty_does_not_bias_the_gaussian_mle():
    """Default settings (energy_l2 > 0, EMA on) recover the MLE of a 3-D Gaussian."""
    data = jax.random.multivariate_normal(jax.random.key(30), MEAN3, COV3, (20_000,))
    res = ebm.fit(
        GaussianEnergy(jnp.zeros(3)),
        data,
        key=jax.random.key(31),
        num_steps=1000,
        num_chains=512,
        batch_size=512,
        num_mcmc_steps=5,
        learning_rate=2e-2,
        progress_bar=False,
    )
    assert res.config.energy_l2 == ebm.training.default_energy_l2(3) > 0  # the default is on
    mle_mean = np.asarray(data.mean(0))
    mle_cov = np.cov(np.asarray(data).T)
    scale = np.sqrt(np.outer(np.diag(mle_cov), np.diag(mle_cov)))
    # Tolerance 2% of the scale (√(Σᵢᵢ Σⱼⱼ) for Σᵢⱼ, √Σᵢᵢ for μᵢ). The noise of the averaged
    # iterate: each step's 512 negatives estimate a second moment with relative sd √(2/512) ≈
    # 0.06; the EMA (window ~200 steps at the decayed Adam rate 2e-3) averages it to ~0.005,
    # so 2% is ~4 standard errors. The old penalty α(mean E(data)² + mean E(neg)²) inflated
    # every entry by ~10% here.
    np.testing.assert_array_less(np.abs(np.asarray(res.energy.covariance) - mle_cov), 0.02 * scale)
    np.testing.assert_array_less(
        np.abs(np.asarray(res.energy.mean) - mle_mean), 0.02 * np.sqrt(np.diag(mle_cov))
    )
    # log Z = ½ log det(2πΣ): 2% per variance is 0.01 per dimension
    mle_log_z = float(GaussianEnergy(mle_mean, mle_cov).log_z)
    assert abs(res.log_z.value - mle_log_z) < 0.03
    assert abs(float(res.energy.log_z) - mle_log_z) < 0.03


def test_free_constants_are_the_additive_constants_of_the_energy():
    data = jax.random.normal(jax.random.key(32), (256, 2))
    config = ebm.TrainConfig(optimizer=optax.adam(1e-3), track_log_z=False)
    config = config.resolve(schedule_steps=1)

    def mask_of(energy):
        return training.energy_init(jax.random.key(33), energy, data, config).free_constant["x"]

    mlp = mask_of(ebm.energies.MLPEnergy(2, hidden=(8, 8), key=jax.random.key(34)))
    *hidden, last = mlp.net.layers
    assert float(last.bias.sum()) == 1.0 and float(last.weight.sum()) == 0.0
    assert all(float(layer.weight.sum() + layer.bias.sum()) == 0.0 for layer in hidden)
    for energy in (
        GaussianEnergy(jnp.zeros(2)),
        ebm.energies.DeepEnergy(2, hidden=(8,), num_experts=4, key=jax.random.key(35)),
    ):  # no free constant: nothing can drift, no penalty
        assert sum(float(leaf.sum()) for leaf in jax.tree.leaves(mask_of(energy))) == 0.0


def test_the_stabiliser_acts_on_energies_with_a_free_constant():
    data = ebm.datasets.toy("8gaussians").sample(jax.random.key(36), 2000)
    energy = ebm.energies.MLPEnergy(2, hidden=(16, 16), key=jax.random.key(37))
    last = energy.net.layers[-1]
    shifted = eqx.tree_at(lambda e: e.net.layers[-1].bias, energy, last.bias + 2.0)
    runs = {
        l2: small_fit(
            shifted, data, jax.random.key(38), num_steps=300, energy_l2=l2, ema_decay=None
        )
        for l2 in (0.0, 0.01)
    }
    # without the penalty the ML gradient of the output bias is exactly 0: the bias stays
    np.testing.assert_array_equal(runs[0.0].energy.net.layers[-1].bias, last.bias + 2.0)
    # with it the energies are pulled towards 0 (Adam moves each parameter by at most ~ the
    # learning rate per step)
    h = runs[0.01].history
    centre = 0.5 * (h["energy_data"] + h["energy_negatives"])
    assert centre[0] > 1.5 and centre[-20:].mean() < centre[0] - 0.8
    assert bool(np.all(np.abs(h["energy_data"]) < 5)) and bool(np.all(h["is_finite"]))


def _one_sgd_step(energy, data, energy_l2):
    """One step's state; without the log Z tracker (the parameters' step does not use it)."""
    config = ebm.TrainConfig(
        optimizer=optax.sgd(1e-2), energy_l2=energy_l2, num_chains=64, batch_size=64,
        track_log_z=False,
    ).resolve(schedule_steps=10)  # fmt: skip
    state = training.energy_init(jax.random.key(39), energy, data, config)
    return eqx.filter_jit(training.energy_step)(jax.random.key(40), state, data[:64], config)[0]


def test_the_stabiliser_is_the_gradient_of_alpha_times_the_mean_squared_energies():
    """One SGD step with ``energy_l2=1`` moves every parameter by ``−lr ∇(mean E(data)² +
    mean E(neg)²)`` more than without (at step 0 the decay has not started)."""
    data = ebm.datasets.toy("8gaussians").sample(jax.random.key(36), 2000)
    energy = ebm.energies.MLPEnergy(2, hidden=(16, 16), key=jax.random.key(37))
    without, with_penalty = (_one_sgd_step(energy, data, l2) for l2 in (0.0, 1.0))
    negatives = without.negatives["x"].bank  # persistent chains: the step's negatives
    np.testing.assert_array_equal(negatives, with_penalty.negatives["x"].bank)

    def penalty(e):
        return jnp.mean(jax.vmap(e)(data[:64]) ** 2) + jnp.mean(jax.vmap(e)(negatives) ** 2)

    grad = eqx.filter_grad(penalty)(energy)
    expected = jax.tree.map(lambda w, g: w - 1e-2 * g, eqx.filter(without.params, eqx.is_array),
                            eqx.filter(grad, eqx.is_array))  # fmt: skip
    got = eqx.filter(with_penalty.params, eqx.is_array)
    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6)


def test_an_energy_without_a_free_constant_gets_no_stabiliser():
    data = jax.random.normal(jax.random.key(41), (500, 2))
    energy = ebm.energies.GaussianEnergy(jnp.ones(2), 2.0 * jnp.eye(2))
    without, with_penalty = (_one_sgd_step(energy, data, l2) for l2 in (0.0, 1.0))
    assert eqx.tree_equal(without.params, with_penalty.params)


def test_the_stabiliser_decays_like_the_learning_rate():
    config = ebm.TrainConfig(energy_l2=0.02).resolve(schedule_steps=100)
    weights = [float(config.energy_l2_at(jnp.int32(t))) for t in (0, 50, 100, 400)]
    np.testing.assert_allclose(weights, [0.02, 0.02 * 0.55, 0.002, 0.002], rtol=1e-6)
    constant = config.replace(energy_l2_decay=None)
    assert float(constant.energy_l2_at(jnp.int32(100))) == 0.02


def nan_at(step_index):
    """An optimizer whose update is NaN at one step (or every step with step_index=None)."""

    def init_fn(params):
        return jnp.zeros((), jnp.int32)

    def update_fn(updates, count, params=None):
        bad = jnp.asarray(True) if step_index is None else count == step_index
        scaled = jax.tree.map(lambda g: jnp.where(bad, jnp.nan, -1e-3 * g), updates)
        return scaled, count + 1

    return optax.GradientTransformation(init_fn, update_fn)


def test_a_forced_non_finite_step_is_rejected():
    data = jax.random.normal(jax.random.key(4), (256, 2))
    energy = GaussianEnergy(jnp.zeros(2))
    config = ebm.TrainConfig(
        optimizer=optax.adam(1e-2), num_chains=32, num_mcmc_steps=3, batch_size=8
    ).resolve(schedule_steps=1)
    state = training.energy_init(jax.random.key(5), energy, data, config)
    jit_step = eqx.filter_jit(training.energy_step)
    good, info = jit_step(jax.random.key(6), state, data[:8], config)
    assert bool(info.is_finite) and not np.allclose(good.params.mean, state.params.mean)
    poisoned = data[:8].at[2, 0].set(jnp.inf)  # what a corrupted batch would do
    after, info = jit_step(jax.random.key(7), good, poisoned, config)
    assert not bool(info.is_finite)
    # a rejected step is not a training step: the counter stays (see test_checkpoint.py)
    assert int(after.step) == int(good.step) and int(after.consecutive_nonfinite) == 1
    for name in ("params", "average_params", "opt_state", "negatives", "log_z"):
        for a, b in zip(
            jax.tree.leaves(getattr(after, name)), jax.tree.leaves(getattr(good, name)), strict=True
        ):
            np.testing.assert_array_equal(a, b)
    recovered, info = jit_step(jax.random.key(8), after, data[:8], config)
    assert bool(info.is_finite) and int(recovered.consecutive_nonfinite) == 0


def test_repeated_non_finite_steps_stop_the_run_and_keep_the_last_good_state(tmp_path):
    data = jax.random.normal(jax.random.key(6), (256, 2))
    energy = GaussianEnergy(jnp.zeros(2))
    with pytest.warns(RuntimeWarning), pytest.raises(ebm.TrainingDivergedError) as err:
        small_fit(
            energy,
            data,
            jax.random.key(7),
            optimizer=nan_at(None),
            max_nonfinite=3,
            checkpoint_dir=tmp_path,
        )
    state = err.value.state
    np.testing.assert_array_equal(state.params.mean, energy.mean)  # never corrupted
    assert int(state.consecutive_nonfinite) >= 3
    assert training.checkpoint_step(str(tmp_path)) == 0


class SiluMLPEnergy(eqx.Module):
    """An energy as equinox users write it: eqx.nn.MLP keeps its activation as a field."""

    mlp: eqx.nn.MLP

    def __init__(self, dim, *, key):
        self.mlp = eqx.nn.MLP(dim, "scalar", 16, 2, activation=jax.nn.silu, key=key)

    def __call__(self, x):
        return self.mlp(x) + 0.01 * jnp.sum(x**2)


@pytest.mark.parametrize("make_energy", [ebm.energies.MLPEnergy, SiluMLPEnergy])
def test_resumed_run_continues_the_same_trajectory(tmp_path, monkeypatch, make_energy):
    data = ebm.datasets.toy("8gaussians").sample(jax.random.key(8), 2000)
    if make_energy is SiluMLPEnergy:
        energy = SiluMLPEnergy(2, key=jax.random.key(9))
    else:
        energy = ebm.energies.MLPEnergy(2, hidden=(16, 16), key=jax.random.key(9))
    # the tracker's particles go through the checkpoint too (one energy is enough for that)
    tracked = make_energy is ebm.energies.MLPEnergy
    settings = dict(num_steps=30, steps_per_call=5, checkpoint_every=10, track_log_z=tracked)
    straight = small_fit(energy, data, jax.random.key(10), **settings)

    real_save = checkpoint.save_checkpoint
    calls = []

    def crash_after_second_save(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(checkpoint, "save_checkpoint", crash_after_second_save)
    with pytest.raises(KeyboardInterrupt):
        small_fit(energy, data, jax.random.key(10), checkpoint_dir=tmp_path, **settings)
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    assert training.load_checkpoint(str(tmp_path), straight.state)[2]["step"] == 20
    resumed = small_fit(energy, data, jax.random.key(10), checkpoint_dir=tmp_path, **settings)

    for a, b in zip(jax.tree.leaves(straight.energy), jax.tree.leaves(resumed.energy), strict=True):
        if eqx.is_array(a):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        else:  # static leaves (the activation) come back as they were
            assert a is b
    if make_energy is SiluMLPEnergy:  # it trained: the weights moved
        moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), eqx.filter(energy, eqx.is_array),
                             eqx.filter(straight.energy, eqx.is_array))  # fmt: skip
        assert any(jax.tree.leaves(moved))
    np.testing.assert_allclose(straight.chains, resumed.chains, rtol=1e-6, atol=1e-6)
    names = ("loss", "energy_gap", "step_size") + (("log_z", "log_z_stderr") if tracked else ())
    for name in names:
        np.testing.assert_allclose(straight.history[name], resumed.history[name], rtol=1e-6)
    assert not any(name.startswith(".tmp") for name in os.listdir(tmp_path))


def test_checkpoint_of_another_configuration_is_refused(tmp_path):
    data = jax.random.normal(jax.random.key(11), (128, 2))
    small_fit(GaussianEnergy(jnp.zeros(2)), data, jax.random.key(12), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="different settings"):
        small_fit(
            GaussianEnergy(jnp.zeros(2)),
            data,
            jax.random.key(12),
            checkpoint_dir=tmp_path,
            num_chains=32,
        )


def test_no_recompilation_across_steps():
    traces = []

    def energy_fn(params, x):
        traces.append(1)  # runs only while JAX traces
        return 0.5 * jnp.sum((x - params["mean"]) ** 2)

    data = jax.random.normal(jax.random.key(13), (128, 2))

    def count(num_steps):
        traces.clear()
        training.default_optimizer.cache_clear()  # a new optimizer: every count compiles afresh
        energy = jax.tree_util.Partial(energy_fn, {"mean": jnp.zeros(2)})
        small_fit(energy, data, jax.random.key(14), num_steps=num_steps, track_log_z=True)
        return len(traces)

    count(5)  # warm any caches shared between runs
    assert count(40) == count(5)  # 8 compiled calls trace exactly as often as 1


@pytest.mark.parametrize("precision", ["float32", "tensorfloat32"])
def test_matmul_precision_is_set_while_the_step_is_compiled(precision, monkeypatch):
    seen = []
    compiled = loop.run_steps

    def spy(*args):
        seen.append(jax.config.jax_default_matmul_precision)
        return compiled(*args)

    monkeypatch.setattr(loop, "run_steps", spy)
    data = jax.random.normal(jax.random.key(15), (128, 2))
    energy = ebm.energies.MLPEnergy(2, hidden=(8,), key=jax.random.key(16))
    small_fit(energy, data, jax.random.key(17), matmul_precision=precision)
    assert seen == [precision] * 4
    with pytest.raises(ValueError, match="matmul_precision"):
        small_fit(energy, data, jax.random.key(17), matmul_precision="float16")


def test_the_state_is_donated_but_the_callers_energy_survives():
    data = jax.random.normal(jax.random.key(18), (128, 2))
    energy = ebm.energies.MLPEnergy(2, hidden=(8,), key=jax.random.key(19))
    before = np.asarray(energy(jnp.ones(2)))
    res = small_fit(energy, data, jax.random.key(20))
    # the caller's arrays are still alive and unchanged, and the next fit can reuse them
    assert np.asarray(energy(jnp.ones(2))) == before
    again = small_fit(energy, data, jax.random.key(20))
    assert np.array_equal(np.asarray(res.chains), np.asarray(again.chains))


@pytest.mark.parametrize("negatives", ["persistent", "replay", "short_run"])
@pytest.mark.parametrize("sampler", ["mala", "hmc", "ula", "barker"])
def test_every_sampler_and_negative_source_trains(sampler, negatives):
    data = jax.random.multivariate_normal(jax.random.key(15), MEAN, COV, (2000,))
    res = small_fit(
        GaussianEnergy(jnp.zeros(2)),
        data,
        jax.random.key(16),
        sampler=sampler,
        negatives=negatives,
        buffer_size=256,
        num_steps=60,
        learning_rate=5e-2,
    )
    assert bool(np.all(res.history["is_finite"]))
    expected_rows = 256 if negatives == "replay" else 64
    assert res.chains.shape == (expected_rows, 2)
    # the energy moved toward the data: the mean estimate is closer to the truth than at start.
    # Not for ULA short runs: 5 steps of h = 0.01 from the base Gaussian (fitted to the data)
    # leave the negatives at the base, whose mean already matches the data's: no signal. The
    # same holds for ULA's replay bank, which starts at the base and is refreshed at data
    # points; it passed before only because the old energy L2 penalty itself pulled the mean
    # towards the data (the bias that the centred penalty removed).
    if (sampler, negatives) not in (("ula", "short_run"), ("ula", "replay")):
        assert float(jnp.linalg.norm(res.energy.mean - MEAN)) < float(jnp.linalg.norm(MEAN)) / 2
    if sampler != "ula":
        assert abs(res.history["acceptance_rate"][-10:].mean() - res.config.sampler.target) < 0.1


def test_distribution_from_a_fit():
    data = jax.random.normal(jax.random.key(17), (256, 2))
    res = small_fit(GaussianEnergy(jnp.zeros(2)), data, jax.random.key(18))
    d = res.distribution(log_z=res.energy.log_z)
    x = jnp.zeros((3, 2))
    np.testing.assert_allclose(
        d.log_prob(x), -jax.vmap(res.energy)(x) - res.energy.log_z, rtol=1e-6
    )
    assert d.event_shape == (2,)
    assert eqx.tree_equal(res.distribution().energy, res.energy)


def test_calibrated_log_z_by_ais_after_fit():
    data = jax.random.multivariate_normal(jax.random.key(23), MEAN, COV, (2000,))
    res = small_fit(
        GaussianEnergy(jnp.zeros(2)),
        data,
        jax.random.key(24),
        num_steps=40,
        learning_rate=5e-2,
        calibrate_log_z=True,
        log_z_learning_rate=0.05,
    )
    exact = float(res.energy.log_z)
    assert res.log_z_ais.method == "ais"
    assert abs(res.log_z_ais.value - exact) < 4 * res.log_z_ais.stderr + 0.01
    # distribution() prefers the AIS value
    assert float(res.distribution().log_z) == pytest.approx(res.log_z_ais.value)


def test_resuming_with_another_learning_rate_is_refused(tmp_path):
    data = jax.random.normal(jax.random.key(21), (128, 2))
    energy = ebm.energies.MLPEnergy(2, hidden=(8,), key=jax.random.key(22))
    small_fit(energy, data, jax.random.key(23), checkpoint_dir=tmp_path)
    current = training.latest_checkpoint(str(tmp_path))
    for path in (current, os.path.join(current, "meta.json")):
        assert oct(os.stat(path).st_mode & 0o777)[-2:] != "00"  # not private
    with pytest.raises(ValueError, match="different settings"):
        small_fit(energy, data, jax.random.key(23), checkpoint_dir=tmp_path, learning_rate=1e-3)


def test_a_second_fit_with_the_default_optimizer_reuses_the_compiled_step(monkeypatch):
    traces = []
    step = core.step

    def spy(*args, **kwargs):
        traces.append(1)  # runs only while the compiled call is traced
        return step(*args, **kwargs)

    monkeypatch.setattr(core, "step", spy)
    data = jax.random.normal(jax.random.key(24), (128, 2))
    energy = ebm.energies.MLPEnergy(2, hidden=(8,), key=jax.random.key(25))
    for seed in (26, 27):  # another key and another fit: same configuration
        small_fit(
            energy, data, jax.random.key(seed), num_chains=24, batch_size=24, track_log_z=True
        )
    assert len(traces) == 1
