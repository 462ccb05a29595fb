"""Negative samplers: where chains start (persistent bank, replay with re-initialisation, short
runs from the base), what they write back, and the ``build`` registry."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from numpyro_ebm import negatives, samplers
from numpyro_ebm.training import TrainConfig

STILL = samplers.mala(step_size=1e-8)  # chains that barely move: the negatives show the starts


def setup(n=4000):
    data = jax.random.normal(jax.random.key(0), (n, 2)) * jnp.array([2.0, 0.5]) + 3.0
    return data, negatives.fit_base(data)


def flat_target(batch, base, energy=lambda z: 0.0 * jnp.sum(z)):
    """A ``Target`` with a flat energy (MALA then moves by ``√(2h)`` noise only)."""
    return negatives.Target(energy, batch, base, (2,))


def nearest_distance(points, data):
    return jnp.min(jnp.sum((points[:, None] - data[None]) ** 2, -1), axis=1)


def test_base_is_the_data_gaussian():
    data, base = setup()
    draws = base.sample(jax.random.key(1), 20_000)
    np.testing.assert_allclose(draws.mean(0), data.mean(0), atol=4 * 2.0 / np.sqrt(20_000))
    np.testing.assert_allclose(jnp.std(draws, 0), jnp.std(data, 0), rtol=0.03)


def test_initial_bank_is_made_of_training_points():
    data, base = setup()
    for sampler, size in (
        (negatives.Persistent(num_chains=64), 64),
        (negatives.Replay(num_chains=64, buffer_size=500), 500),
        (negatives.ShortRun(num_chains=64), 64),
    ):
        state = sampler.init(jax.random.key(2), data, base)
        assert state.bank.shape == (size, 2)
        # every row is one of the data points
        assert float(nearest_distance(state.bank, data).max()) == 0.0
        assert float(state.step_size) == pytest.approx(sampler.sampler.step_size)


@pytest.mark.parametrize("kind", ["persistent", "replay"])
def test_reinitialised_fraction_and_sources(kind):
    data, base = setup()
    batch = data[:256]
    settings = dict(num_chains=1000, reinit_fraction=0.1, sampler=STILL, num_mcmc_steps=1)
    if kind == "persistent":
        sampler = negatives.Persistent(**settings, num_recorded_chains=0)
    else:
        sampler = negatives.Replay(**settings, buffer_size=1000)
    bank = jnp.full((1000, 2), -100.0)  # far from all data
    state = sampler.init(jax.random.key(3), data, base)._replace(bank=bank)
    _, starts, _ = sampler.sample(jax.random.key(4), state, flat_target(batch, base))
    fresh = np.asarray(starts[:, 0] > -50)
    # Binomial(1000, 0.1): mean 100, sd 9.5
    assert abs(fresh.sum() - 100) < 4.5 * 9.5
    # re-initialised chains start at batch points (the still chains moved by ~1e-4)
    assert float(nearest_distance(starts[fresh], batch).max()) < 1e-6
    np.testing.assert_allclose(starts[~fresh], -100.0, atol=1e-3)


def test_short_runs_start_at_the_base_every_step():
    data, base = setup()
    sampler = negatives.ShortRun(num_chains=1000, sampler=STILL, num_mcmc_steps=1)
    state = sampler.init(jax.random.key(3), data, base)._replace(bank=jnp.full((1000, 2), -100.0))
    new, starts, _ = sampler.sample(jax.random.key(4), state, flat_target(data[:256], base))
    assert float(jnp.abs(starts.mean(0) - data.mean(0)).max()) < 0.3
    assert float(jnp.abs(starts.std(0) - data.std(0)).max()) < 0.2
    np.testing.assert_array_equal(new.bank, starts)  # the state keeps the last negatives


def test_persistent_chains_carry_over_between_steps():
    data, base = setup()
    sampler = negatives.Persistent(num_chains=64, reinit_fraction=0.0, num_mcmc_steps=3)
    state = sampler.init(jax.random.key(5), data, base)
    target = flat_target(data[:64], base, energy=lambda z: 0.5 * jnp.sum((z - 3.0) ** 2))
    new, finals, info = sampler.sample(jax.random.key(6), state, target)
    np.testing.assert_array_equal(new.bank, finals)
    assert not np.allclose(finals, state.bank)  # the chains moved
    assert 0.0 < float(info.acceptance_rate) <= 1.0
    assert float(info.step_size) == float(state.step_size)  # the step size used in this step
    assert float(new.step_size) != float(state.step_size)  # adapted for the next one


def test_replay_writes_the_finals_back_at_the_rows_it_drew():
    data, base = setup()
    # rows 10 apart: each negative is recognisably the bank row its chain started from
    bank = jnp.stack([10.0 * jnp.arange(200.0), jnp.zeros(200)], axis=1)
    sampler = negatives.Replay(
        num_chains=50, buffer_size=200, reinit_fraction=0.0, num_mcmc_steps=2,
        sampler=samplers.mala(step_size=0.01),
    )  # fmt: skip
    state = sampler.init(jax.random.key(7), data, base)._replace(bank=bank)
    new, finals, _ = sampler.sample(jax.random.key(8), state, flat_target(data[:64], base))
    rows = np.asarray(jnp.argmin(jnp.sum((finals[:, None] - bank[None]) ** 2, -1), axis=1))
    assert float(jnp.max(jnp.abs(finals - bank[rows]))) < 2.0  # started there, moved a little
    assert not np.allclose(finals, bank[rows])
    drawn = np.unique(rows)
    for row in drawn:  # the final of (one of) the chain(s) that started at the row
        assert any(np.array_equal(new.bank[row], finals[i]) for i in np.flatnonzero(rows == row))
    untouched = np.setdiff1d(np.arange(200), drawn)
    np.testing.assert_array_equal(new.bank[untouched], bank[untouched])


def test_build_maps_names_to_configured_samplers():
    assert set(negatives.KINDS) == {
        "persistent", "replay", "short_run", "generator", "hybrid", "contrastive_divergence",
        "parallel_tempering", "none",
    }  # fmt: skip
    replay = negatives.build("replay", num_chains=32, buffer_size=100, entropy="batch_norm")
    assert isinstance(replay, negatives.Replay)
    assert (replay.num_chains, replay.buffer_size) == (32, 100)
    assert negatives.build(replay) is replay
    generator = negatives.build("generator", optimizer=optax.adam(1e-3), num_chains=16)
    assert isinstance(generator, negatives.GeneratorNegatives) and generator.num_chains == 16
    assert negatives.Persistent(num_chains=8) == negatives.Persistent(num_chains=8)
    with pytest.raises(ValueError, match="unknown negatives"):
        negatives.build("cd")
    with pytest.raises(ValueError, match="generator optimizer"):
        negatives.build("generator")
    with pytest.raises(ValueError, match="num_recorded_chains"):
        negatives.Persistent(num_chains=4, num_recorded_chains=8)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -5.0, "0.2", True])
def test_a_bad_step_size_gain_or_amortization_weight_is_refused_by_name(value):
    adam = optax.adam(1e-3)
    for make in (negatives.Persistent, negatives.ShortRun, TrainConfig):
        with pytest.raises(ValueError, match="step_size_gain"):
            make(step_size_gain=value)
    for make in (lambda **kw: negatives.Hybrid(optimizer=adam, **kw), TrainConfig):
        with pytest.raises(ValueError, match="amortization_weight"):
            make(amortization_weight=value)
    assert negatives.Persistent(step_size_gain=0).step_size_gain == 0  # a fixed step size
    assert negatives.Hybrid(optimizer=adam, amortization_weight=0.0).amortization_weight == 0


@pytest.mark.parametrize(
    "sampler",
    [negatives.Persistent(num_chains=64, num_mcmc_steps=1), negatives.Replay(num_chains=64)],
    ids=["persistent", "replay"],
)
def test_chains_on_data_of_scale_20_tune_their_step_size_past_the_unit_scale_bound(sampler):
    """On N(0, 20²) data with the model at the data, MALA's best step is about 1.2 · 400 = 480.
    The step size used to stop at 10 (``STEP_SIZE_BOUNDS``, made for unit scale: chains at a
    fiftieth of their best step, acceptance near 1); the bounds now widen with the data's
    variances, and the step size gets to the target acceptance."""
    data = 20.0 * jax.random.normal(jax.random.key(0), (2000, 2))
    base = negatives.fit_base(data)
    target = negatives.Target(lambda z: 0.5 * jnp.sum(z**2) / 400.0, data[:256], base, (2,))
    state = sampler.init(jax.random.key(1), data, base)

    def one(state, key):
        state, _, info = sampler.sample(key, state, target)
        return state, info.acceptance_rate

    state, acceptance = jax.lax.scan(one, state, jax.random.split(jax.random.key(2), 300))
    assert 100.0 < float(state.step_size) < 2000.0
    assert abs(float(jnp.mean(acceptance[-50:])) - sampler.sampler.target) < 0.1
