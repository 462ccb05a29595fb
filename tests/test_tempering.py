"""Parallel tempering: the engine (samplers.tempering), draws through it and the negative sampler.

Statistical tests use fixed seeds and tolerances of a few Monte Carlo standard errors, with the
standard error estimated from independent ladders (one number per ladder, so the correlation
along a ladder's rounds is inside it).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpyro_ebm as ebm
from numpyro_ebm import negatives, samplers
from numpyro_ebm.gaussian import fit_base
from numpyro_ebm.samplers import tempering

# two unit Gaussians 12σ apart with weights 0.7 / 0.3
WEIGHTS = jnp.array([0.7, 0.3])
CENTRES = jnp.array([[-6.0, 0.0], [6.0, 0.0]])


def two_modes(x):
    log_terms = -0.5 * jnp.sum((x - CENTRES) ** 2, axis=1) + jnp.log(WEIGHTS)
    return -jax.scipy.special.logsumexp(log_terms)


def left_share_and_se(positions):
    """Share of draws in the left mode and its MC standard error across chains (ladders)."""
    per_chain = np.mean(np.asarray(positions)[..., 0] < 0, axis=1)
    return float(per_chain.mean()), float(per_chain.std(ddof=1) / np.sqrt(per_chain.size))


def test_tempering_draws_get_the_weights_of_separated_modes_where_mala_keeps_the_start():
    energy = jax.tree_util.Partial(two_modes)
    # every chain starts in the light (0.3) mode
    start = jax.tree_util.Partial(lambda k, n: CENTRES[1] + 0.5 * jax.random.normal(k, (n, 2)))
    plain = ebm.samplers.DrawSettings(num_chains=64, num_warmup=400, thinning=2, init_scale=6.0)
    tempered = plain.replace(num_temperatures=6)
    shares = {}
    for name, draws in (("plain", plain), ("tempered", tempered)):
        d = ebm.EnergyDistribution(energy, (2,), draws=draws, initializer=start)
        x, trace = jax.jit(lambda k, d=d: d.sample_with_trace(k, (64 * 150,)))(jax.random.key(0))
        shares[name] = left_share_and_se(trace.positions)
        assert x.shape == (64 * 150, 2)
    assert shares["plain"][0] < 0.05  # MALA never leaves the mode it started in
    share, se = shares["tempered"]
    assert 0 < se < 0.03
    assert abs(share - 0.7) < 3 * se, shares
    summary = trace.tempering
    assert summary.betas.shape == (6,) and float(summary.betas[0]) == 1.0
    assert float(summary.betas[-1]) == 0.0 and bool(jnp.all(jnp.diff(summary.betas) < 0))
    assert int(summary.round_trips.sum()) > 64  # replicas do come back from the model
    assert float(summary.barrier) == pytest.approx(float(jnp.sum(1 - summary.swap_acceptance)))


def test_every_slot_samples_its_tempered_gaussian():
    """E = ½‖x − m‖²/s² against the base N(0, I): the slot at β targets the Gaussian with
    precision (1 − β) + β/s² and mean (β m/s²)/precision; swaps and the rebuilt caches must
    leave every slot's moments exact."""
    m, s = jnp.array([2.0, -1.0]), 0.5
    base = tempering.isotropic_base(2, 1.0)

    def energy(x, c):
        return 0.5 * jnp.sum((x - m) ** 2) / s**2

    ladder = tempering.initial_ladder(5, 0.3)
    state = tempering.init_replicas(base, energy, jnp.zeros((256, 5, 2)))
    state, ladder, _ = tempering.warmup_ladder(
        jax.random.key(1), samplers.mala(), base, energy, state, ladder, 200
    )

    def keep(carry, k):
        new, info = tempering.tempering_round(k, samplers.mala(), base, energy, carry, ladder)
        return new, (new.position, info.swapped)

    _, (positions, swapped) = jax.lax.scan(keep, state, jax.random.split(jax.random.key(3), 300))
    assert float(jnp.mean(swapped)) > 0.2  # the swaps do move states between slots
    betas = np.asarray(ladder.betas)
    mean_base, var_base = np.zeros(2), np.ones(2)
    per_ladder = np.asarray(positions).mean(axis=0)  # (L, K, D): one mean per ladder
    second = (np.asarray(positions) ** 2).mean(axis=0)
    for k, beta in enumerate(betas):
        precision = (1 - beta) / var_base + beta / s**2
        mean = ((1 - beta) * mean_base / var_base + beta * np.asarray(m) / s**2) / precision
        got, se = per_ladder[:, k].mean(0), per_ladder[:, k].std(0, ddof=1) / np.sqrt(256)
        np.testing.assert_array_less(np.abs(got - mean), 4 * se + 1e-3)
        var = second[:, k].mean(0) - got**2
        var_se = second[:, k].std(0, ddof=1) / np.sqrt(256)
        np.testing.assert_array_less(np.abs(var - 1 / precision), 4 * var_se + 1e-3)


