"""Diagnostics: DataTrees that ArviZ reads correctly, a verdict that catches real failures."""

import os
import warnings

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

import numpyro_ebm as ebm
from numpyro_ebm import diagnostics, energies, plots, samplers
from numpyro_ebm.diagnostics._training import _log_z_bound_check

COV = jnp.array([[1.0, 0.6], [0.6, 2.0]])


@pytest.fixture(scope="module")
def gaussian_runs():
    """400 long MALA chains on a correlated Gaussian, started overdispersed."""
    logdensity = samplers.flat_logdensity(energies.GaussianEnergy(jnp.zeros(2), COV), (2,))
    starts = 3.0 * jax.random.normal(jax.random.key(1), (400, 2))
    draws, _ = samplers.sample_chains(
        jax.random.key(0),
        samplers.mala(),
        logdensity,
        starts,
        num_draws=2000,
        draws=samplers.DrawSettings(num_warmup=500),
    )
    return draws


def test_long_mala_runs_have_rhat_one_and_the_expected_ess(gaussian_runs):
    x = np.asarray(gaussian_runs.positions, np.float64)  # (400, 2000, 2)
    # The ESS of the mean, by definition Var(x) / Var(chain mean) per chain, measured across
    # 400 independent chains against the exact variances (relative error sqrt(2/399) = 7%).
    ess_per_chain = np.diag(np.asarray(COV)) / x.mean(axis=1).var(axis=0, ddof=1)
    groups = xr.Dataset({"x": (("group", "chain", "draw", "d"), x.reshape(100, 4, 2000, 2))})
    rhat = az.rhat(groups)["x"].values
    ratio = az.ess(groups, method="bulk")["x"].values / (4 * ess_per_chain)
    assert rhat.max() < 1.01
    # 100 groups of 4 chains: the per-group ratio has sd ~0.07 (measured); with the 7% error of
    # the reference, the average is within 0.25 (3.5 sd) and every group within a factor 2
    assert np.all(np.abs(ratio.mean(axis=0) - 1.0) < 0.25), ratio.mean(axis=0)
    assert 0.5 < ratio.min() and ratio.max() < 2.0

    # the same through the library's conversion, on 4 of the chains
    four = samplers.Draws(
        gaussian_runs.positions[:4],
        jax.tree.map(lambda a: a[:4], gaussian_runs.info),
        gaussian_runs.step,
    )
    dt = diagnostics.to_datatree(four)
    assert float(az.rhat(dt)["x"].max()) < 1.01
    ess = az.ess(dt, method="bulk")["x"].values
    assert np.all((ess > 0.5 * 4 * ess_per_chain) & (ess < 2.0 * 4 * ess_per_chain))
    assert diagnostics.diagnose(four, verbose=False).status == "ok"


def test_datatree_layout_and_sample_stats(gaussian_runs):
    draws = samplers.Draws(
        gaussian_runs.positions[:3],
        jax.tree.map(lambda a: a[:3], gaussian_runs.info),
        gaussian_runs.step,
    )
    dt = diagnostics.to_datatree(
        draws, var_name="z", event_dims=("coord",), coords={"coord": ["a", "b"]}
    )
    assert dt["posterior"]["z"].dims == ("chain", "draw", "coord")
    assert list(dt["posterior"]["coord"].values) == ["a", "b"]
    stats = dt["sample_stats"]
    assert set(stats.data_vars) == {"lp", "acceptance_rate", "diverging", "step_size", "n_steps"}
    # lp is the log-density at the recorded position
    lp = samplers.flat_logdensity(energies.GaussianEnergy(jnp.zeros(2), COV), (2,))
    expected = jax.vmap(jax.vmap(lp))(jnp.asarray(draws.positions))
    np.testing.assert_allclose(stats["lp"].values, expected, rtol=1e-5, atol=1e-5)
    assert list(az.summary(dt).index) == ["z[a]", "z[b]"]


def _two_mode_energy():
    means = jnp.array([[-8.0, 0.0], [8.0, 0.0]])
    return energies.GaussianMixtureEnergy(
        jnp.log(jnp.array([0.5, 0.5])), means, 0.25 * jnp.stack([jnp.eye(2)] * 2)
    )


