"""What the samplers and the negative samplers accept: the chains' dtype (at least JAX's
default float, also under ``jax_enable_x64``), the inputs of ``sample_chains``, ``warmup`` and
``run_chains`` (refused before any compute), the counts of chains and recorded chains, the
sampler of conditional sites and the chains the devices must divide."""

import os
import subprocess
import sys
import textwrap

import blackjax
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
import pytest

import numpyro_ebm as ebm
from numpyro_ebm import samplers
from numpyro_ebm.samplers import draws as draws_module
from numpyro_ebm.training import core

TINY = dict(
    num_steps=2,
    num_chains=16,
    num_mcmc_steps=2,
    batch_size=16,
    steps_per_call=2,
    track_log_z=False,
    progress_bar=False,
)


def standard_normal(x):
    return -0.5 * jnp.sum(x**2)


def toy_data(n=256, dtype=jnp.float32):
    x = jax.random.normal(jax.random.key(0), (n, 2)) * jnp.array([1.0, 2.0]) + 1.0
    return x.astype(dtype)


# -- the chains' dtype ------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", samplers.KERNELS)
def test_chains_of_float32_positions_run_in_float64_under_x64(kernel):
    with jax.enable_x64():
        sampler = samplers.get_sampler(kernel)
        states = sampler.init_chains(jnp.zeros((4, 2), jnp.float32), standard_normal)
        states, trace, _ = samplers.run_chains(
            jax.random.key(0), sampler, standard_normal, states, 0.1, 3
        )
        assert states.position.dtype == trace.logdensity.dtype == jnp.float64


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("kernel", ["mala", "barker", "hmc"])
def test_sample_chains_runs_half_precision_starting_points_in_float32(dtype, kernel):
    draws, step_size = samplers.sample_chains(
        jax.random.key(0),
        samplers.get_sampler(kernel),
        standard_normal,
        jnp.zeros((4, 2), dtype),
        3,
        draws=samplers.DrawSettings(num_warmup=4),
    )
    assert draws.positions.dtype == step_size.dtype == jnp.float32
    assert draws.positions.shape == (4, 3, 2) and np.all(np.isfinite(draws.positions))


def test_a_step_refuses_a_state_narrower_than_the_default_float_clearly():
    state = blackjax.mala.init(jnp.zeros(2, jnp.float16), standard_normal)  # not Sampler.init
    with pytest.raises(TypeError, match="at least JAX's default float dtype"):
        samplers.mala().step(jax.random.key(0), state, standard_normal, 0.1)


def test_fit_inputs_are_promoted_to_the_default_float_under_x64():
    with jax.enable_x64():
        x = toy_data(8)
        energy = ebm.energies.GaussianEnergy(jnp.zeros(2))
        inputs, validation, _ = ebm.training.inputs.checked_inputs(
            energy, x, None, x[:4], 6, 2, 10, None
        )
        assert inputs.dtype == validation.dtype == jnp.float64


@pytest.mark.parametrize("negatives", ["persistent", "short_run"])  # replay: persistent's bank
def test_fit_under_x64_trains_float32_data_in_float64(negatives):
    with jax.enable_x64():
        energy = ebm.energies.MLPEnergy(2, hidden=(4,), key=jax.random.key(1))
        res = ebm.fit(energy, toy_data(), key=jax.random.key(2), negatives=negatives, **TINY)
        assert res.chains.dtype == jnp.float64
        assert np.isfinite(res.history["loss"]).all()


def test_maximum_likelihood_under_x64_trains_float32_observations():
    """The site's bank started in float32 and its chains ran in float64: the scan refused."""
    from numpyro.contrib.module import eqx_module

    with jax.enable_x64():
        data = toy_data()

        def model(x):
            energy = ebm.energies.MLPEnergy(2, hidden=(4,), key=jax.random.key(1))
            energy = eqx_module("energy", energy)
            with numpyro.plate("rows", x.shape[0]):
                numpyro.sample("x", ebm.EnergyDistribution(energy, event_shape=(2,)), obs=x)

        learner = ebm.MaximumLikelihood(model, optax.adam(1e-3), num_chains=16)
        result = learner.run(jax.random.key(2), 3, data)
        assert np.isfinite(result.history["loss"]).all()


# -- sample_chains, warmup and run_chains: inputs refused before any compute -----------------


@pytest.fixture
def no_compute(monkeypatch):
    monkeypatch.setattr(draws_module, "warmup", lambda *a, **k: pytest.fail("warm-up started"))


def _sample(positions, num_draws=3, **kwargs):
    settings = samplers.DrawSettings(num_warmup=2)
    return samplers.sample_chains(
        jax.random.key(0), samplers.mala(), standard_normal, positions, num_draws,
        draws=settings, **kwargs,
    )  # fmt: skip