def test_round_trips_count_base_to_model_and_back():
    visited, trips = jnp.zeros(3, bool), jnp.zeros(3, jnp.int32)
    # a trip ends at the base after a visit to the model (slot 0) since the replica was last
    # at the base (or since the start): replica 2 goes base -> model -> base; replica 0
    # model -> base (then the model again); replica 1 only reaches the model
    for label in ([0, 1, 2], [2, 1, 0], [0, 1, 2], [1, 0, 2]):
        visited, trips = tempering._count_round_trips(jnp.array(label), visited, trips)
    assert trips.tolist() == [1, 0, 1]
    assert visited.tolist() == [True, True, False]


def test_swap_order_exchanges_the_swapped_pairs_only():
    swapped = jnp.array([[True, False, True], [False, True, False]])
    np.testing.assert_array_equal(tempering._swap_order(swapped), [[1, 0, 3, 2], [0, 2, 1, 3]])


def test_adapt_ladder_equalises_rejection_and_keeps_the_ends():
    ladder = tempering.initial_ladder(5, 0.1)
    acceptance = jnp.array([0.2, 0.9, 0.9, 0.5])  # rejection 0.8, 0.1, 0.1, 0.5 from β = 1 down
    new = tempering.adapt_ladder(ladder, acceptance)
    betas = np.asarray(new.betas)
    assert betas[0] == 1.0 and betas[-1] == 0.0 and np.all(np.diff(betas) < 0)
    # Λ(β) piecewise linear through the old temperatures: equal steps at the new ones
    old = np.asarray(ladder.betas)[::-1]
    cumulative = np.concatenate([[0.0], np.cumsum(1 - np.asarray(acceptance)[::-1])])
    levels = np.interp(betas[::-1], old, cumulative)
    np.testing.assert_allclose(np.diff(levels), cumulative[-1] / 4, rtol=1e-4)
    # the hard pair (rejection 0.8, next to the model) gets temperatures closer together
    assert betas[0] - betas[1] < old[-1] - old[-2]
    half = tempering.adapt_ladder(ladder, acceptance, gain=0.5)
    np.testing.assert_allclose(half.betas, 0.5 * (ladder.betas + new.betas), rtol=1e-6)


def test_suggested_replicas_is_two_barriers_plus_one():
    assert samplers.suggested_replicas(0.2) == 2
    assert samplers.suggested_replicas(1.6) == 5
    assert samplers.suggested_replicas(10.0) == 21


def test_settings_are_checked():
    with pytest.raises(ValueError, match="num_temperatures"):
        negatives.ParallelTempering(num_temperatures=1)
    with pytest.raises(ValueError, match="ladder_gain"):
        negatives.ParallelTempering(ladder_gain=0.0)
    with pytest.raises(ValueError, match="negatives_per_ladder"):
        negatives.ParallelTempering(num_mcmc_steps=4, negatives_per_ladder=5)
    with pytest.raises(ValueError, match="num_temperatures"):
        samplers.DrawSettings(num_temperatures=0)
    with pytest.raises(ValueError, match="num_temperatures"):
        tempering.initial_ladder(1, 0.1)
    assert negatives.build("parallel_tempering", num_chains=16, num_temperatures=4) == (
        negatives.ParallelTempering(num_chains=16, num_temperatures=4)
    )