def test_chains_stuck_in_different_modes_fail_the_verdict():
    logdensity = samplers.flat_logdensity(_two_mode_energy(), (2,))
    starts = jnp.array([[-8.0, 0.0], [-8.0, 0.1], [8.0, 0.0], [8.0, 0.1]])
    draws, _ = samplers.sample_chains(
        jax.random.key(2),
        samplers.mala(),
        logdensity,
        starts,
        num_draws=1000,
        draws=samplers.DrawSettings(num_warmup=200),
    )
    assert np.all(np.sign(np.asarray(draws.positions[..., 0])) == np.sign(starts[:, None, 0]))
    verdict = diagnostics.diagnose(draws, verbose=False)
    assert verdict["r_hat"].status == "fail"
    assert not verdict.ok


def test_hmc_records_the_kept_states_hamiltonian_and_bfmi():
    energy = energies.GaussianEnergy(jnp.zeros(3))
    logdensity = samplers.flat_logdensity(energy, (3,))
    draws, _ = samplers.sample_chains(
        jax.random.key(3),
        samplers.hmc(),
        logdensity,
        jnp.zeros((8, 3)),
        num_draws=1000,
        draws=samplers.DrawSettings(num_warmup=300),
    )
    # HMC with its Metropolis step keeps (x, p) distributed as exp(-H): the kept state's
    # kinetic energy H + log p(x) has mean d/2 = 1.5
    kinetic = np.asarray(draws.info.hamiltonian + draws.info.logdensity, np.float64)
    assert kinetic.min() >= 0
    ess = float(az.ess(xr.Dataset({"k": (("chain", "draw"), kinetic)}), method="mean")["k"])
    assert abs(kinetic.mean() - 1.5) < 4 * kinetic.std() / np.sqrt(ess)
    dt = diagnostics.to_datatree(draws)
    assert {"energy", "diverging", "n_steps"} <= set(dt["sample_stats"].data_vars)
    assert int(dt["sample_stats"]["n_steps"].values[0, 0]) == 5
    assert az.plot_energy(dt) is not None  # ArviZ's energy plot reads it
    verdict = diagnostics.diagnose(dt, verbose=False)
    assert verdict["bfmi"].status == "ok"
    assert verdict["divergences"].status == "ok"


def test_to_datatree_reads_run_chains_and_sample_with_trace():
    energy = energies.GaussianEnergy(jnp.zeros(2))
    logdensity = samplers.flat_logdensity(energy, (2,))
    sampler = samplers.mala()
    states = sampler.init_chains(jnp.zeros((3, 2)), logdensity)
    run = samplers.run_chains(
        jax.random.key(4), sampler, logdensity, states, 0.5, 20, thinning=2, keep_positions=True
    )
    dt = diagnostics.to_datatree(run)
    assert dt["posterior"]["x"].shape == (3, 10, 2)
    np.testing.assert_allclose(dt["posterior"]["x"].values[:, -1], run[0].position)
    assert np.all(dt["sample_stats"]["n_steps"].values == 2)  # thinning adds up the work

    d = ebm.EnergyDistribution(
        energy, (2,), log_z=energy.log_z, draws=samplers.DrawSettings(num_chains=4, num_warmup=50)
    )
    samples, trace = d.sample_with_trace(jax.random.key(5), (40,))
    assert samples.shape == (40, 2) and trace.positions.shape == (4, 10, 2)
    # consecutive samples come from different chains, draw by draw
    np.testing.assert_allclose(samples[:4], trace.positions[:, 0])
    dt = diagnostics.to_datatree((samples, trace))
    assert dt["posterior"]["x"].shape == (4, 10, 2)
    with pytest.raises(ValueError, match="reads a FitResult"):
        diagnostics.to_datatree(np.zeros((4, 10, 2)))
    with pytest.raises(ValueError, match="num_chains, dim"):
        samplers.sample_chains(jax.random.key(6), sampler, logdensity, jnp.zeros(2), 5)
    with pytest.raises(ValueError, match="num_draws"):
        samplers.sample_chains(jax.random.key(6), sampler, logdensity, jnp.zeros((2, 2)), 0)


@pytest.fixture(scope="module")
def small_fit():
    toy = ebm.datasets.toy("8gaussians")
    data = toy.sample(jax.random.key(0), 4000)
    validation = toy.sample(jax.random.key(1), 500)
    res = _fit(data, 200, 128, hidden=(32, 32), validation_data=validation, record_every=5)
    return res, toy, data, validation


