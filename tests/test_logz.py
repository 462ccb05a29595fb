"""Partition-function estimators against closed-form normalisers, with honest error bars."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import numpyro_ebm as ebm
from numpyro_ebm.energies import GaussianEnergy, GaussianMixtureEnergy

GAUSS_2D = GaussianEnergy(jnp.array([0.5, -1.0]), jnp.array([[1.0, 0.6], [0.6, 2.0]]))


def correlated_gaussian(dim, seed=0):
    a = jax.random.normal(jax.random.key(seed), (dim, dim)) / math.sqrt(dim)
    return GaussianEnergy(jnp.full(dim, 0.5), a @ a.T + 0.3 * jnp.eye(dim))


def mixture_10d():
    means = jax.random.normal(jax.random.key(2), (4, 10)) * 1.5
    return GaussianMixtureEnergy(
        jnp.log(jnp.arange(1.0, 5.0)), means, jnp.broadcast_to(jnp.eye(10) * 0.5, (4, 10, 10))
    )


def test_enumerate_is_exact_on_a_finite_support():
    log_w = jnp.log(jnp.array([1.0, 2.0, 3.0, 4.0]))
    support = jnp.arange(4.0)[:, None]
    est = ebm.logz.enumerate(lambda x: -log_w[x[0].astype(int)], support)
    assert est.value == pytest.approx(math.log(10.0), abs=1e-6) and est.stderr == 0.0


def test_importance_sampling_with_delta_method_error():
    proposal = dist.MultivariateNormal(jnp.zeros(2), 4.0 * jnp.eye(2))
    est = ebm.logz.importance(GAUSS_2D, proposal, key=jax.random.key(0), num_samples=50_000)
    assert abs(est.value - float(GAUSS_2D.log_z)) < 4 * est.stderr
    assert est.stderr < 0.01 and 1_000 < est.ess < 50_000


def test_importance_errors():
    with pytest.raises(ValueError, match="batch_shape"):
        ebm.logz.importance(GAUSS_2D, dist.Normal(jnp.zeros(2), 1.0), key=jax.random.key(0))
    with pytest.raises(ValueError, match="not finite at"):
        ebm.logz.importance(
            lambda x: jnp.where(x[0] > 1.0, jnp.nan, 0.0),
            dist.Normal(jnp.zeros(2), 1.0).to_event(1),
            key=jax.random.key(0),
            num_samples=1000,
        )


def test_ais_2d_within_0_02():
    est = ebm.logz.ais(GAUSS_2D, (2,), key=jax.random.key(1))
    assert abs(est.value - float(GAUSS_2D.log_z)) <= 0.02
    assert abs(est.value - float(GAUSS_2D.log_z)) < 4 * est.stderr + 1e-3
    assert est.info["ess"].shape == (200,) and est.info["acceptance"].shape == (200,)


# The AIS defaults (1000 particles × 8 runs) at 10 and 32 dimensions are measured in
# benchmarks/logz_accuracy.py; the tests below run a quarter of the particles and half of the
# runs, and check the estimate against the truth within its own error bar, which must be small.


def test_ais_32d_correlated_gaussian_within_0_05():
    energy = correlated_gaussian(32)
    est = ebm.logz.ais(energy, (32,), key=jax.random.key(2), num_particles=250, num_runs=4)
    error = est.value - float(energy.log_z)
    assert abs(error) <= min(0.05, 4 * est.stderr + 1e-3) and est.stderr < 0.03, (error, est)


def test_ais_10d_mixture_with_a_base_fitted_to_samples():
    energy = mixture_10d()
    comp = jax.random.categorical(jax.random.key(3), energy.log_weights, shape=(5000,))
    samples = energy.means[comp] + math.sqrt(0.5) * jax.random.normal(jax.random.key(4), (5000, 10))
    est = ebm.logz.ais(
        energy, (10,), key=jax.random.key(5), data=samples, num_temperatures=100,
        num_particles=250, num_runs=4,
    )  # fmt: skip
    error = est.value - float(energy.log_z)
    assert abs(error) <= min(0.05, 4 * est.stderr + 1e-3) and est.stderr < 0.02, (error, est)


def test_ais_adaptive_schedule():
    est = ebm.logz.ais(GAUSS_2D, (2,), key=jax.random.key(6), adaptive=True, num_mcmc_steps=10)
    assert est.method == "ais-adaptive"
    assert abs(est.value - float(GAUSS_2D.log_z)) < 4 * est.stderr + 0.02
    assert np.all(est.info["num_temperatures"] >= 1)


def test_ais_stderr_is_honest_over_20_seeds():
    """The truth lies within 2 standard errors in at least 85% of 20 independent estimates."""
    energy = correlated_gaussian(4, seed=1)
    hits = 0
    for seed in range(20):
        est = ebm.logz.ais(
            energy,
            (4,),
            key=jax.random.key(100 + seed),
            num_particles=200,
            num_temperatures=30,
            num_mcmc_steps=2,
        )
        hits += abs(est.value - float(energy.log_z)) <= 2 * est.stderr
    assert hits >= 17, hits


def test_ais_reports_non_finite_energies():
    def energy(x):
        return jnp.where(x[0] > 2.5, jnp.nan, 0.5 * jnp.sum(x**2))

    with pytest.raises(ValueError, match=r"not finite at \d+ of 300 particles at temperature"):
        ebm.logz.ais(
            energy, (2,), key=jax.random.key(7), num_particles=300, num_temperatures=20, num_runs=2
        )


def test_float64_path():
    with jax.enable_x64():
        energy = GaussianEnergy(jnp.zeros(3, jnp.float64), jnp.eye(3, dtype=jnp.float64) * 2.0)
        assert energy.log_z.dtype == jnp.float64
        est = ebm.logz.grid(GaussianEnergy(jnp.zeros(2, jnp.float64)), [[-9, 9], [-9, 9]], 600)
        assert abs(est.value - math.log(2 * math.pi)) < 1e-8
        ais = ebm.logz.ais(energy, (3,), key=jax.random.key(8), num_temperatures=50)
        assert abs(ais.value - float(energy.log_z)) < 4 * ais.stderr + 0.01


def test_bdmc_sandwich_brackets_the_truth():
    """E[log Ẑ] ≤ log Z for forward AIS and ≥ log Z for reverse AIS from exact samples.

    Checked on the mean of per-run log estimates over 64 cheap runs (10 particles, 2
    temperatures), where the Jensen gap (≈ var/2, several tenths of a nat here) dwarfs the
    standard error of the mean.
    """
    energy = correlated_gaussian(10)
    samples = jax.random.multivariate_normal(
        jax.random.key(9), energy.mean, energy.covariance, (5000,)
    )
    truth = float(energy.log_z)
    cheap = dict(num_temperatures=2, num_particles=10, num_runs=64)
    forward = ebm.logz.ais(energy, (10,), key=jax.random.key(10), **cheap)
    reverse = ebm.logz.reverse_ais(energy, samples, key=jax.random.key(11), **cheap)
    assert reverse.method == "reverse-ais"
    f_runs, r_runs = forward.info["log_z_runs"], reverse.info["log_z_runs"]
    f_se, r_se = f_runs.std(ddof=1) / 8, r_runs.std(ddof=1) / 8
    assert f_runs.mean() + 3 * f_se < truth < r_runs.mean() - 3 * r_se
    # and with a fine path both agree with the truth
    fine = ebm.logz.reverse_ais(energy, samples, key=jax.random.key(12), num_temperatures=100)
    assert abs(fine.value - truth) < 4 * fine.stderr + 0.01
    with pytest.raises(ValueError, match="NaN or inf"):
        ebm.logz.reverse_ais(energy, samples.at[0, 0].set(jnp.nan), key=jax.random.key(0))


def test_ais_rejects_bad_base_data_before_compute():
    with pytest.raises(ValueError, match="NaN"):
        ebm.logz.ais(GAUSS_2D, (2,), key=jax.random.key(0), data=jnp.array([[0.0, jnp.nan]] * 3))
    with pytest.raises(ValueError, match="event"):
        ebm.logz.ais(GAUSS_2D, (2,), key=jax.random.key(0), data=jnp.zeros((5, 3)))


def test_grid_covering_grows_the_box_until_it_holds_the_mass():
    """A box around 'data' far narrower than the density: grid misses most of the mass,
    grid_covering doubles the box until the outer shell is empty and gets the exact log Z."""
    energy = GaussianEnergy(jnp.array([0.0, 1.0]), jnp.array([[4.0, 1.0], [1.0, 2.0]]))
    narrow = [[-0.5, 0.5], [0.5, 1.5]]
    exact = float(energy.log_z)
    assert ebm.logz.grid(energy, narrow, 256).value < exact - 1.0
    est = ebm.logz.grid_covering(energy, narrow, 256)
    assert abs(est.value - exact) < 1e-3
    assert est.info["outer_shell_mass"] <= 1e-3
    assert np.all(np.diff(est.info["bounds"], axis=1) > 8)  # grew from width 2
    with pytest.raises(ValueError, match="bounds"):
        ebm.logz.grid_covering(energy, [[0.0, jnp.nan], [0.0, 1.0]])


@pytest.mark.parametrize("make", [ebm.samplers.mala, ebm.samplers.hmc])
def test_ais_takes_the_training_sampler_objects(make):
    """``sampler=`` takes the same kernel objects as training; each gives log Z within its
    reported error (plus float32 round-off)."""
    cheap = dict(num_particles=300, num_temperatures=30, num_runs=4)
    est = ebm.logz.ais(GAUSS_2D, (2,), key=jax.random.key(13), sampler=make(), **cheap)
    assert abs(est.value - float(GAUSS_2D.log_z)) < 4 * est.stderr + 1e-3
    assert np.all(est.info["acceptance"] > 0.2)  # tuned toward the sampler's target
    if make is ebm.samplers.hmc:  # and reverse AIS by the kernel's name
        exact = jax.random.multivariate_normal(
            jax.random.key(14), GAUSS_2D.mean, GAUSS_2D.covariance, (500,)
        )
        rev = ebm.logz.reverse_ais(GAUSS_2D, exact, key=jax.random.key(15), sampler="hmc", **cheap)
        assert abs(rev.value - float(GAUSS_2D.log_z)) < 4 * rev.stderr + 1e-3


def test_ais_refuses_a_kernel_without_a_metropolis_step():
    for sampler in ("ula", ebm.samplers.ula()):
        with pytest.raises(ValueError, match="Metropolis step"):
            ebm.logz.ais(GAUSS_2D, (2,), key=jax.random.key(0), sampler=sampler)
    with pytest.raises(ValueError, match="unknown sampler"):
        ebm.logz.ais(GAUSS_2D, (2,), key=jax.random.key(0), sampler="gibbs")


def test_nce_loss_is_minimised_at_the_exact_log_z():
    """With exact model samples the minimiser of ``nce_log_z_loss`` over ``log_z`` is log Z.

    For n model and n noise draws the minimiser's variance is ``(1/I − 2)/n`` with
    ``I = E_p[q/(p+q)]`` (the gradient's variance ``(I − 2I²)/n`` over its squared slope
    ``I²``): the tolerance is 4 of those standard errors, with ``I`` estimated on the samples.
    """
    energy, n = GAUSS_2D, 20_000
    k_model, k_noise = jax.random.split(jax.random.key(16))
    model = jax.random.multivariate_normal(k_model, energy.mean, energy.covariance, (n,))
    noise_tril = 1.5 * jnp.linalg.cholesky(energy.covariance)
    base = ebm.gaussian.GaussianBase(
        energy.mean + 0.3, noise_tril, jnp.linalg.inv(noise_tril)
    )  # a noise distinct from the model: with q = p the loss would be flat in the noise
    noise = base.sample(k_noise, n)

    def loss(log_z):
        return ebm.logz.nce_log_z_loss(log_z, energy, model, noise, base)

    log_z = float(base.log_z)
    for _ in range(20):  # Newton on a convex 1-D loss
        log_z -= float(jax.grad(loss)(log_z) / jax.grad(jax.grad(loss))(log_z))
    truth = float(energy.log_z)
    log_ratio = -jax.vmap(energy)(model) - truth - base.log_prob(model)  # log p/q at p's draws
    share = float(jnp.mean(jax.nn.sigmoid(-log_ratio)))  # I = E_p[q / (p + q)]
    stderr = math.sqrt((1 / share - 2) / n)
    assert 0.0 < stderr < 0.05
    assert abs(log_z - truth) < 4 * stderr


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_select_uses_the_grid_up_to_three_dimensions(dims):
    energy = GaussianEnergy(jnp.full(dims, 0.5), jnp.eye(dims) * 0.7)
    data = energy.mean + jnp.sqrt(0.7) * jax.random.normal(jax.random.key(17), (300, dims))
    est = ebm.logz.select.estimate(energy, (dims,), data=data)
    assert est.method == "grid"
    assert abs(est.value - float(energy.log_z)) < 1e-3
    first = ebm.logz.select.box(data, padding=0.5)  # grid_covering's first box, then grown
    grown = np.asarray(est.info["bounds"])
    assert np.all(grown[:, 0] <= first[:, 0] + 1e-9) and np.all(grown[:, 1] >= first[:, 1] - 1e-9)


def test_select_uses_ais_above_three_dimensions(monkeypatch):
    calls = []

    def fake_ais(energy, event_shape, *, key, data):
        calls.append((event_shape, data))
        return ebm.logz.LogZEstimate(0.0, 0.0, "ais")

    monkeypatch.setattr(ebm.logz.select, "ais", fake_ais)
    data = jnp.zeros((5, 2, 2))
    energy = GaussianEnergy(jnp.zeros(4))
    est = ebm.logz.select.estimate(energy, (2, 2), data=data, key=jax.random.key(0))
    assert est.method == "ais" and calls[0][0] == (2, 2) and calls[0][1] is data
    with pytest.raises(ValueError, match="key"):
        ebm.logz.select.estimate(energy, (4,), data=data)


def test_select_auto_uses_a_sure_tracked_log_z_above_three_dims(monkeypatch):
    calls = []

    def fake_ais(energy, event_shape, *, key, data):
        calls.append(event_shape)
        return ebm.logz.LogZEstimate(0.0, 0.01, "ais")

    monkeypatch.setattr(ebm.logz.select, "ais", fake_ais)
    energy, key = GaussianEnergy(jnp.zeros(4)), jax.random.key(0)
    sure = ebm.logz.LogZEstimate(3.0, ebm.logz.select.TRACKED_MAX_STDERR, "tracked")
    unsure = sure._replace(stderr=1.01 * ebm.logz.select.TRACKED_MAX_STDERR)
    nce = ebm.logz.LogZEstimate(3.0, float("nan"), "nce-learned")
    assert ebm.logz.select.estimate(energy, (4,), key=key, learned=sure) is sure
    assert not calls
    for learned in (unsure, nce, None):
        assert ebm.logz.select.estimate(energy, (4,), key=key, learned=learned).method == "ais"
    assert len(calls) == 3
    # up to three dimensions the grid wins even over a sure tracked value
    got = ebm.logz.select.estimate(GAUSS_2D, (2,), data=jnp.zeros((3, 2)), learned=sure)
    assert got.method == "grid"


def test_select_learned_box_and_errors():
    learned = ebm.logz.LogZEstimate(1.5, float("nan"), "nce-learned")
    got = ebm.logz.select.estimate(GAUSS_2D, (2,), method="learned", learned=learned)
    assert got is learned
    with pytest.raises(ValueError, match="unknown log Z method"):
        ebm.logz.select.estimate(GAUSS_2D, (2,), method="quadrature", data=jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="learned"):
        ebm.logz.select.estimate(GAUSS_2D, (2,), method="learned")
    with pytest.raises(ValueError, match="1 to 3 dimensions"):
        energy = GaussianEnergy(jnp.zeros(4))
        ebm.logz.select.estimate(energy, (4,), method="grid", bounds=[[0, 1]] * 4)
    # a toy's bounds take precedence over the data's range
    toy_box = ebm.logz.select.box(jnp.zeros((3, 2)), toy_bounds=[[-1.0, 1.0], [0.0, 4.0]])
    assert toy_box.tolist() == [[-1.0, 1.0], [0.0, 4.0]]
    with pytest.raises(ValueError, match="data or toy_bounds"):
        ebm.logz.select.box()


def test_ais_convergence_flags_a_path_too_short_and_agrees_once_it_is_long_enough():
    """A narrow 10-D Gaussian (σ = 0.1) from a standard-normal base: 5 temperatures land about
    16 nats low and 20 rise far beyond the errors; 50 and 200 agree, at the exact log Z."""
    energy = GaussianEnergy(jnp.full(10, 0.5), 0.01 * jnp.eye(10))
    exact = float(energy.log_z)
    short = ebm.logz.ais_convergence(
        energy, (10,), key=jax.random.key(3), num_temperatures=5, num_particles=200
    )
    check = short.info["convergence"]
    assert check["num_temperatures"] == (5, 20)
    assert not check["converged"] and check["rise"] > check["bound"] > 0, check
    assert check["shorter"] < exact - 5
    enough = ebm.logz.ais_convergence(
        energy, (10,), key=jax.random.key(4), num_temperatures=50, num_particles=200
    )
    check = enough.info["convergence"]
    assert check["converged"] and check["num_temperatures"] == (50, 200), check
    assert 0 < check["spread"] <= 1.0  # CONVERGENCE_MAX_SPREAD
    assert abs(enough.value - exact) < 4 * enough.stderr + 1e-3, (enough, exact)
    assert enough.info["ess"].shape == (200,)  # the longer path's own records


def test_ais_convergence_refuses_what_it_cannot_lengthen():
    with pytest.raises(ValueError, match="adaptive"):
        ebm.logz.ais_convergence(GAUSS_2D, (2,), key=jax.random.key(0), adaptive=True)
    for factor in (1, 2.5, True):
        with pytest.raises(ValueError, match="factor"):
            ebm.logz.ais_convergence(GAUSS_2D, (2,), key=jax.random.key(0), factor=factor)


def test_ais_adaptive_refuses_runs_stopped_at_the_cap_before_beta_1():
    """10 × num_temperatures = 10 adaptive temperatures do not reach β = 1 on a narrow, offset
    10-D Gaussian: the partial path's sum is not returned as log Z."""
    energy = GaussianEnergy(jnp.full(10, 3.0), 0.01 * jnp.eye(10))
    with pytest.raises(ValueError, match=r"stopped at the cap of 10 \* num_temperatures = 10"):
        ebm.logz.ais(
            energy, (10,), key=jax.random.key(0), adaptive=True, num_temperatures=1,
            num_particles=50, num_runs=2, num_mcmc_steps=1,
        )  # fmt: skip