def test_parallel_tempering_negatives_cross_between_modes_in_one_step():
    """Ladders started in one mode: after one training step's rounds the model slots hold
    both modes in proportion (persistent chains in one step cannot)."""
    data = CENTRES[1] + jax.random.normal(jax.random.key(0), (500, 2))
    data = jnp.concatenate([data, CENTRES[0] + jax.random.normal(jax.random.key(1), (500, 2))])
    base = fit_base(data)
    sampler = negatives.ParallelTempering(
        num_chains=128, num_temperatures=6, num_mcmc_steps=60, num_recorded_chains=4
    )
    state = sampler.init(jax.random.key(2), data[:500], base)  # all in the right mode
    target = negatives.Target(lambda z: two_modes(z), data[:256], base, (2,))
    sample = jax.jit(lambda k, s: sampler.sample(k, s, target))
    state, draws, info = sample(jax.random.key(3), state)
    state, draws, info = sample(jax.random.key(4), state)
    share = float(jnp.mean(draws[:, 0] < 0))
    se = float(np.sqrt(0.7 * 0.3 / 128))
    assert abs(share - 0.7) < 4 * se
    assert draws.shape == (128, 2) and info.record.positions.shape == (4, 2)
    assert set(info.metrics) == {"barrier", "swap_acceptance_min", "round_trips"}
    assert float(info.metrics["round_trips"]) > 0
    assert state.ladder.betas.shape == (6,)
    # the model slot after each of the last 3 rounds: 3 negatives per ladder, the last the
    # ladders' state
    three = sampler.replace(negatives_per_ladder=3)
    new, draws, _ = jax.jit(lambda k, s: three.sample(k, s, target))(jax.random.key(5), state)
    assert draws.shape == (3 * 128, 2)
    np.testing.assert_array_equal(draws[-128:], new.replicas.position[:, 0])


def test_fit_with_parallel_tempering_records_and_diagnoses_the_ladders(tmp_path):
    data = jax.random.normal(jax.random.key(0), (256, 2))
    energy = ebm.energies.MLPEnergy(2, key=jax.random.key(1), hidden=(16,))
    pt = negatives.ParallelTempering(
        num_chains=16, num_temperatures=3, num_mcmc_steps=4, num_recorded_chains=4
    )
    # about the ladders, not log Z: without the log Z tracker
    res = ebm.fit(energy, data, key=jax.random.key(2), num_steps=6, batch_size=64,
                  negatives=pt, record_every=1, track_log_z=False, progress_bar=False,
                  checkpoint_dir=tmp_path / "run")  # fmt: skip
    assert {"barrier", "swap_acceptance_min", "round_trips"} <= set(res.history)
    assert np.all(np.isfinite(res.history["barrier"]))
    assert res.chains.shape == (16, 2)  # the model slots
    summary = res.recorded_chains.tempering
    assert summary.betas.shape == (3,) and int(summary.rounds) == 6 * 4
    diagnosis = ebm.diagnostics.diagnose(res, verbose=False)
    assert diagnosis["swap_acceptance"].status in ("ok", "warn")
    # the checkpoint rebuilds the same sampler (its settings are TrainConfig fields)
    loaded = ebm.load(tmp_path / "run", energy)
    assert loaded.config.negatives == pt
    np.testing.assert_array_equal(loaded.chains, res.chains)
    np.testing.assert_array_equal(loaded.recorded_chains.tempering.betas, summary.betas)


def test_conditional_ladders_reach_the_branch_no_row_was_observed_on():
    """E(y | c): two branches y = ±c, equal weights; every batch row observed on the + branch.
    After a few steps (which tune the ladder and step sizes), a step's ladders, started at the
    observed y, put half of the negatives on each."""

    def energy(y, c):
        log_terms = -0.5 * ((y[0] - jnp.array([1.0, -1.0]) * 4 * c[0]) / 0.3) ** 2
        return -jax.scipy.special.logsumexp(log_terms)

    conditions = jax.random.uniform(jax.random.key(0), (200, 1), minval=1.0, maxval=2.0)
    observed = 4 * conditions + 0.3 * jax.random.normal(jax.random.key(1), (200, 1))
    both = jnp.concatenate([observed, -observed])
    sampler = negatives.ParallelTempering(num_chains=8, num_temperatures=6, num_mcmc_steps=80)
    state = sampler.init(jax.random.key(2), both, fit_base(both))
    target = negatives.Target(energy, observed, fit_base(both), (1,), conditions)
    sample = jax.jit(lambda k, s: sampler.sample(k, s, target))
    shares = []
    for key in jax.random.split(jax.random.key(3), 8):
        state, draws, _ = sample(key, state)
        shares.append(float(jnp.mean(draws[:, 0] < 0)))
    assert draws.shape == (200, 1)  # one negative per batch row
    # the last 4 steps' ladders are independent: 800 draws
    share = np.mean(shares[4:])
    assert abs(share - 0.5) < 4 * np.sqrt(0.25 / 800), shares