def _fit(data, num_steps, num_chains, *, hidden, **kwargs):
    energy = energies.MLPEnergy(2, hidden=hidden, key=jax.random.key(2))
    return ebm.fit(
        energy,
        data,
        key=jax.random.key(3),
        num_steps=num_steps,
        num_chains=num_chains,
        batch_size=num_chains,
        progress_bar=False,
        **kwargs,
    )


def test_fit_records_chains_and_summary_works(small_fit):
    res, _, _, validation = small_fit
    rec = res.recorded_chains
    assert rec.positions.shape == (8, 40, 2)
    np.testing.assert_array_equal(rec.step, 5 * np.arange(1, 41))
    # the last record is the chains' state at the end: the first rows of the persistent bank
    np.testing.assert_allclose(rec.positions[:, -1], res.chains[:8])
    dt = diagnostics.to_datatree(res)
    assert dt["posterior"]["x"].shape == (8, 20, 2)
    assert dt["warmup_posterior"]["x"].shape == (8, 20, 2)
    assert list(dt["posterior"]["draw"].values) == list(rec.step[20:])
    assert dt["training"]["energy_gap"].shape == (200,)
    assert "generator_energy" not in dt["training"]  # all-NaN columns are left out
    assert dt.attrs["negatives"] == "persistent"
    summary = az.summary(dt)
    assert list(summary.index) == ["x[0]", "x[1]"] and np.isfinite(summary["r_hat"]).all()

    # the held-out NLL is recorded every record_every steps, with the learned log Z; the
    # returned energy is the best-scoring one, and its log Z the one tracked at its step
    nll = res.history["heldout_nll"]
    assert np.isnan(nll[:4]).all() and np.isfinite(nll[4::5]).all()
    assert res.best_step == 5 * (np.nanargmin(nll[4::5]) + 1)
    expected = float(jnp.mean(jax.vmap(res.energy)(validation))) + res.log_z.value
    assert np.nanmin(nll) == pytest.approx(expected, rel=1e-4)

    verdict = diagnostics.diagnose(res, verbose=False)
    names = [c.name for c in verdict.checks]
    for name in ("r_hat", "ess", "acceptance", "nonfinite_steps", "energy_gap", "energy_drift"):
        assert name in names
    assert verdict["nonfinite_steps"].status == "ok"


def test_recorded_persistent_chains_are_never_restarted():
    flat_data = jnp.full((10, 2), 100.0)
    bank = jnp.arange(12.0).reshape(6, 2)
    base = ebm.negatives.fit_base(jax.random.normal(jax.random.key(0), (50, 2)))
    persistent = ebm.negatives.Persistent(
        num_chains=6, num_mcmc_steps=1, reinit_fraction=1.0, num_recorded_chains=2,
        sampler=samplers.mala(step_size=1e-8),  # the chains barely move: finals show the starts
    )  # fmt: skip
    state = persistent.init(jax.random.key(1), flat_data, base)._replace(bank=bank)
    target = ebm.negatives.Target(lambda z: 0.0 * jnp.sum(z), flat_data, base, (2,))
    _, finals, info = persistent.sample(jax.random.key(2), state, target)
    np.testing.assert_allclose(finals[:2], bank[:2], atol=1e-3)
    np.testing.assert_allclose(finals[2:], 100.0, atol=1e-3)
    np.testing.assert_array_equal(info.record.positions, finals[:2])


def test_fit_without_recording_and_bad_settings(small_fit):
    _, _, data, _ = small_fit
    res = _fit(data, 3, 16, hidden=(8,), num_recorded_chains=0, track_log_z=False)
    assert res.recorded_chains is None
    energy = res.energy
    with pytest.raises(ValueError, match="no recorded chains"):
        diagnostics.to_datatree(res)
    assert diagnostics.diagnose(res, verbose=False)["nonfinite_steps"].status == "ok"
    with pytest.raises(ValueError, match="num_recorded_chains"):
        ebm.fit(energy, data, key=jax.random.key(3), num_chains=4, num_recorded_chains=8)
    with pytest.raises(ValueError, match="validation_data"):
        ebm.fit(energy, data, key=jax.random.key(3), validation_data=np.full((5, 2), np.nan))


