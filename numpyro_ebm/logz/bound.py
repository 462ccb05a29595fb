"""A lower bound on ``log Z`` from importance sampling around the training rows.

An energy trained on a few hundred rows can grow narrow wells at (or near) the rows it was
trained on. The negative phase's chains, the ``log Z`` tracker and AIS all start from the
Gaussian fitted to the data and move a little at a time: none of them finds a well that never
held a particle, and the mass they miss can be tens of nats, with error bars that do not show
it (breast cancer, 30-D, 341 rows: tracked −49, AIS −7, while this bound says at least +29;
docs/benchmarks.md). Such a model scores well on its training rows and badly on new ones.

The proposal here puts half its mass on the fitted Gaussian and half on kernels at the rows,
``N(xᵢ, h² Σ)`` for a few widths ``h`` (``BANDWIDTHS``, in units of the data's covariance
``Σ``): a defensive mixture (Hesterberg 1995). ``Ẑ = mean exp(−E(x) − log q(x))`` over its draws
is unbiased for ``Z`` whatever ``q``, so by Markov's inequality
``P(log Z < log Ẑ − t) ≤ e⁻ᵗ``: ``log Ẑ − MARGIN`` is a lower confidence bound on ``log Z`` at
level ``1 − e^{−MARGIN}`` (95%), however poor the proposal. When it lies above another estimate
of ``log Z``, that estimate missed mass. Where the model has no such wells, the bound lies
below every good estimate (``log Ẑ`` is itself low on average, Jensen) and changes nothing.

The ``log Z`` tracker computes it after every update (``floor``, here; 1024 draws around the
batch's rows; ``floor_every`` thins it) and raises a tracked value below it, so the held-out
NLL that selects ``fit``'s returned model is not computed with a ``log Z`` that missed such
wells. The history columns ``log_z_bound`` and ``log_z_missed`` hold it, and ``diagnose``'s
``log_z_bound`` check reads them.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from numpyro_ebm.gaussian import fit_base
    >>> from numpyro_ebm.logz import bound
    >>> data = jax.random.normal(jax.random.key(0), (300, 3))
    >>> base = fit_base(data)
    >>> log_z = 1.5 * jnp.log(2 * jnp.pi)   # of E(x) = ‖x‖² / 2
    >>> value = bound.log_z_estimate(
    ...     jax.random.key(1), lambda x: -0.5 * jnp.sum(x**2), data, base)
    >>> bool(abs(value - log_z) < 0.1)
    True
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from numpyro_ebm.distribution import check_energy
from numpyro_ebm.gaussian import GaussianBase, fit_base
from numpyro_ebm.logz.estimate import LogZEstimate, log_mean_exp
from numpyro_ebm.logz.particles import FUSE_SIGMAS, over_groups, respread
from numpyro_ebm.validation import check_count, validate_data

if TYPE_CHECKING:  # tracking imports this module (its floor)
    from numpyro_ebm.logz.tracking import TrackerSettings, TrackerState

__all__ = [
    "BANDWIDTHS",
    "MARGIN",
    "data_bound",
    "floor",
    "importance_estimate",
    "log_z_estimate",
    "lower_bound",
]

# kernel widths in units of the data's covariance: a well found at 0.2 and 0.4 on breast cancer
BANDWIDTHS = (0.05, 0.1, 0.2, 0.4, 0.8)
MARGIN = 3.0  # nats: log Ẑ − 3 is below log Z with probability at least 1 − e⁻³ ≈ 0.95
NUM_CENTRES = 1024  # rows the kernels sit at (a random subset of larger data)
FUSE_MEMORY = 0.99  # the importance fusion forgets 1% per floor (``_fuse_importance``)
FUSE_ABOVE = 5.0  # the fusion's gate above the tracked value, in combined standard errors
IMPORTANCE_DECAY = 0.98  # its running means of the draws' variance and ESS: about 50 floors
CHUNK = 1024  # draws scored at once


def _draw(key, centres, base: GaussianBase, bandwidths, num_samples):
    """``(num_samples, D)`` draws of the mixture: the base with probability ½, else a kernel at
    a uniformly chosen centre with a uniformly chosen width."""
    k_pick, k_row, k_width, k_noise = jax.random.split(key, 4)
    dim = centres.shape[1]
    noise = jax.random.normal(k_noise, (num_samples, dim), centres.dtype) @ base.scale_tril.T
    rows = centres[jax.random.randint(k_row, (num_samples,), 0, centres.shape[0])]
    widths = jnp.asarray(bandwidths, centres.dtype)
    width = widths[jax.random.randint(k_width, (num_samples,), 0, len(bandwidths))]
    kernel = rows + width[:, None] * noise
    from_base = jax.random.bernoulli(k_pick, 0.5, (num_samples,))
    return jnp.where(from_base[:, None], base.mean + noise, kernel)


def _log_proposal(x, centres, base: GaussianBase, bandwidths):
    """``(n, D) -> (n,)`` log-density of the mixture. Written out rather than as a NumPyro
    ``MixtureSameFamily`` of ``MultivariateNormal``s: every kernel shares ``Σ``, so whitening
    once turns ``n × K`` triangular solves into one matrix product and squared distances."""
    white_x = (x - base.mean) @ base.inverse_scale_tril.T
    white_c = (centres - base.mean) @ base.inverse_scale_tril.T
    squared = (
        jnp.sum(white_x**2, 1)[:, None]
        - 2.0 * white_x @ white_c.T
        + jnp.sum(white_c**2, 1)[None, :]
    )
    squared = jnp.maximum(squared, 0.0)
    dim = x.shape[1]
    widths = jnp.asarray(bandwidths, x.dtype)
    # log N(x; c, h² Σ) = −‖(x − c)‖²_Σ / (2h²) − D log h − log_normalizer(L); the table of
    # n × K × W exponentials is most of the floor's cost
    if _doubling(bandwidths):
        per_width = _log_kernel_sums_doubling(squared, bandwidths)
        log_kernel = logsumexp(per_width - dim * jnp.log(widths), axis=1)
    else:
        log_kernel = -0.5 * squared[:, :, None] / widths**2 - dim * jnp.log(widths)
        log_kernel = logsumexp(log_kernel, axis=(1, 2))
    log_kernel = log_kernel - math.log(centres.shape[0] * len(bandwidths)) - base.log_z
    return jnp.logaddexp(base.log_prob(x), log_kernel) - math.log(2.0)


def _doubling(bandwidths) -> bool:
    """Whether each width is twice the one before (as ``BANDWIDTHS``)."""
    return len(bandwidths) > 1 and all(
        math.isclose(b, 2.0 * a, rel_tol=1e-12) for a, b in itertools.pairwise(bandwidths)
    )


def _log_kernel_sums_doubling(squared, bandwidths):
    """``(n, W)``: ``log Σ_k exp(−squared[:, k] / (2 h²))`` for widths that double, with one
    exponential per pair instead of one per pair and width: with ``v = exp(−(s − s_min) /
    (2 h_max²))`` the next narrower width's terms are ``v⁴`` (two squarings). Relative to each
    row's nearest centre (``s_min``), so the terms that matter (within a few tens of nats of
    that width's largest) do not underflow; 2.3 to 2.7 times faster than the table of
    ``W`` exponentials on the CPU (1024 draws × 1024 centres, 2-D and 64-D)."""
    nearest = jnp.min(squared, axis=1, keepdims=True)
    power = jnp.exp(-0.5 * (squared - nearest) / bandwidths[-1] ** 2)
    sums = []
    for i in range(len(bandwidths)):  # widest first: v, v⁴, v¹⁶, ...
        sums.append(jnp.sum(power, axis=1))
        if i + 1 < len(bandwidths):
            power = jnp.square(jnp.square(power))
    widths = jnp.asarray(bandwidths, squared.dtype)
    return jnp.log(jnp.stack(sums[::-1], axis=1)) - 0.5 * nearest / widths**2


def log_weights(key, logdensity: Callable, data, base: GaussianBase, *, num_samples=8192,
                bandwidths=BANDWIDTHS, num_centres=NUM_CENTRES):  # fmt: skip
    """``(num_samples,)`` importance log-weights ``−E(x) − log q(x)``, ``x ~ q`` (jittable).

    Args:
        key: PRNG key.
        logdensity: ``−E`` of one flat event.
        data: ``(N, D)`` flat training rows (``num_centres`` of them, drawn without
            replacement, carry the kernels when there are more).
        base: the Gaussian fitted to the data (``gaussian.fit_base``).
    """
    k_rows, k_draw = jax.random.split(key)
    if data.shape[0] > num_centres:
        data = jax.random.choice(k_rows, data, (num_centres,), replace=False)
    x = _draw(k_draw, data, base, bandwidths, num_samples)

    def score(x):
        return jax.vmap(logdensity)(x) - _log_proposal(x, data, base, bandwidths)

    if num_samples <= CHUNK:  # straight-line code (a loop of one is still a loop on a GPU)
        return score(x)
    chunk = math.gcd(num_samples, CHUNK)  # the (chunk, K, widths) kernel table bounds memory
    return jax.lax.map(score, x.reshape(num_samples // chunk, chunk, x.shape[1])).reshape(-1)


def importance_estimate(log_w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(log Ẑ, standard error, ESS)`` of ``(n,)`` importance log-weights (NaN counts as a
    zero weight), as ``estimate.log_mean_exp`` but jittable: ``Ẑ = mean exp(log_w)``, the
    delta-method error ``std(w) / (√n mean(w))`` and ``(Σw)² / Σw²``."""
    log_w = jnp.where(jnp.isnan(log_w), -jnp.inf, log_w)
    n = log_w.shape[0]
    value = logsumexp(log_w) - math.log(n)
    w = jnp.exp(log_w - jnp.max(log_w))
    stderr = jnp.std(w, ddof=1) / (math.sqrt(n) * jnp.mean(w))
    return value, stderr, jnp.sum(w) ** 2 / jnp.sum(w**2)


