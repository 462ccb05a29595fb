"""The lower bound on log Z from importance sampling around the training rows
(``logz.bound``), and the tracker's floor (``tracking.floor``) that uses it (and fuses its
importance estimate where its ESS is large).

Closed forms: a Gaussian energy (``log Z = ½ D log 2π``), and a Gaussian with narrow wells at
the training rows whose mass is known by construction (``exp(−E) = N(0, I) + A · mean_k N(c_k,
s² I)``, ``Z = 1 + A``): the wells an energy trained on few rows grows, which a proposal or a
chain started from the fitted Gaussian never finds.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import logsumexp
from jax.scipy.stats import multivariate_normal

import numpyro_ebm as ebm
from numpyro_ebm.gaussian import fit_base
from numpyro_ebm.logz import bound as data_bound
from numpyro_ebm.logz import tracking

DIM = 10
LOG_WELL_MASS = 20.0  # A = e²⁰: log Z = log(1 + e²⁰)
WELL_WIDTH = 0.07  # between two of data_bound.BANDWIDTHS (0.05, 0.1): no width is exact


def rows():
    return jax.random.normal(jax.random.key(0), (300, DIM))


def wells_logdensity(centres):
    """−E of a unit Gaussian plus e²⁰ of mass in narrow wells at ``centres``."""

    def logdensity(x):
        bulk = multivariate_normal.logpdf(x, jnp.zeros(DIM), jnp.eye(DIM))
        wells = -0.5 * jnp.sum((x - centres) ** 2, -1) / WELL_WIDTH**2
        wells = wells - DIM * jnp.log(WELL_WIDTH) - 0.5 * DIM * jnp.log(2 * jnp.pi)
        return jnp.logaddexp(bulk, LOG_WELL_MASS + logsumexp(wells) - jnp.log(len(centres)))

    return logdensity


def exact_wells_log_z():
    return float(np.logaddexp(0.0, LOG_WELL_MASS))


def test_the_estimate_is_exact_for_a_gaussian_within_its_error_bar():
    data = rows()
    est = ebm.logz.data_bound(lambda x: 0.5 * jnp.sum(x**2), data, key=jax.random.key(1))
    exact = 0.5 * DIM * np.log(2 * np.pi)
    assert est.method == "data-bound"
    assert abs(est.value - exact) < 4 * est.stderr + 1e-3, (est.value, exact, est.stderr)
    assert est.info["lower_bound"] == est.value - data_bound.MARGIN < exact
    assert est.ess > 1000


def test_it_finds_wells_at_the_training_rows_that_a_gaussian_proposal_misses():
    data = rows()
    logdensity = wells_logdensity(data)
    exact = exact_wells_log_z()
    est = ebm.logz.data_bound(lambda x: -logdensity(x), data, key=jax.random.key(2))
    assert abs(est.value - exact) < 4 * est.stderr + 0.05, (est.value, exact, est.stderr)
    # the same number of draws from the Gaussian fitted to the rows: the wells are missed
    base = ebm.gaussian.fit_base(data)
    x = base.sample(jax.random.key(3), 65536)
    plain = float(logsumexp(jax.vmap(logdensity)(x) - base.log_prob(x)) - np.log(len(x)))
    assert plain < 1.0 < exact - 15


def test_the_lower_bound_is_below_log_z_in_at_least_95_percent_of_draws():
    data = rows()
    logdensity = wells_logdensity(data)
    base = fit_base(data)
    bounds = jax.jit(
        jax.vmap(lambda k: data_bound.lower_bound(k, logdensity, data, base, num_samples=256))
    )(jax.random.split(jax.random.key(4), 200))
    bounds = np.asarray(bounds)
    assert np.all(np.isfinite(bounds))
    assert np.mean(bounds < exact_wells_log_z()) >= 0.95
    # and it is informative: with 256 draws most bounds are within a few nats of log Z
    assert np.median(bounds) > exact_wells_log_z() - data_bound.MARGIN - 2.0


def tracker_at(log_z, data):
    """A tracker whose estimate is ``log_z`` (its particles do not matter to the floor), with
    a floor at every update."""
    settings = tracking.TrackerSettings(
        num_particles=64, num_groups=4, floor_samples=2048, floor_every=1
    )
    state, _ = tracking.start(
        jax.random.key(5), fit_base(data), lambda x: -0.5 * jnp.sum(x**2), settings
    )
    value, _ = tracking.estimate(state)
    return state._replace(group_log_z=state.group_log_z - value + log_z), settings


@pytest.mark.parametrize("dim", [2, 10])
def test_the_proposal_density_matches_a_direct_float64_sum_over_kernels(dim):
    """The proposal's log-density (one exponential per draw and centre, then squarings, for
    the doubling ``BANDWIDTHS``; a table of all of them for other widths) against the
    mixture written out in float64: draws of the proposal itself, draws at the centres (the
    narrowest kernels dominate) and draws far out (only the base and the widest matter)."""
    from scipy.special import logsumexp as np_logsumexp
    from scipy.stats import multivariate_normal as mvn

    data = jax.random.normal(jax.random.key(40), (200, dim)) @ jnp.diag(jnp.linspace(0.5, 2, dim))
    base = fit_base(data)
    draws = data_bound._draw(jax.random.key(41), data, base, data_bound.BANDWIDTHS, 300)
    x = jnp.concatenate([draws, data[:20] + 1e-3, 6.0 * data[20:40]])
    cov = np.asarray(base.scale_tril, np.float64) @ np.asarray(base.scale_tril, np.float64).T
    centres, points = np.asarray(data, np.float64), np.asarray(x, np.float64)
    for widths in (data_bound.BANDWIDTHS, (0.07, 0.3, 0.9)):
        kernels = np.stack([
            mvn.logpdf(points, c, h**2 * cov) for c in centres for h in widths
        ], axis=1)  # fmt: skip
        mixture = np_logsumexp(kernels, axis=1) - np.log(kernels.shape[1])
        gaussian = mvn.logpdf(points, np.asarray(base.mean, np.float64), cov)
        exact = np.logaddexp(gaussian, mixture) - np.log(2.0)
        got = np.asarray(data_bound._log_proposal(x, data, base, widths))
        np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-3)


def test_the_floor_raises_a_tracked_estimate_that_missed_the_wells_and_no_other():
    data = rows()
    exact = exact_wells_log_z()
    base = fit_base(data)
    logdensity = wells_logdensity(data)
    missed, settings = tracker_at(0.0, data)  # what a tracker that never saw the wells says
    floored, bound, raised, _ = tracking.floor(
        jax.random.key(6), missed, logdensity, data, base, settings
    )
    value, stderr = tracking.estimate(floored)
    assert bool(raised)
    np.testing.assert_allclose(float(floored.raised), float(bound), atol=1e-5)
    assert exact - data_bound.MARGIN - 1.0 < float(bound) < exact
    np.testing.assert_allclose(float(value), float(bound), atol=1e-5)
    # the groups move together: their spread (the error bar) is the tracker's own
    np.testing.assert_allclose(float(stderr), float(tracking.estimate(missed)[1]), rtol=1e-4)

    right, _ = tracker_at(exact, data)
    kept, bound, raised, _ = tracking.floor(
        jax.random.key(7), right, logdensity, data, base, settings
    )
    assert float(bound) < exact and not bool(raised)
    np.testing.assert_array_equal(kept.group_log_z, right.group_log_z)

    lost = missed._replace(updates_lost=jnp.ones((), jnp.int32))
    still, _, _, _ = tracking.floor(jax.random.key(8), lost, logdensity, data, base, settings)
    np.testing.assert_array_equal(still.group_log_z, lost.group_log_z)

    off = settings._replace(floor_samples=0)
    same, bound, raised, fused = tracking.floor(
        jax.random.key(9), missed, logdensity, data, base, off
    )
    assert same is missed and np.isnan(bound) and not bool(raised) and not bool(fused)


def test_a_raise_is_released_over_its_half_life_unless_the_wells_raise_it_again():
    """Once the wells are gone the bound lies below the estimate, and what the floor added
    goes at ``floor_half_life`` (exactly: the release does not depend on the draws); wells that
    remain raise it again at once; with a half-life of 0 it is kept for good."""
    data = rows()
    base = fit_base(data)
    exact = exact_wells_log_z()
    wells = wells_logdensity(data)
    gaussian = lambda x: -0.5 * jnp.sum(x**2)  # log Z = ½ D log 2π: no wells
    gaussian_log_z = 0.5 * data.shape[1] * np.log(2 * np.pi)
    raised, settings = tracker_at(gaussian_log_z + 10.0, data)
    raised = raised._replace(raised=jnp.asarray(10.0, raised.raised.dtype))
    settings = settings._replace(floor_half_life=5)
    state = raised
    for i in range(10):  # two half-lives
        key = jax.random.fold_in(jax.random.key(12), i)
        state, bound, missed, _ = tracking.floor(key, state, gaussian, data, base, settings)
        assert not bool(missed) and float(bound) < gaussian_log_z
    np.testing.assert_allclose(float(state.raised), 2.5, rtol=1e-4)
    np.testing.assert_allclose(float(tracking.estimate(state)[0]), gaussian_log_z + 2.5, atol=1e-4)
    # the spread of the groups (the error bar) is untouched by releases
    np.testing.assert_allclose(
        float(tracking.estimate(state)[1]), float(tracking.estimate(raised)[1]), rtol=1e-4
    )

    again, bound, missed, _ = tracking.floor(jax.random.key(13), state, wells, data, base, settings)
    assert bool(missed) and exact - data_bound.MARGIN - 1.0 < float(bound) < exact
    np.testing.assert_allclose(float(tracking.estimate(again)[0]), float(bound), atol=1e-4)
    # the raise now covers the gap between the particles' own estimate and the bound
    np.testing.assert_allclose(float(again.raised), float(bound) - gaussian_log_z, atol=1e-3)

    kept = settings._replace(floor_half_life=0)
    state = raised
    for i in range(10):
        state, _, _, _ = tracking.floor(jax.random.key(14 + i), state, gaussian, data, base, kept)
    np.testing.assert_array_equal(state.group_log_z, raised.group_log_z)


def test_the_floor_runs_at_every_floor_every_th_update_and_releases_by_updates():
    """With ``floor_every=4`` the floor runs at updates 4, 8, ... (NaN bound, nothing raised
    or fused between them), and a raise still halves over ``floor_half_life`` updates."""
    data = rows()
    base = fit_base(data)
    gaussian = lambda x: -0.5 * jnp.sum(x**2)
    gaussian_log_z = 0.5 * data.shape[1] * np.log(2 * np.pi)
    raised, settings = tracker_at(gaussian_log_z + 10.0, data)
    state = raised._replace(raised=jnp.asarray(10.0, raised.raised.dtype))
    settings = settings._replace(floor_every=4, floor_half_life=10)

    @jax.jit
    def update(key, state):
        advanced, _ = tracking.advance(key, state, gaussian, gaussian, settings, base)
        floored = tracking.floor(
            jax.random.fold_in(key, 1), advanced, gaussian, data, base, settings
        )
        return advanced, floored

    bounds = []
    for i in range(20):  # two half-lives
        before, (state, bound, missed, fused) = update(
            jax.random.fold_in(jax.random.key(15), i), state
        )
        bounds.append(float(bound))
        assert not bool(missed) and not bool(fused)
        if not np.isfinite(bound):
            for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(before), strict=True):
                np.testing.assert_array_equal(a, b)  # a skipped update changes nothing
    assert [np.isfinite(b) for b in bounds] == [(i + 1) % 4 == 0 for i in range(20)]
    assert max(b for b in bounds if np.isfinite(b)) < gaussian_log_z
    np.testing.assert_allclose(float(state.raised), 2.5, rtol=1e-4)


def tracker_with(log_z, offsets, dim=2):
    """A tracker whose groups are ``log_z + offsets`` (recentred so the estimate is
    ``log_z``), on ``dim``-D standard normal rows, with the settings of ``tracker_at``."""
    data = jax.random.normal(jax.random.key(30), (300, dim))
    state, settings = tracker_at(0.0, data)
    groups = jnp.asarray(offsets, state.group_log_z.dtype)
    groups = groups + log_z - tracking.estimate(state._replace(group_log_z=groups))[0]
    return state._replace(group_log_z=groups), settings, data


def with_running(state, variance, ess):
    dtype = state.group_log_z.dtype
    return state._replace(
        importance_variance=jnp.asarray(variance, dtype), importance_ess=jnp.asarray(ess, dtype)
    )


def test_the_importance_estimate_is_fused_by_a_kalman_update_on_z_where_its_ess_is_large():
    """2-D ``E = ½‖x‖²`` (``log Z = log 2π``). The first floor only starts the running means
    of the draws' variance and ESS. With them set, the tracked value moves to ``log((1 − K)
    e^value + K Ẑ)`` (``K = P / (P + R)``, ``P`` grown by ``1 / FUSE_MEMORY``, ``R`` the
    running variance) and its error bar to ``√((1 − K) P)``; a measurement more than 3
    combined standard errors below or 5 above is not used, one 3.3 above is; a running ESS
    below the gate, or ``fuse_ess`` None, fuses nothing;
    in 10-D with wells at the rows the ESS is below the gate."""
    exact = float(np.log(2 * np.pi))
    gaussian = lambda x: -0.5 * jnp.sum(x**2)
    off, settings, data = tracker_with(exact + 0.05, [-0.1, -0.05, 0.05, 0.1])
    base = fit_base(data)
    key = jax.random.key(31)
    first, _, missed, fused = tracking.floor(key, off, gaussian, data, base, settings)
    assert not bool(fused) and not bool(missed)
    np.testing.assert_array_equal(first.group_log_z, off.group_log_z)
    log_w = data_bound.log_weights(key, gaussian, data, base, num_samples=settings.floor_samples)
    measured, stderr_is, ess = (float(v) for v in data_bound.importance_estimate(log_w))
    np.testing.assert_allclose(float(first.importance_variance), stderr_is**2, rtol=1e-5)
    np.testing.assert_allclose(float(first.importance_ess), ess / len(log_w), rtol=1e-5)
    assert ess / len(log_w) > 0.2  # the proposal fits a 2-D Gaussian

    noise = 0.03**2
    ready = with_running(off, noise, 0.5)
    value, stderr = (float(v) for v in tracking.estimate(ready))
    fused_state, _, missed, fused = tracking.floor(key, ready, gaussian, data, base, settings)
    assert bool(fused) and not bool(missed)
    var = stderr**2 / data_bound.FUSE_MEMORY
    gain = var / (var + noise)
    expected = np.logaddexp(np.log1p(-gain) + value, np.log(gain) + measured)
    after, after_stderr = (float(v) for v in tracking.estimate(fused_state))
    np.testing.assert_allclose(after, expected, atol=1e-5)
    np.testing.assert_allclose(after_stderr, np.sqrt((1 - gain) * var), rtol=0.02)
    assert after_stderr < min(stderr, 0.03) and abs(after - exact) < abs(value - exact)
    # the running means move towards this update's draws
    decay = data_bound.IMPORTANCE_DECAY
    np.testing.assert_allclose(
        float(fused_state.importance_variance),
        decay * noise + (1 - decay) * stderr_is**2,
        rtol=1e-5,
    )

    tight = [-0.0125, -0.00625, 0.00625, 0.0125]
    # the gate: 33 combined standard errors below or above, and 3.3 above (within its 5)
    for shift, used in ((1.0, False), (-1.0, False), (-0.1, True)):
        far, _, _ = tracker_with(exact + shift, tight)
        far = with_running(far, noise, 0.5)
        kept, _, _, fused = tracking.floor(key, far, gaussian, data, base, settings)
        assert bool(fused) is used
        moved = float(tracking.estimate(kept)[0] - tracking.estimate(far)[0])
        assert (moved > 0.001) if used else (moved == 0.0)

    closed = with_running(off, noise, 0.1)
    kept, _, _, fused = tracking.floor(key, closed, gaussian, data, base, settings)
    assert not bool(fused)
    np.testing.assert_array_equal(kept.group_log_z, closed.group_log_z)
    never = settings._replace(fuse_ess=None)
    kept, _, _, fused = tracking.floor(key, ready, gaussian, data, base, never)
    assert not bool(fused) and kept.importance_variance == ready.importance_variance
    np.testing.assert_array_equal(kept.group_log_z, ready.group_log_z)

    wells = rows()
    right, settings = tracker_at(exact_wells_log_z(), wells)
    kept, _, _, fused = tracking.floor(
        jax.random.key(7), right, wells_logdensity(wells), wells, fit_base(wells), settings
    )
    assert not bool(fused) and float(kept.importance_ess) < settings.fuse_ess


def test_fit_records_the_bound_below_the_tracked_log_z_of_a_gaussian():
    data = jax.random.normal(jax.random.key(10), (2000, 3)) @ jnp.diag(jnp.array([1.0, 2.0, 0.5]))
    energy = ebm.energies.GaussianEnergy(jnp.zeros(3), jnp.eye(3))
    result = ebm.fit(
        energy, data, key=jax.random.key(11), num_steps=100, num_chains=128, batch_size=256,
        progress_bar=False,
    )  # fmt: skip
    bound = np.asarray(result.history["log_z_bound"])
    log_z = np.asarray(result.history["log_z"])
    assert bound.shape == log_z.shape and np.all(np.isfinite(bound))
    assert np.all(bound < log_z)  # the floor never fired: the tracker had the mass (no NaN)
    assert np.all(result.history["log_z_raised"] == 0.0) and result.log_z.info["raised"] == 0.0
    exact = float(result.energy.log_z)
    assert bound[-1] < exact < bound[-1] + data_bound.MARGIN + 1.0


def test_bad_input_is_refused_before_any_compute():
    data = np.asarray(rows())
    energy = lambda x: 0.5 * jnp.sum(x**2)
    key = jax.random.key(12)
    nan = data.copy()
    nan[3, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        ebm.logz.data_bound(energy, nan, key=key)
    with pytest.raises(ValueError, match="floating-point"):
        ebm.logz.data_bound(energy, data.astype(int), key=key)
    with pytest.raises(ValueError, match="at least 2 training rows"):
        ebm.logz.data_bound(energy, data[:1], key=key)
    with pytest.raises(ValueError, match="scalar"):
        ebm.logz.data_bound(lambda x: x, data, key=key)
    with pytest.raises(ValueError, match="num_samples"):
        ebm.logz.data_bound(energy, data, key=key, num_samples=0)
    with pytest.raises(ValueError, match="bandwidths"):
        ebm.logz.data_bound(energy, data, key=key, bandwidths=(0.1, -1.0))