def test_training_checks_flag_runaway_energies(small_fit):
    res, *_ = small_fit
    history = {k: v.copy() for k, v in res.history.items()}
    steps = np.arange(history["energy_data"].size)
    history["energy_data"] = (
        history["energy_data"] - 0.1 * steps
    )  # sinking 8 nats over the checked span
    history["energy_gap"] = history["energy_gap"] + 2.0
    history["langevin_grad_norm"] = history["langevin_grad_norm"] * np.exp(steps / 20)
    broken = res.__class__(**{**vars(res), "history": history})
    verdict = diagnostics.diagnose(broken, verbose=False)
    assert verdict["energy_drift"].status == "fail"
    assert verdict["energy_gap"].status == "fail"
    assert "returned step" not in verdict["energy_gap"].message  # the last iterate returned
    selected = res.__class__(**{**vars(broken), "best_step": 5})
    selected = diagnostics.diagnose(selected, verbose=False)
    assert selected["energy_gap"].status == "fail"  # same grade, and says what it judged
    assert "comes after the returned step (5" in selected["energy_gap"].message
    assert verdict["langevin_grad"].status == "fail"
    assert verdict.status == "fail"


def test_reports_render_and_are_atomic(small_fit, tmp_path, monkeypatch):
    import matplotlib.image

    res, toy, data, _ = small_fit
    html_path = diagnostics.report(res, tmp_path / "run.html", data=data, toy=toy)
    text = open(html_path, encoding="utf-8").read()
    assert text.count("data:image/png;base64,") >= 4 and "verdict:" in text
    assert "chain_lag" not in text
    md_path = diagnostics.report(res, tmp_path / "run.md", data=data, lag_key=jax.random.key(5))
    text = open(md_path, encoding="utf-8").read()
    assert "| status | check |" in text
    # the chains' lag (diagnostics.chain_lag) follows the energy gap it explains
    assert 0 < text.index("| energy_gap |") < text.index("| chain_lag |")
    pngs = sorted(os.listdir(tmp_path / "run_files"))
    assert {"training.png", "density.png", "trace.png", "rank.png"} <= set(pngs)
    for name in pngs:
        assert f"run_files/{name}" in text
        image = matplotlib.image.imread(tmp_path / "run_files" / name)
        assert image.shape[0] > 100 and image.std() > 0  # decodes, and is not blank

    def broken(*args, **kwargs):
        raise RuntimeError("figure failed")

    monkeypatch.setattr(plots, "training_curves", broken)
    with pytest.raises(RuntimeError, match="figure failed"):
        diagnostics.report(res, tmp_path / "other.html")
    assert sorted(os.listdir(tmp_path)) == ["run.html", "run.md", "run_files"]
    with pytest.raises(ValueError, match=r"\.html or \.md"):
        diagnostics.report(res, tmp_path / "run.pdf")


def test_training_curves_put_each_value_at_its_step_and_label_every_curve():
    """Rejected attempts have history rows but are not steps: the held-out NLL of steps 10,
    20 and 30 is drawn there, after 5 rejected rows; a short run's two-curve panel has a
    legend (no warning that nothing is labelled)."""
    rows = 35
    accepted = np.arange(rows) >= 5
    nll = np.full(rows, np.nan)
    nll[[14, 24, 34]] = [3.0, 2.0, 1.0]  # rows of steps 10, 20, 30
    history = {"is_finite": accepted, "heldout_nll": nll, "energy_gap": np.zeros(rows)}
    history |= {"energy_data": np.ones(rows), "energy_negatives": np.full(rows, 2.0)}
    history["energy_gap"][:5] = np.nan  # what rejected attempts record
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plots.training_curves(history)
    axes = {ax.get_title(): ax for ax in fig.axes}
    (line,) = axes["held-out NLL (learned log Z)"].get_lines()
    np.testing.assert_array_equal(line.get_xdata(), [10, 20, 30])
    energies = axes["mean energy: data, negatives"]
    labels = [t.get_text() for t in energies.get_legend().get_texts()]
    assert labels == ["energy_data", "energy_negatives"]
    assert energies.get_lines()[0].get_xdata()[-1] == 30


def test_sample_grid_and_density_figure_shapes():
    fig = plots.sample_grid(np.random.default_rng(0).random((10, 8, 8)), ncols=5)
    assert sum(ax.has_data() for ax in fig.axes) == 10
    with pytest.raises(ValueError, match="not square"):
        plots.sample_grid(np.zeros((4, 10)))
    with pytest.raises(ValueError, match="2-D"):
        plots.density_figure(energies.GaussianEnergy(jnp.zeros(3)), bounds=np.zeros((3, 2)))