def test_sample_chains_refuses_an_event_shape_of_another_size_before_compute(no_compute):
    with pytest.raises(ValueError, match=r"event_shape \(3,\) holds 3 numbers.*dim 2"):
        _sample(jnp.zeros((4, 2)), event_shape=(3,))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_sample_chains_refuses_non_finite_starting_points_before_compute(no_compute, bad):
    with pytest.raises(ValueError, match="positions contains 1 non-finite value"):
        _sample(jnp.zeros((4, 2)).at[0, 0].set(bad))


def test_sample_chains_refuses_integer_starting_points_before_compute(no_compute):
    with pytest.raises(ValueError, match="positions must have a floating-point dtype"):
        _sample(jnp.zeros((4, 2), jnp.int32))


def test_sample_chains_takes_numpy_integer_counts():
    draws, _ = _sample(jnp.zeros((4, 2)), num_draws=np.int64(5), event_shape=np.array([1, 2]))
    assert draws.positions.shape == (4, 5, 1, 2)
    settings = samplers.DrawSettings(num_chains=np.int64(4), num_warmup=np.int32(3))
    assert (settings.num_chains, settings.num_warmup) == (4, 3)
    assert type(settings.num_chains) is int and type(settings.num_warmup) is int
    with pytest.raises(ValueError, match="num_chains must be None or an integer >= 1"):
        samplers.DrawSettings(num_chains=True)


def test_warmup_and_run_chains_refuse_bad_counts_and_step_sizes():
    sampler = samplers.ula()
    states = sampler.init_chains(jnp.zeros((4, 2)), standard_normal)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 0"):
        samplers.warmup(key, sampler, standard_normal, states, -4)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 0"):
        samplers.run_chains(key, sampler, standard_normal, states, 0.1, -3)
    for step_size in (-0.1, 0.0, jnp.float32(-0.1), np.inf, True):
        with pytest.raises(ValueError, match="step_size must be a finite number > 0"):
            samplers.warmup(key, sampler, standard_normal, states, 10, step_size=step_size)
        with pytest.raises(ValueError, match="step_size must be a finite number > 0"):
            samplers.run_chains(key, sampler, standard_normal, states, step_size, 2)
    states, h, _ = samplers.warmup(key, sampler, standard_normal, states, 2, jnp.float32(0.1))
    assert float(h) == pytest.approx(0.1) and np.isfinite(states.position).all()


def test_traced_step_sizes_and_positions_are_still_accepted_under_jit():
    sampler = samplers.mala()

    @jax.jit
    def run(positions, h):
        states = sampler.init_chains(positions, standard_normal)
        states, _, _ = samplers.run_chains(
            jax.random.key(0), sampler, standard_normal, states, h, 2
        )
        draws, _ = samplers.sample_chains(
            jax.random.key(1), sampler, standard_normal, positions, 2,
            draws=samplers.DrawSettings(num_warmup=2),
        )  # fmt: skip
        return states.position, draws.positions

    final, drawn = run(jnp.zeros((3, 2)), 0.1)
    assert final.shape == (3, 2) and drawn.shape == (3, 2, 2)


# -- how many chains are recorded -------------------------------------------------------------


def test_a_few_chains_record_all_of_them_by_default(resolved_config_of):
    assert resolved_config_of(num_chains=4).negatives.num_recorded_chains == 4
    assert resolved_config_of().negatives.num_recorded_chains == 8  # as before
    persistent = ebm.negatives.Persistent(num_chains=4)
    assert persistent.num_recorded_chains == 4
    assert persistent.replace(num_chains=64).num_recorded_chains == 8  # the default follows
    assert ebm.negatives.Persistent().replace(num_chains=2).num_recorded_chains == 2
    assert ebm.negatives.Replay(num_chains=3).num_recorded_chains == 3
    assert persistent.replace(num_recorded_chains=1).replace(num_chains=64).num_recorded_chains == 1
    with pytest.raises(ValueError, match=r"num_recorded_chains \(8\) cannot exceed num_chains"):
        ebm.negatives.Persistent(num_chains=4, num_recorded_chains=8)  # a value given: checked
    with pytest.raises(ValueError, match=r"num_recorded_chains \(8\) cannot exceed num_chains"):
        resolved_config_of(num_chains=4, num_recorded_chains=8)


def test_generator_negatives_built_with_a_few_chains_record_them_all_by_default():
    for kind in (ebm.negatives.GeneratorNegatives, ebm.negatives.Hybrid):
        negatives = kind(optimizer=optax.adam(1e-3), entropy="batch_norm", num_chains=4)
        assert negatives._num_recorded == 4
        with pytest.raises(ValueError, match=r"num_recorded_chains \(8\) cannot exceed"):
            kind(optimizer=optax.adam(1e-3), num_chains=4, num_recorded_chains=8)