def log_z_estimate(key, logdensity: Callable, data, base: GaussianBase, **options) -> jax.Array:
    """``log Ẑ`` (``Ẑ`` unbiased for ``Z``) from ``log_weights`` (jittable; non-finite weights
    count as zero)."""
    return importance_estimate(log_weights(key, logdensity, data, base, **options))[0]


def lower_bound(key, logdensity: Callable, data, base: GaussianBase, **options) -> jax.Array:
    """``log Ẑ − MARGIN``: below ``log Z`` with probability at least ``1 − e^{−MARGIN}``
    (jittable)."""
    return log_z_estimate(key, logdensity, data, base, **options) - MARGIN


def data_bound(energy: Callable, data, *, key: jax.Array, num_samples: int = 65536,
               batch_size: int = 4096, bandwidths=BANDWIDTHS) -> LogZEstimate:  # fmt: skip
    """``log Ẑ`` of an unconditional energy by importance sampling around the rows of ``data``
    (``(N, *event_shape)``, the training rows): a ``LogZEstimate`` with method
    ``"data-bound"``, its delta-method standard error and ESS, and ``info["lower_bound"]``
    (``value − MARGIN``, below ``log Z`` with probability ≥ 95% whatever the ESS).

    Use it to check another estimate: an AIS or tracked ``log Z`` below ``lower_bound`` missed
    mass near the data. With a small ESS the value itself is not an estimate of ``log Z``.

    Raises:
        ValueError: before any compute, for data that is not a finite floating-point array of
            at least 2 rows, an energy that does not map one row to a scalar, a count below 1
            or a bandwidth that is not positive and finite.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from numpyro_ebm import logz
        >>> data = jax.random.normal(jax.random.key(0), (300, 2))
        >>> est = logz.data_bound(lambda x: 0.5 * jnp.sum(x**2), data, key=jax.random.key(1))
        >>> bool(abs(est.value - jnp.log(2 * jnp.pi)) < 0.05)
        True
    """
    data = validate_data(data, name="data (the training rows)")
    if data.shape[0] < 2:
        raise ValueError(f"data_bound needs at least 2 training rows, got {data.shape[0]}")
    shape = tuple(data.shape[1:])
    check_energy(energy, shape)
    check_count("num_samples", num_samples)
    check_count("batch_size", batch_size)
    widths = np.asarray(bandwidths, float)
    if widths.ndim != 1 or widths.size == 0 or not np.all(np.isfinite(widths) & (widths > 0)):
        raise ValueError(f"bandwidths must be positive finite numbers, got {bandwidths!r}")
    flat = data.reshape(data.shape[0], -1)
    base = fit_base(flat)

    def logdensity(x):
        return -energy(x.reshape(shape))

    keys = jax.random.split(key, -(-num_samples // batch_size))
    run = jax.jit(
        lambda k: log_weights(
            k, logdensity, flat, base, num_samples=batch_size, bandwidths=bandwidths
        )
    )
    log_w = np.concatenate([np.asarray(run(k), np.float64) for k in keys])[:num_samples]
    log_w[np.isnan(log_w)] = -np.inf
    value, stderr, ess = log_mean_exp(log_w)
    return LogZEstimate(value, stderr, "data-bound", ess, {"lower_bound": value - MARGIN})


def floor(key, state: TrackerState, logdensity: Callable, data, base, settings: TrackerSettings):
    """The tracked estimate checked against importance sampling around the training rows:
    ``(state, bound, missed, fused)``, at every ``settings.floor_every``-th update
    (``state.updates`` a multiple of it; at the others ``state`` as it is, NaN and false twice).

    First part of what earlier floors raised the estimate by is released. Then the importance
    estimate ``log Ẑ`` of ``logdensity`` (the energy ``state`` tracks; ``floor_samples``
    draws of the proposal above) is used twice:

    * **a floor** (``missed`` true) when ``bound = log Ẑ − MARGIN`` lies above the tracked
      estimate: the particles missed mass, and the groups are raised together to it.
    * **fused** (``fused`` true; ``_fuse_importance``) otherwise, where the proposal fits the
      model: while the running mean of its ESS is at least ``settings.fuse_ess`` of the
      draws, a Kalman update on ``Z`` moves the groups towards ``Ẑ`` and shrinks their
      spread. Each update's draws are fresh, so over updates the increments carry the
      estimate and the importance estimates correct it: on the 2-D toys the standard error
      at the end of training falls from about 0.03 (a re-anchor's AIS with 512 particles,
      carried on) to about 0.003 (docs/benchmarks.md).

    A raise is carried on by the increments, which do not see the wells that hold the mass go:
    kept for good, it holds the estimate above ``log Z`` after they have gone (breast cancer,
    seed 1: 34 nats at step 1100, where importance sampling around the rows found no well).
    So ``state.raised`` loses a ``1 − 2^(−floor_every/floor_half_life)`` fraction per floor
    (a half-life of ``floor_half_life`` updates), and wells that remain raise it again (each
    batch brings most rows back). Losing the track instead and restarting from the base did
    worse on breast cancer: the restart's short AIS missed 11 nats that no bound around the
    rows showed, and the selection took it
    (docs/benchmarks.md).

    Args:
        key: PRNG key.
        state: a tracker (a lost one is left as it is).
        logdensity: ``−E`` of one flat event.
        data: ``(N, D)`` flat training rows (e.g. the step's batch) the kernels sit at.
        base: the Gaussian fitted to the data.
        settings: ``floor_samples`` draws (0: never a floor), ``floor_every``,
            ``floor_half_life`` and ``fuse_ess``.
    """
    no = jnp.zeros((), bool)
    skipped = (state, jnp.full((), jnp.nan, state.group_log_z.dtype), no, no)
    if settings.floor_samples == 0:
        return skipped
    if settings.floor_every == 1:
        return _floor(key, state, logdensity, data, base, settings)
    return jax.lax.cond(
        state.updates % settings.floor_every == 0,
        lambda: _floor(key, state, logdensity, data, base, settings),
        lambda: skipped,
    )


def _floor(key, state, logdensity, data, base, settings):
    """``floor`` at an update where it is due."""
    dtype = state.group_log_z.dtype
    log_w = log_weights(key, logdensity, data, base, num_samples=settings.floor_samples)
    estimate = tuple(v.astype(dtype) for v in importance_estimate(log_w))
    bound = estimate[0] - MARGIN
    on_track = state.updates_lost == 0
    # per floor: a half-life of floor_half_life updates
    kept = (
        0.5 ** (settings.floor_every / settings.floor_half_life)
        if settings.floor_half_life
        else 1.0
    )
    release = jnp.where(on_track, (1.0 - kept) * state.raised, 0.0)
    groups = state.group_log_z - release
    value, stderr = over_groups(groups)

    missed = on_track & (bound > value)
    raise_by = jnp.where(missed, bound - value, 0.0)
    # a raise is a catch by a few large weights: not a measurement to average
    state, groups, fused = _fuse_importance(
        state, groups, value, stderr, estimate, settings.floor_samples, on_track & ~missed,
        settings,
    )  # fmt: skip
    floored = state._replace(
        group_log_z=(groups + raise_by).astype(dtype),
        raised=(state.raised - release + raise_by).astype(state.raised.dtype),
    )
    return floored, bound, missed, fused


def _fuse_importance(state, groups, value, stderr, estimate, num_draws, on_track, settings):
    """``(state, groups, fused)``: the tracked groups (estimate ``value ± stderr``) after a
    Kalman update with ``estimate``, ``importance_estimate`` of ``num_draws`` draws (``floor``),
    or as they were, and ``state`` with the running means of the draws' variance and ESS
    updated.

    * **The measurement's weight does not depend on its value.** Its noise ``R`` and the ESS
      gate are running means over the previous floors' draws (``IMPORTANCE_DECAY``), not this
      update's: a heavy-tailed sample that holds no large weight gives a low ``log Ẑ`` *and* a
      small delta-method error, so weighting each estimate by its own error favours the low
      ones (a 2-D ``SeparableEnergy``: −0.011 ± 0.002 from the exact ``log Z`` that way, where
      the estimates themselves were unbiased); and one update's error varies so much that
      weights from it (even from other draws) made the error bar 1.6 times too small.
    * **The update is on ``Ẑ``, not on ``log Ẑ``**: ``Z ← (1 − K) Z + K Ẑ`` with the gain
      ``K = P / (P + R)`` (``P``, ``R``: relative variances). ``Ẑ`` is unbiased and
      ``log Ẑ`` is not, so the average stays unbiased whatever the draws' tails.
    * **It forgets**: ``P`` grows by ``1 / FUSE_MEMORY`` before each measurement (a window
      of about 100 floors). Between floors the energy changes little and ``P`` grows little,
      and the filter would keep a re-anchor's AIS (low by ``½ var``, its error bar
      optimistic) at its weight for hundreds of updates.
    * **A validation gate on the innovation**, as tracking filters have: a measurement below
      the tracked value by more than ``FUSE_SIGMAS`` combined standard errors is not used
      (the proposal may miss mass the particles hold: modes away from the data), nor one
      above it by more than ``FUSE_ABOVE``. Above, the gate is wider: the draws' heavy right
      tail is what keeps ``Ẑ`` unbiased, and cutting it at 3 would bias the average low. But
      a rare weight far out moves ``Z`` by ``K`` times its size, which no error bar shows
      (a 4-D ``SeparableEnergy``: one estimate 2.7 nats above the rest moved the tracked
      value 0.33 nats, and it ended 0.118 ± 0.013 above the exact ``log Z``)."""
    if settings.fuse_ess is None:
        return state, groups, jnp.zeros((), bool)
    dtype = groups.dtype
    measured, stderr_is, ess = estimate
    noise, gate = state.importance_variance, state.importance_ess
    var = stderr**2 / FUSE_MEMORY
    spread = jnp.sqrt(var + noise)
    gated = (measured >= value - FUSE_SIGMAS * spread) & (measured <= value + FUSE_ABOVE * spread)
    fused = on_track & (gate >= settings.fuse_ess) & (noise > 0) & gated & jnp.isfinite(measured)
    gain = var / jnp.where(fused, var + noise, 1.0)
    combined = jnp.logaddexp(jnp.log1p(-gain) + value, jnp.log(gain) + measured)
    factor = jnp.sqrt((1.0 - gain) * var) / jnp.maximum(stderr, jnp.finfo(dtype).tiny)
    groups = jnp.where(fused, respread(groups, combined, factor), groups)

    def running(mean, new):  # the first estimate (gate −1) starts the means
        updated = jnp.where(gate < 0, new, IMPORTANCE_DECAY * mean + (1 - IMPORTANCE_DECAY) * new)
        return jnp.where(jnp.isfinite(new), updated, mean).astype(mean.dtype)

    state = state._replace(
        importance_variance=running(noise, stderr_is**2),
        importance_ess=running(gate, ess / num_draws),
    )
    return state, groups, fused