# -- runs the verdict must not call usable ---------------------------------------------------


@pytest.fixture(scope="module")
def frozen_fit(small_fit):
    """The small_fit run, but with a tiny fixed MALA step and one MCMC step per update: the
    negative-phase chains barely move, so the model learns nothing useful (KL of several nats,
    see test_chains_that_do_not_move_fail_the_verdict). Without the log Z tracker: nothing
    asked of this run is about log Z."""
    _, _, data, validation = small_fit
    tiny = samplers.Sampler("mala", step_size=1e-4, adapt_step_size=False)
    return _fit(
        data,
        200,
        128,
        hidden=(32, 32),
        validation_data=validation,
        record_every=5,
        sampler=tiny,
        num_mcmc_steps=1,
        track_log_z=False,
    )


def test_chains_that_do_not_move_fail_the_verdict(small_fit, frozen_fit):
    res, toy, *_ = small_fit
    # the frozen run really is bad, and the default one is not (grid-exact KL)
    kl_frozen = ebm.evaluate.kl_to_toy(
        frozen_fit.energy, toy, key=jax.random.key(9), num_samples=4000
    )
    assert kl_frozen.kl > 2.0
    verdict = diagnostics.diagnose(frozen_fit, verbose=False)
    assert not verdict.ok, str(verdict)
    movement = verdict["chain_movement"]
    assert movement.status == "fail" and "step" in movement.message
    # acceptance ~1 from a Metropolis kernel is not "no accept/reject step": it fails, and
    # says what to change
    for name in ("acceptance", "train_acceptance"):
        assert verdict[name].status == "fail", verdict[name]
        assert "step_size" in verdict[name].message

    healthy = diagnostics.diagnose(res, verbose=False)
    assert healthy.ok and healthy["chain_movement"].status == "ok", str(healthy)
    assert healthy["acceptance"].status == "ok"


def test_frozen_chains_on_a_fixed_target_fail_and_ula_is_not_blamed():
    logdensity = samplers.flat_logdensity(energies.GaussianEnergy(jnp.zeros(2), COV), (2,))
    starts = 3.0 * jax.random.normal(jax.random.key(7), (4, 2))
    tiny = samplers.Sampler("mala", step_size=1e-5, adapt_step_size=False)
    no_warmup = samplers.DrawSettings(num_warmup=0)
    draws, _ = samplers.sample_chains(
        jax.random.key(8), tiny, logdensity, starts, 500, draws=no_warmup
    )
    verdict = diagnostics.diagnose(draws, verbose=False)
    assert verdict["chain_movement"].status == "fail"
    assert verdict["acceptance"].status == "fail"
    # ULA's acceptance is 1 by construction: information, not a failure
    ula = samplers.Sampler("ula", step_size=0.05)
    warm = samplers.DrawSettings(num_warmup=200)
    draws, _ = samplers.sample_chains(jax.random.key(8), ula, logdensity, starts, 500, draws=warm)
    verdict = diagnostics.diagnose(draws, verbose=False)
    assert verdict["acceptance"].status == "info"
    assert verdict["chain_movement"].status == "ok"


def test_chains_mixing_in_separate_modes_are_not_told_to_raise_the_step_size():
    """Independent draws around three centres 10 apart: each chain moves (R-hat fails), but
    no step size crosses between the modes."""
    rng = np.random.default_rng(0)
    positions = rng.normal(size=(3, 50, 2)) + 10.0 * np.arange(3)[:, None, None]
    info = samplers.ChainInfo(*(np.full((3, 50), v) for v in (0.5, False, -1.0, np.nan, 0.1, 1)))
    verdict = diagnostics.diagnose(samplers.Draws(positions, info, np.arange(50)), verbose=False)
    movement = verdict["chain_movement"]
    assert movement.status == "fail" and verdict["r_hat"].status == "fail"
    assert "separate modes" in movement.message and "step size" not in movement.message