def test_conditional_step_reports_on_the_ladders_it_ran():
    """E(y | c) = (y − 4c)² / (2 · 0.3²): the record, the gradient norm and the round trips
    describe this step's ladders, not the persistent placeholder the state keeps."""

    def energy(y, c):
        return 0.5 * ((y[0] - 4 * c[0]) / 0.3) ** 2

    conditions = jax.random.uniform(jax.random.key(0), (32, 1), minval=1.0, maxval=2.0)
    observed = 4 * conditions + 0.3 * jax.random.normal(jax.random.key(1), (32, 1))
    sampler = negatives.ParallelTempering(
        num_chains=8, num_temperatures=3, num_mcmc_steps=10, num_recorded_chains=4
    )
    base = fit_base(observed)
    state = sampler.init(jax.random.key(2), observed, base)
    target = negatives.Target(energy, observed, base, (1,), conditions)
    new, draws, info = jax.jit(lambda k, s: sampler.sample(k, s, target))(jax.random.key(3), state)
    np.testing.assert_array_equal(info.record.positions, draws[:4])
    np.testing.assert_allclose(
        info.record.info.logdensity, -jax.vmap(energy)(draws[:4], conditions[:4]), rtol=1e-4
    )
    grads = jax.vmap(jax.grad(energy))(draws, conditions)
    true_norm = float(jnp.mean(jnp.abs(grads)))
    assert float(info.langevin_grad_norm) == pytest.approx(true_norm, rel=1e-3)
    assert float(info.metrics["round_trips"]) > 0
    np.testing.assert_array_equal(new.replicas.position, state.replicas.position)


def test_datatree_and_diagnose_report_the_ladders():
    energy = jax.tree_util.Partial(two_modes)
    draws = ebm.samplers.DrawSettings(num_chains=8, num_warmup=200, init_scale=6.0)
    d = ebm.EnergyDistribution(energy, (2,), draws=draws.replace(num_temperatures=5))
    _, trace = d.sample_with_trace(jax.random.key(0), (8 * 100,))
    dt = ebm.diagnostics.to_datatree(trace)
    ds = dt["tempering"].to_dataset()
    assert ds["beta"].shape == (5,) and ds["swap_acceptance"].shape == (4,)
    assert ds["round_trips"].shape == (8, 5) and int(ds["rounds"]) == 100
    assert int(ds["suggested_replicas"]) == samplers.suggested_replicas(float(ds["barrier"]))
    diagnosis = ebm.diagnostics.diagnose(dt, verbose=False)
    assert diagnosis["round_trips"].status == "ok"
    assert "barrier" in diagnosis["swap_acceptance"].message
    # a ladder whose replicas never come back fails
    stuck = dt.copy()
    stuck["tempering"] = stuck["tempering"].to_dataset().assign(round_trips=ds["round_trips"] * 0)
    assert ebm.diagnostics.diagnose(stuck, verbose=False)["round_trips"].status == "fail"


def test_ladder_settings_are_refused_before_compute():
    for step_size in (float("nan"), 0.0, float("inf")):
        with pytest.raises(ValueError, match="step_size must be a finite number > 0"):
            tempering.initial_ladder(3, step_size)
    ladder = tempering.initial_ladder(4, 0.1)
    for gain in (5.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match="gain must be"):
            tempering.adapt_ladder(ladder, jnp.array([0.2, 0.9, 0.5]), gain=gain)
    # a NaN swap acceptance (one ladder's pair at −inf log-density) is a rejection, not NaN βs
    moved = tempering.adapt_ladder(ladder, jnp.array([jnp.nan, 0.9, 0.5]))
    rejected = tempering.adapt_ladder(ladder, jnp.array([0.0, 0.9, 0.5]))
    np.testing.assert_array_equal(moved.betas, rejected.betas)
