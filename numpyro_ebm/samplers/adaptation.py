"""Step-size rules, all in one place: the bounds, the warm-up and the per-step updates.

* ``STEP_SIZE_BOUNDS``: where the per-step updates keep the step size (training, tempering
  ladders, AIS, the log Z tracker) for a target of unit scale; ``step_size_bounds`` widens
  them for a wider or narrower one. ``warmup``'s dual averaging is not clipped: it follows
  the target's scale.
* ``warmup``: burn-in for drawing samples: dual averaging (Hoffman & Gelman 2014) on the mean
  acceptance across chains for the first half, then the tuned step size held fixed.
* ``adapt_step_size``: the Robbins-Monro update training applies once per step
  (``log h ← log h + gain · (acceptance − target)``, clipped), for a ``Sampler``.
* ``adapt_step_size_multiplicative``: the same rule written as ``h · exp(gain · (acceptance −
  target))`` for a target given as a number (AIS tunes its kernel between temperatures so).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from numpyro_ebm import samplers
    >>> sampler = samplers.mala()
    >>> logdensity = lambda x: -0.5 * jnp.sum(x**2)
    >>> states = sampler.init_chains(jnp.zeros((16, 2)), logdensity)
    >>> states, step_size, info = samplers.warmup(
    ...     jax.random.key(0), sampler, logdensity, states, num_steps=200)
    >>> info.step_size.shape
    (200,)
    >>> # acceptance 0.3 above MALA's target 0.574: log h grows by gain · 0.3
    >>> round(float(samplers.adapt_step_size(jnp.float32(0.1), 0.874, sampler, gain=1.0)), 4)
    0.135
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import blackjax
import jax
import jax.numpy as jnp

from numpyro_ebm.samplers.chains import check_step_size, run_chains, vmapped_step
from numpyro_ebm.samplers.kernels import Sampler
from numpyro_ebm.validation import check_count

__all__ = [
    "STEP_SIZE_BOUNDS",
    "WarmupInfo",
    "adapt_step_size",
    "adapt_step_size_multiplicative",
    "step_size_bounds",
    "warmup",
]

# Where the per-step updates (adapt_step_size, adapt_step_size_multiplicative: training,
# tempering ladders, AIS, the tracker) keep the step size of a target of unit scale: a chain
# that wanders into a flat or exploding region must not drive it to 0 or infinity.
# step_size_bounds widens them by the target's variances. warmup's dual averaging is not
# clipped: it tunes to the target's scale, which may lie outside these bounds.
STEP_SIZE_BOUNDS = (1e-6, 10.0)


def step_size_bounds(variance=None) -> tuple:
    """``STEP_SIZE_BOUNDS`` for a target whose coordinates have variances ``variance``
    (``(D,)``, e.g. ``GaussianBase.variance`` of the training data; None: unit scale): the
    upper bound times the power of two at or below the largest variance when that is 2 or
    more, the lower bound times the power of two at or above the smallest when that is 1/2 or
    less. Non-finite variances (a Cauchy base's) count as 1.

    A MALA step ``h`` moves a chain by about ``√(2h)``, so its best value grows with the
    target's variance (``1.2 σ²`` for ``N(0, σ²)``): with the unit-scale bounds, chains on data
    of scale 100 would be held at a tenth of a percent of it. The bounds only ever widen, and
    by powers of two, so data of about unit scale (variances between 1/2 and 2: standardized
    data, whose fitted variances carry a small jitter) keep exactly the unit-scale bounds.

    Example:
        >>> import jax.numpy as jnp
        >>> from numpyro_ebm.samplers import step_size_bounds
        >>> tuple(f"{float(b):.3g}" for b in step_size_bounds(jnp.array([0.25, 400.0])))
        ('2.5e-07', '2.56e+03')
    """
    low, high = STEP_SIZE_BOUNDS
    if variance is None:
        return low, high
    variance = jnp.asarray(variance)
    log2 = jnp.log2(jnp.where(jnp.isfinite(variance) & (variance > 0), variance, 1.0))
    widest = jnp.exp2(jnp.maximum(0.0, jnp.floor(jnp.max(log2))))
    narrowest = jnp.exp2(jnp.minimum(0.0, jnp.ceil(jnp.min(log2))))
    return low * narrowest, high * widest


def adapt_step_size(step_size, acceptance, sampler: Sampler, gain: float, bounds=STEP_SIZE_BOUNDS):
    """Robbins-Monro ``log h ← log h + gain · (acceptance − target)``, clipped to ``bounds``
    (unchanged, but still clipped, for kernels that do not adapt).

    Args:
        step_size: current step size, a scalar array (its dtype is kept).
        acceptance: the acceptance rate observed with it (e.g. the mean over chains).
        sampler: the kernel; ``sampler.target`` is the target, ``sampler.adapts`` whether to
            adapt at all.
        gain: the update's gain (step size of the stochastic approximation in log space).
        bounds: ``(low, high)``, ``step_size_bounds`` of the target (default: unit scale).

    Returns:
        The new step size, same shape and dtype as ``step_size``.
    """
    log_h = jnp.log(step_size)
    if sampler.adapts:
        log_h = log_h + gain * (acceptance - sampler.target)
    low, high = bounds
    return jnp.clip(jnp.exp(log_h), low, high).astype(step_size.dtype)


def adapt_step_size_multiplicative(
    step_size, acceptance, target: float, gain: float = 2.0, bounds=STEP_SIZE_BOUNDS
):
    """``h · exp(gain · (acceptance − target))``, clipped to ``bounds`` (``step_size_bounds``
    of the target; default: unit scale).

    The rule of ``adapt_step_size`` for a target given as a number (no ``Sampler``),
    computed multiplicatively: AIS retunes its kernel's step size so after each temperature
    (with ``gain=2``). A NaN ``acceptance`` is the caller's to handle (AIS counts it as 0).

    Args:
        step_size: current step size (scalar or array).
        acceptance: acceptance rate observed with it.
        target: acceptance rate to move toward, in (0, 1).
        gain: how strongly one observation moves ``log h``.

    Returns:
        The new step size.

    Example:
        >>> from numpyro_ebm import samplers
        >>> round(float(samplers.adapt_step_size_multiplicative(0.1, 0.8, target=0.65)), 4)
        0.135
    """
    return jnp.clip(step_size * jnp.exp(gain * (acceptance - target)), *bounds)


class WarmupInfo(NamedTuple):
    """Per-step record of ``warmup``: mean acceptance across chains and the step size used."""

    acceptance_rate: jax.Array
    step_size: jax.Array


def warmup(
    key: jax.Array,
    sampler: Sampler,
    logdensity_fn: Callable,
    states: Any,
    num_steps: int,
    step_size=None,
) -> tuple[Any, jax.Array, WarmupInfo]:
    """Burn in ``num_chains`` chains: tune one shared step size, then hold it fixed.

    The first ``num_steps // 2`` steps tune the step size by BlackJAX's dual averaging
    (Hoffman & Gelman 2014) on the mean acceptance rate across chains. The remaining steps run
    with the tuned (averaged) step size held fixed: while it adapts, the step size depends on
    where the chains are, so the chains' state is not a draw from the target (adaptive MCMC's
    last iterate is biased; a single chain comes out under-dispersed). After the switch every
    step is a Metropolis kernel that leaves the target invariant, and the chains forget the
    adaptation before the first draw. Kernels that do not adapt (ULA, or
    ``adapt_step_size=False``) run all ``num_steps`` steps with ``step_size``. The tuned step
    size is not clipped to ``STEP_SIZE_BOUNDS``; it has the dtype of the chains' positions.

    Args:
        key: PRNG key, used once.
        sampler: the kernel configuration.
        logdensity_fn: log-density of one flat position.
        states: vmapped BlackJAX states, leading axis chains.
        num_steps: warm-up steps (static), tuning and fixed together, an integer >= 0.
        step_size: initial step size, a finite number > 0 (default ``sampler.step_size``).

    Returns:
        ``(states, step_size, WarmupInfo)``: the chains after all ``num_steps`` steps, the
        step size they ended with (the one to sample with), and per-step records of shape
        ``(num_steps,)``.

    Raises:
        ValueError: a bad ``num_steps`` or (concrete) ``step_size``, before any compute.
    """
    check_count("num_steps", num_steps, low=0)
    if step_size is not None:
        check_step_size(step_size)
    dtype = jnp.result_type(*jax.tree.leaves(states.position))
    step_size = jnp.asarray(sampler.step_size if step_size is None else step_size, dtype)
    empty = jnp.zeros((0,), dtype)
    if num_steps == 0:
        return states, step_size, WarmupInfo(empty, empty)
    num_tuning = num_steps // 2 if sampler.adapts else 0
    key_tune, key_fixed = jax.random.split(key)
    tuning = WarmupInfo(empty, empty)
    if num_tuning:
        states, step_size, tuning = _dual_averaging(
            key_tune, sampler, logdensity_fn, states, num_tuning, step_size
        )
    states, infos, _ = run_chains(
        key_fixed, sampler, logdensity_fn, states, step_size, num_steps - num_tuning
    )
    acc = jnp.mean(infos.acceptance_rate, axis=1)
    fixed = WarmupInfo(acc, jnp.full_like(acc, step_size))
    return states, step_size, jax.tree.map(lambda a, b: jnp.concatenate([a, b]), tuning, fixed)


def _dual_averaging(key, sampler, logdensity_fn, states, num_steps, step_size):
    """Dual averaging for ``num_steps`` steps: ``(states, averaged step size, WarmupInfo)``."""
    da_init, da_update, da_final = blackjax.adaptation.step_size.dual_averaging_adaptation(
        sampler.target
    )
    vstep = vmapped_step(sampler, logdensity_fn, states)

    def one_step(carry, step_key):
        chain_states, da_state = carry
        h = jnp.exp(da_state.log_step_size)
        new, info = vstep(step_key, chain_states, h)
        # A NaN acceptance (e.g. a proposal into an inf-energy region) counts as a rejection.
        acc = jnp.mean(jnp.nan_to_num(info.acceptance_rate, nan=0.0)).astype(h.dtype)
        return (new, da_update(da_state, acc)), WarmupInfo(acc, h)

    (states, da_state), infos = jax.lax.scan(
        one_step, (states, da_init(step_size)), jax.random.split(key, num_steps)
    )
    return states, da_final(da_state).astype(step_size.dtype), infos