def test_heldout_nll_below_the_data_entropy_fails(small_fit):
    res, toy, _, validation = small_fit
    entropy = toy.entropy()
    verdict = diagnostics.diagnose(res, data_entropy=entropy, verbose=False)
    assert verdict["entropy_bound"].status == "ok", verdict["entropy_bound"]
    # the bound is real: with grid-exact log Z the held-out NLL is >= H up to its standard
    # error (per-point sd over sqrt(500) points; 4 standard errors)
    energies_val = np.asarray(jax.vmap(res.energy)(validation), np.float64)
    log_z = ebm.logz.grid(res.energy, np.asarray(toy.bounds) * 1.5).value
    stderr = energies_val.std(ddof=1) / np.sqrt(energies_val.size)
    assert energies_val.mean() + log_z > entropy - 4 * stderr

    # the same run reported with a log Z 0.5 nats too low for any density: the NLL is
    # impossible, and the check names the cause
    history = dict(res.history)
    mean_energy = history["heldout_nll"] - history["log_z"]
    wrong = entropy - 0.5 - float(np.nanmean(mean_energy[-1:]))
    history["heldout_nll"] = mean_energy + wrong
    history["log_z"] = np.full_like(history["log_z"], wrong)
    wrong_z = res.__class__(**{**vars(res), "history": history})
    verdict = diagnostics.diagnose(wrong_z, data_entropy=entropy, verbose=False)
    check = verdict["entropy_bound"]
    assert check.status == "fail" and not verdict.ok
    assert "log Z" in check.message and "logz.grid" in check.message
    with pytest.raises(ValueError, match="data_entropy"):
        diagnostics.diagnose(res, data_entropy=float("nan"), verbose=False)


def test_rhat_message_says_what_was_measured(small_fit):
    res, *_ = small_fit
    logdensity = samplers.flat_logdensity(_two_mode_energy(), (2,))
    starts = jnp.array([[-8.0, 0.0], [-8.0, 0.1], [8.0, 0.0], [8.0, 0.1]])
    draws, _ = samplers.sample_chains(
        jax.random.key(2),
        samplers.mala(),
        logdensity,
        starts,
        num_draws=1000,
        draws=samplers.DrawSettings(num_warmup=200),
    )
    check = diagnostics.diagnose(draws, verbose=False)["r_hat"]
    # only x[0] separates the two modes; x[1] agrees between chains
    assert "between-chain disagreement" in check.message and "x[0]" in check.message
    assert "x[1]" not in check.message and "modes" not in check.message
    # the recorded chains of a (unimodal-or-not) training run: worded from the measurement too
    check = diagnostics.diagnose(res, verbose=False)["r_hat"]
    if check.status != "ok":
        assert "between-chain disagreement on x[" in check.message
        assert "modes" not in check.message


def test_log_z_bound_check_says_when_the_tracker_missed_wells_at_the_rows(small_fit):
    res, *_ = small_fit
    verdict = diagnostics.diagnose(res, verbose=False)
    assert verdict["log_z_bound"].status == "ok", verdict["log_z_bound"]  # a real 8gaussians fit
    assert np.all(res.history["log_z_raised"] == 0.0)
    assert res.log_z.info["raised"] == 0.0 and res.log_z.info["step"] == res.best_step
    # the cases below need a returned step before the last one; this 2-D run's tracked log Z
    # is precise (the fused importance estimate) and its held-out NLL may be lowest at the end
    res = res.__class__(**{**vars(res), "best_step": 150})

    def floored_from(step, last=None, released_at=None, legacy=False):
        """The run as if the bound had raised the track at steps ``step`` to ``last`` by 5
        nats, released at once from step ``released_at`` on."""
        history = dict(res.history)
        missed = np.zeros_like(history["log_z_missed"])
        missed[step - 1 : last] = 1.0
        raised = 5.0 * missed
        if released_at is not None:
            raised[released_at - 1 :] = 0.0
        history["log_z_missed"], history["log_z_raised"] = missed, raised
        if legacy:  # written before raises were released
            del history["log_z_raised"]
        return res.__class__(**{**vars(res), "history": history})

    best = res.best_step
    after = floored_from(best + 1)
    check = diagnostics.diagnose(after, verbose=False)["log_z_bound"]
    assert check.status == "warn" and f"({best + 1}, " in check.value
    check = diagnostics.diagnose(floored_from(best), verbose=False)["log_z_bound"]
    assert check.status == "fail" and "memorises" in check.message
    assert "still held 5 nats" in check.message
    # raised just before the returned step, then released: its log Z is the particles' own
    released = floored_from(best - 5, best - 3, released_at=best - 2)
    check = diagnostics.diagnose(released, verbose=False)["log_z_bound"]
    assert check.status == "warn" and "holds no raise" in check.message
    legacy = floored_from(best - 5, best - 3, legacy=True)  # the window rule
    assert diagnostics.diagnose(legacy, verbose=False)["log_z_bound"].status == "fail"
    assert best > 30  # early on the tracker lags: a floor there is not the model's
    early = diagnostics.diagnose(floored_from(1, 5), verbose=False)["log_z_bound"]
    assert early.status == "warn" and "at 5 steps (1, 2, 3, 4, 5;" in early.value


