"""Groups of weighted particles, as the ``log Z`` tracker (``tracking``) carries them: reweighting
with each group's running ``log Ẑ``, the conditional effective sample size of a reweighting,
the largest part of an update a reweighting can take at a given ESS, systematic resampling of
the groups that need it, the estimate over the groups, and the groups moved to another
estimate of the same ``log Z`` (``respread``).

Weights are ``(G, N/G)`` arrays of unnormalised log-weights, one row per independent group.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from numpyro_ebm.logz import particles
    >>> log_weight, group_log_z = jnp.zeros((2, 4)), jnp.zeros(2)
    >>> log_ratio = jnp.log(jnp.array([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]]))
    >>> _, group_log_z = particles.reweight(log_weight, group_log_z, log_ratio)
    >>> [round(float(v), 3) for v in jnp.exp(group_log_z)]   # each group's mean ratio
    [1.0, 2.0]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

__all__ = [
    "FUSE_SIGMAS",
    "conditional_ess",
    "largest_fraction",
    "over_groups",
    "resample",
    "respread",
    "reweight",
    "reweight_and_resample",
    "systematic",
]

BISECTION_STEPS = 30  # largest_fraction's sub-step to 2⁻³⁰ of what is left of the update
# two estimates of one log Z are combined when they are this close in combined standard errors
# (a t₇ variable, the error of 8 groups, exceeds 3 with probability 0.02)
FUSE_SIGMAS = 3.0


def reweight(log_weight, group_log_z, log_ratio):
    """Weights ``(G, N/G)`` times ``exp(log_ratio)``, and each group's running ``log Ẑ``
    advanced by the log of its weighted mean ratio: ``(log_weight, group_log_z)``."""
    weighted = log_weight + log_ratio
    return weighted, group_log_z + logsumexp(weighted, axis=1) - logsumexp(log_weight, axis=1)


def conditional_ess(log_weight: jax.Array, log_ratio: jax.Array) -> jax.Array:
    """Per group, the conditional ESS fraction ``(Σ Wᵢ rᵢ)² / Σ Wᵢ rᵢ²`` of log-ratios
    ``log_ratio`` under normalised weights ``W ∝ exp(log_weight)``."""
    log_w = log_weight - logsumexp(log_weight, axis=1, keepdims=True)
    first = logsumexp(log_w + log_ratio, axis=1)
    second = logsumexp(log_w + 2.0 * log_ratio, axis=1)
    return jnp.exp(2.0 * first - second)


def systematic(key: jax.Array, weights: jax.Array, num_samples: int) -> jax.Array:
    """``blackjax.smc.resampling.systematic``, the same indices, without a loop: blackjax
    calls ``searchsorted``'s default method, a loop whose every iteration waits on the host
    on a GPU (an H200 spent 0.1 ms of a 1.4 ms training step on it). Comparing all pairs is
    one small fused kernel for groups of tens or hundreds of particles; larger ones sort."""
    u = jax.random.uniform(key, ())
    cumulative = jnp.cumsum(weights)
    points = (jnp.arange(num_samples, dtype=weights.dtype) + u) / num_samples
    method = "compare_all" if weights.shape[0] * num_samples <= 2**20 else "sort"
    index = jnp.searchsorted(cumulative, points, method=method)
    return jnp.clip(index, 0, weights.shape[0] - 1)


def resample(key, log_weight, threshold):
    """Global particle indices after systematic resampling of the groups whose ESS fraction
    is below ``threshold`` (the others keep theirs), and which groups were resampled."""
    num_groups, group_size = log_weight.shape
    ess = jnp.exp(2.0 * logsumexp(log_weight, axis=1) - logsumexp(2.0 * log_weight, axis=1))
    redo = ess / group_size < threshold
    keys = jax.random.split(key, num_groups)
    picked = jax.vmap(lambda k, lw: systematic(k, jax.nn.softmax(lw), group_size))(keys, log_weight)
    local = jnp.where(redo[:, None], picked, jnp.arange(group_size)[None, :])
    return (local + group_size * jnp.arange(num_groups)[:, None]).reshape(-1), redo


def reweight_and_resample(key, log_weight, group_log_z, log_ratio, threshold):
    """One SMC step without the move: ``reweight`` by ``log_ratio``, then ``resample`` the groups
    whose ESS fraction fell below ``threshold`` (their weights reset to equal). Returns
    ``(index, log_weight, group_log_z)``: the particles to keep, by global index."""
    weighted, group_log_z = reweight(log_weight, group_log_z, log_ratio)
    index, redo = resample(key, weighted, threshold)
    return index, jnp.where(redo[:, None], 0.0, weighted).astype(log_weight.dtype), group_log_z


def over_groups(group_log_z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(log Ẑ, standard error)`` of ``(G,)`` groups' ``log Ẑ``: the log of the mean of their
    ``Ẑ`` and the delta-method error ``std(Ẑ_g) / (√G mean(Ẑ_g))`` (at most 1: one group
    holding all the mass)."""
    count = group_log_z.shape[0]
    value = logsumexp(group_log_z) - jnp.log(count)
    w = jnp.exp(group_log_z - jnp.max(group_log_z))
    return value, jnp.std(w, ddof=1) / (jnp.sqrt(count) * jnp.mean(w))


def respread(group_log_z: jax.Array, value, factor) -> jax.Array:
    """``(G,)`` groups whose ``over_groups`` estimate is ``value`` and whose spread about it is
    ``factor`` times theirs (their standard error, to first order in the spread)."""
    spread = value + factor * (group_log_z - jnp.mean(group_log_z))
    return spread + value - over_groups(spread)[0]


def largest_fraction(log_weight, difference, remaining, target_ess):
    """The largest part ``δ ≤ remaining`` of the update whose reweighting by
    ``δ · difference`` keeps every group's conditional ESS at ``target_ess`` (bisection)."""

    def ok(delta):
        return jnp.min(conditional_ess(log_weight, delta * difference)) >= target_ess

    def halve(_, bounds):
        low, high = bounds
        middle = 0.5 * (low + high)
        good = ok(middle)
        return jnp.where(good, middle, low), jnp.where(good, high, middle)

    def bisect(remaining):
        low, _ = jax.lax.fori_loop(
            0, BISECTION_STEPS, halve, (jnp.zeros_like(remaining), remaining)
        )
        return jnp.maximum(low, remaining * 2.0**-BISECTION_STEPS)  # always some progress

    # most updates fit in one reweighting: the bisection runs only for those that do not
    return jax.lax.cond(ok(remaining), lambda r: r, bisect, remaining)