def test_reverse_ais_gives_each_run_its_own_exact_samples():
    """Runs that share exact samples are dependent and their error bar is too small: each run
    gets a disjoint block of the pool (resampled within the block when it is small)."""
    from numpyro_ebm.logz.ais import _start_rows as start_rows

    rows = np.asarray(start_rows(jax.random.key(0), 40, 4, 10))
    assert rows.shape == (4, 10) and sorted(rows.ravel().tolist()) == list(range(40))
    rows = np.asarray(start_rows(jax.random.key(1), 22, 4, 10))  # blocks of 5, with replacement
    blocks = [set(run.tolist()) for run in rows]
    assert all(len(b) <= 5 for b in blocks)
    assert sum(len(b) for b in blocks) == len(set().union(*blocks))  # disjoint
    with pytest.raises(ValueError, match="num_runs"):
        ebm.logz.reverse_ais(GAUSS_2D, jnp.zeros((7, 2)), key=jax.random.key(0), num_runs=8)


def test_ais_and_reverse_ais_refuse_mismatched_shapes_before_compute():
    with pytest.raises(ValueError, match="base must be over flat events of size 2"):
        base = dist.Normal(jnp.zeros(3), 1.0).to_event(1)
        ebm.logz.ais(GAUSS_2D, (2,), key=jax.random.key(0), base=base, num_temperatures=5)
    with pytest.raises(ValueError, match=r"energy fails on one event of shape \(3,\)"):
        ebm.logz.reverse_ais(GAUSS_2D, jnp.zeros((16, 3)), key=jax.random.key(0))
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1, got 0"):
        proposal = dist.Normal(jnp.zeros(2), 2.0).to_event(1)
        ebm.logz.importance(GAUSS_2D, proposal, key=jax.random.key(0), num_samples=0)


def test_grid_covering_grows_degenerate_boxes_and_says_what_it_cannot_cover():
    """A constant data column or a single row gives a box of zero width in some axis: it
    starts as wide as the widest axis (1 when none is wide) and grows to the exact log Z. A
    box that cannot grow to hold the mass gives an infinite error bar, not a confident one."""
    energy, exact = GaussianEnergy(jnp.zeros(2)), math.log(2 * math.pi)
    column = np.stack([np.random.default_rng(0).normal(size=200), np.zeros(200)], 1)
    for data in (column, np.zeros((1, 2))):
        est = ebm.logz.select.estimate(energy, (2,), data=data)
        assert abs(est.value - exact) < 1e-4 and est.info["outer_shell_mass"] <= 1e-3, est
    with pytest.raises(ValueError, match="lo <= hi"):
        ebm.logz.grid_covering(energy, [[1.0, -1.0], [1.0, -1.0]], 64)
    short = ebm.logz.grid_covering(energy, [[-0.1, 0.1], [-0.1, 0.1]], 64, max_doublings=2)
    assert short.value < exact - 0.5 and short.stderr == math.inf
    assert short.info["outer_shell_mass"] > 1e-3