def test_log_z_bound_check_numbers_steps_past_rejected_attempts():
    """Rejected attempts have history rows but are not steps: a floor on the 100th row after
    10 rejected ones is at step 90, the returned one (the window rule of older histories)."""
    is_finite = np.arange(100) >= 10
    missed, bound = np.zeros(100), np.full(100, -1.0)
    missed[-1], bound[-1] = 1.0, 5.0
    history = {"loss": np.zeros(100), "is_finite": is_finite}
    history |= {"log_z_missed": missed, "log_z_bound": bound}
    check = _log_z_bound_check(history, {"best_step": 90})
    assert check.status == "fail" and "(90; up to 5)" in check.value, check


def test_a_run_that_ends_with_its_track_lost_is_diagnosed(small_fit):
    """A floor or a degenerate update near the end leaves ``log_z`` NaN for the last steps:
    ``log_z`` has nothing to judge and says nothing, ``log_z_tracking`` says it was lost."""
    res, *_ = small_fit
    history = dict(res.history)
    log_z = history["log_z"].copy()
    log_z[-30:] = np.nan
    history["log_z"] = log_z
    lost = res.__class__(**{**vars(res), "history": history})
    verdict = diagnostics.diagnose(lost, verbose=False)
    assert "log_z" not in [check.name for check in verdict.checks]


def test_a_markdown_report_replaces_only_an_earlier_reports_figures(
    small_fit, tmp_path, monkeypatch
):
    import errno

    from files import snapshot

    res, _, data, _ = small_fit
    figures, md = tmp_path / "run_files", tmp_path / "run.md"
    figures.mkdir()
    (figures / "training.png").write_bytes(b"old figure")  # as an earlier report left them
    md.write_text("old report")
    real_replace = os.replace

    def failing(src, dst, *args, **kwargs):
        if os.fspath(dst) == str(md):
            raise OSError(errno.EIO, "injected fault", os.fspath(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="injected fault"):
        diagnostics.report(res, md, data=data)
    monkeypatch.undo()
    # a failed write of the .md keeps the old figures with the old .md
    assert snapshot(tmp_path) == {"run.md": b"old report", "run_files/training.png": b"old figure"}
    diagnostics.report(res, md, data=data)
    assert {"training.png", "density.png", "trace.png", "rank.png"} <= set(os.listdir(figures))
    assert (figures / "training.png").read_bytes()[:4] == b"\x89PNG"
    assert "run_files/training.png" in md.read_text() and len(os.listdir(tmp_path)) == 2
    # anything else in the figures folder, or a file of its name, is the user's: refused
    (figures / "mine.txt").write_text("mine")
    (tmp_path / "other_files").write_text("a user's file")
    before = snapshot(tmp_path)
    for name, match in (("run.md", "mine.txt"), ("other.md", "not a folder")):
        with pytest.raises(ValueError, match=match):
            diagnostics.report(res, tmp_path / name, data=data)
    assert snapshot(tmp_path) == before


def test_the_step_size_check_judges_the_bounds_of_the_runs_data(small_fit):
    """Training keeps the step size inside ``step_size_bounds`` of its data (8gaussians: the
    largest variance about 4.2, so up to 4 × 10): a step of 30 is tuned, not stuck at a bound
    (the unit-scale bounds stop at 10)."""
    from numpyro_ebm.diagnostics._shared import fit_attrs
    from numpyro_ebm.diagnostics._training import _step_size_check

    res, _, data, _ = small_fit
    attrs = fit_attrs(res)
    assert 4.0 < float(np.max(np.var(np.asarray(data), axis=0))) < 8.0
    assert attrs["step_size_high"] == pytest.approx(40.0)
    assert attrs["step_size_low"] == pytest.approx(samplers.STEP_SIZE_BOUNDS[0])
    at = {"step_size": np.array([0.1, 30.0])}
    assert _step_size_check(at, attrs).status == "ok"
    assert _step_size_check({"step_size": np.array([attrs["step_size_high"]])}, attrs).status == (
        "fail"
    )