def test_contrastive_divergence_does_not_check_its_unused_num_chains(resolved_config_of):
    config = resolved_config_of(negatives="contrastive_divergence", num_chains=4)
    assert isinstance(config.negatives, ebm.negatives.ContrastiveDivergence)
    cd = ebm.negatives.ContrastiveDivergence(num_chains=4, num_recorded_chains=8)
    assert cd.num_recorded_chains == 8
    with pytest.raises(ValueError, match="num_recorded_chains must be an integer >= 0"):
        ebm.negatives.ContrastiveDivergence(num_recorded_chains=-1)


def test_fit_with_four_chains_records_the_four():
    energy = ebm.energies.GaussianEnergy(jnp.zeros(2))
    res = ebm.fit(
        energy, toy_data(), key=jax.random.key(2), **{**TINY, "num_chains": 4, "record_every": 1}
    )
    assert res.chains.shape == (4, 2)
    assert res.recorded_chains.positions.shape[0] == 4


# -- the sampler of conditional sites ---------------------------------------------------------


def _conditional_site():
    return core.Site(lambda x, c: jnp.sum(x**2), jnp.zeros((4, 2)), jnp.zeros((4, 1)))


def test_the_conditional_fallback_runs_the_configured_kernel_steps_and_gain():
    for negatives in ("generator", "persistent"):
        config = ebm.TrainConfig(
            negatives=negatives, sampler="hmc", num_mcmc_steps=3, step_size_gain=0.05
        ).resolve(10)
        cd = core.sampler_for(_conditional_site(), config)
        assert isinstance(cd, ebm.negatives.ContrastiveDivergence)
        assert (cd.sampler.kernel, cd.num_mcmc_steps, cd.step_size_gain) == ("hmc", 3, 0.05)
    # a configured sampler's own settings win over the config's
    own = ebm.negatives.Persistent(sampler="barker", num_mcmc_steps=7)
    cd = core.sampler_for(_conditional_site(), ebm.TrainConfig(negatives=own).resolve(10))
    assert (cd.sampler.kernel, cd.num_mcmc_steps) == ("barker", 7)


@pytest.mark.parametrize(
    "bad", [ebm.negatives.Persistent(num_chains=32), "contrastive_divergence", 3]
)
def test_conditional_negatives_that_cannot_handle_conditions_are_refused(bad, monkeypatch):
    with pytest.raises(ValueError, match="conditional_negatives must be None or a configured"):
        ebm.TrainConfig(conditional_negatives=bad)
    monkeypatch.setattr(core, "init", lambda *a: pytest.fail("fit started to compute"))
    energy = jax.tree_util.Partial(lambda p, x, c: jnp.sum((x - p * c) ** 2), jnp.ones(()))
    x = toy_data(64)
    with pytest.raises(ValueError, match="conditional_negatives must be None or a configured"):
        ebm.fit(energy, x, condition=x[:, :1], key=jax.random.key(0), conditional_negatives=bad)
    for good in (None, ebm.negatives.ContrastiveDivergence(num_mcmc_steps=3)):
        assert ebm.TrainConfig(conditional_negatives=good).conditional_negatives == good


# -- the chains the devices must divide -------------------------------------------------------

DEVICES_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp
    import numpyro_ebm as ebm
    from numpyro_ebm.training import core
    assert jax.device_count() == 2
    def reached(*args):
        raise RuntimeError("REACHED")
    core.init = reached
    data = jax.random.normal(jax.random.key(0), (64, 2))
    energy = ebm.energies.GaussianEnergy(jnp.zeros(2))
    cases = {
        "own64": dict(negatives=ebm.negatives.Persistent(num_chains=64), num_chains=33),
        "own33": dict(negatives=ebm.negatives.Persistent(num_chains=33)),
        "cd": dict(negatives="contrastive_divergence", num_chains=33),
    }
    for label, settings in cases.items():
        try:
            ebm.fit(energy, data, key=jax.random.key(1), batch_size=64, **settings)
        except Exception as err:
            print(label, type(err).__name__, str(err).splitlines()[0])
    """
)


def test_the_devices_must_divide_the_chains_of_the_sampler_that_runs():
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
    }
    out = subprocess.run(
        [sys.executable, "-c", DEVICES_SCRIPT], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["own64"] == "RuntimeError REACHED"  # its own 64 chains split over 2 devices
    assert lines["cd"] == "RuntimeError REACHED"  # its chains are the batch's rows
    assert lines["own33"].startswith("ValueError with 2 devices, num_chains (33)")
