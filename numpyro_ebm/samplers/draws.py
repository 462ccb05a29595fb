"""Drawing samples: ``DrawSettings`` (how many warm-up steps, chains, thinning) and
``sample_chains`` (warm up, then record draws), what ``EnergyDistribution.sample`` runs.

A ``Sampler`` says how a chain moves; ``DrawSettings`` say how the chains that draw samples
are started, burnt in and recorded. Training and AIS never read draw settings.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from numpyro_ebm import samplers
    >>> logdensity = lambda x: -0.5 * jnp.sum(x**2)
    >>> draws, h = samplers.sample_chains(
    ...     jax.random.key(0), samplers.mala(), logdensity, jnp.zeros((4, 2)), num_draws=50,
    ...     draws=samplers.DrawSettings(num_warmup=100, thinning=2))
    >>> draws.positions.shape, draws.info.acceptance_rate.shape
    ((4, 50, 2), (4, 50))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_ebm.samplers.adaptation import warmup
from numpyro_ebm.samplers.chains import Draws, run_chains
from numpyro_ebm.samplers.kernels import Sampler, chain_dtype
from numpyro_ebm.samplers.tempering import isotropic_base, sample_tempered
from numpyro_ebm.validation import (
    check_count,
    check_positive,
    is_integer,
    validate_data,
    validate_event_shape,
)

__all__ = ["DrawSettings", "sample_chains"]


@dataclass(frozen=True)
class DrawSettings:
    """How ``EnergyDistribution.sample`` (and ``sample_chains``) draws samples.

    Attributes:
        num_warmup: warm-up (burn-in) steps before the first draw: the first half tunes the
            step size, the second half runs with the tuned step size fixed (see ``warmup``),
            so every draw comes from a kernel that leaves the target invariant.
        thinning: steps between two recorded draws of the same chain.
        num_chains: chains used by ``sample`` (per condition for a conditional
            distribution); ``None`` runs one chain per requested draw.
        init_scale: chains start from ``Normal(0, init_scale²)`` in every coordinate (when
            the distribution has no initializer).
        num_temperatures: 1 (default) runs plain chains. ``K >= 2`` makes every chain a
            ladder of parallel tempering (``samplers.tempering``) between the base
            ``Normal(0, init_scale² I)`` and the model, so draws cross between separated modes
            and get their weights right: each step is one round (a kernel transition at every
            temperature, then swaps), costing ``K`` energy gradients per chain; the warm-up
            also places the temperatures. Draws come from the model's slot.

    Example:
        >>> from numpyro_ebm import samplers
        >>> samplers.DrawSettings(num_chains=4).replace(thinning=10)
        DrawSettings(num_warmup=1000, thinning=10, num_chains=4, init_scale=1.0, num_temperatures=1)
    """

    num_warmup: int = 1000
    thinning: int = 1
    num_chains: int | None = None
    init_scale: float = 1.0
    num_temperatures: int = 1

    def __post_init__(self):
        check_count("thinning", self.thinning)
        check_count("num_warmup", self.num_warmup, low=0)
        if self.num_chains is not None and not (
            is_integer(self.num_chains) and self.num_chains >= 1
        ):
            raise ValueError(f"num_chains must be None or an integer >= 1, got {self.num_chains!r}")
        check_positive("init_scale", self.init_scale)
        check_count("num_temperatures", self.num_temperatures)
        for name in ("num_warmup", "thinning", "num_chains", "num_temperatures"):
            if getattr(self, name) is not None:  # NumPy integers as Python ints
                object.__setattr__(self, name, int(getattr(self, name)))

    def replace(self, **changes) -> DrawSettings:
        """A copy with some fields changed, e.g. ``draws.replace(num_warmup=200)``."""
        return replace(self, **changes)


def sample_chains(
    key: jax.Array,
    sampler: Sampler,
    logdensity_fn: Callable,
    positions: jax.Array,
    num_draws: int,
    *,
    draws: DrawSettings | None = None,
    event_shape: tuple[int, ...] | None = None,
) -> tuple[Draws, jax.Array]:
    """Warm up chains (``draws.num_warmup`` steps, see ``warmup``) and record draws.

    Every recorded draw comes after the tuned step size has been held fixed for the second
    half of the warm-up, so with enough warm-up each chain's draws follow the target, even for
    one chain and one draw.

    Args:
        key: PRNG key, used once (split into warm-up and sampling keys).
        sampler: the kernel and its settings.
        logdensity_fn: log-density of one flat position.
        positions: ``(num_chains, dim)`` flat starting points, finite floats. The chains
            run in ``kernels.chain_dtype`` of their dtype: at least JAX's default float
            dtype (float16 and bfloat16 points run, and are drawn, in float32; float32 ones
            in float64 under ``jax_enable_x64``).
        num_draws: draws per chain, one every ``draws.thinning`` steps (static), >= 1.
        draws: ``num_warmup`` and ``thinning`` (default ``DrawSettings()``); its
            ``num_chains`` and ``init_scale`` are the caller's (they choose ``positions``).
        event_shape: shape to give each draw, of ``dim`` numbers (default: flat).

    Returns:
        ``(Draws, step_size)``: the draws (chain-major) and the tuned step size.

    Raises:
        ValueError: positions that are not ``(num_chains, dim)`` finite floats (NaN and inf
            are found only in concrete positions, not under ``jit``), a bad ``num_draws``,
            or an ``event_shape`` of other than ``dim`` numbers, before any compute.
    """
    settings = DrawSettings() if draws is None else draws
    if not isinstance(settings, DrawSettings):
        raise TypeError(f"draws must be a numpyro_ebm.samplers.DrawSettings, got {draws!r}")
    positions = _checked_positions(positions)
    check_count("num_draws", num_draws)
    num_draws = int(num_draws)
    num_chains, dim = positions.shape
    event_shape = (dim,) if event_shape is None else _checked_event_shape(event_shape)
    if math.prod(event_shape) != dim:
        raise ValueError(
            f"event_shape {event_shape} holds {math.prod(event_shape)} numbers, but the "
            f"positions {positions.shape} have dim {dim} per chain: pass an event_shape of "
            f"{dim} numbers (or none for flat draws)"
        )
    if settings.num_temperatures > 1:
        return _sample_tempered(
            key, sampler, logdensity_fn, positions, num_draws, settings, event_shape
        )
    key_warmup, key_draws = jax.random.split(key)
    states = sampler.init_chains(positions, logdensity_fn)
    states, step_size, _ = warmup(key_warmup, sampler, logdensity_fn, states, settings.num_warmup)
    _, trace, recorded = run_chains(
        key_draws,
        sampler,
        logdensity_fn,
        states,
        step_size,
        num_draws * settings.thinning,
        thinning=settings.thinning,
        keep_positions=True,
    )
    chain_major = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), trace)
    recorded = jnp.swapaxes(recorded, 0, 1).reshape(num_chains, num_draws, *event_shape)
    step = settings.thinning * (1 + jnp.arange(num_draws))
    return Draws(recorded, chain_major, step), step_size


def _checked_positions(positions) -> jax.Array:
    """``positions`` as ``(num_chains, dim)`` floats in their chain dtype (``ValueError``
    otherwise; concrete ones are checked for NaN and inf too, by ``validate_data``)."""
    if len(jnp.shape(positions)) != 2:
        raise ValueError(
            f"positions must be flat starting points (num_chains, dim), got shape "
            f"{jnp.shape(positions)}"
        )
    if not isinstance(positions, jax.core.Tracer):
        positions = validate_data(positions, name="positions")
    positions = jnp.asarray(positions)
    if not jnp.issubdtype(positions.dtype, jnp.floating):
        raise ValueError(f"positions must be floating-point, got dtype {positions.dtype}")
    return positions.astype(chain_dtype(positions.dtype))


def _checked_event_shape(event_shape) -> tuple[int, ...]:
    """``validate_event_shape`` of an int or any sequence of ints (a NumPy array too)."""
    if not is_integer(event_shape) and not isinstance(event_shape, tuple | list):
        try:
            event_shape = tuple(np.asarray(event_shape).tolist())
        except TypeError:
            pass  # validate_event_shape names it
    return validate_event_shape(event_shape)


def _sample_tempered(key, sampler, logdensity_fn, positions, num_draws, settings, event_shape):
    """``sample_chains`` with every chain a tempering ladder (``settings.num_temperatures``)."""
    num_chains, dim = positions.shape
    base = isotropic_base(dim, settings.init_scale, positions.dtype)
    recorded, info, step_size, summary = sample_tempered(
        key,
        sampler,
        logdensity_fn,
        positions,
        num_draws,
        num_temperatures=settings.num_temperatures,
        thinning=settings.thinning,
        num_warmup=settings.num_warmup,
        base=base,
    )
    step = settings.thinning * (1 + jnp.arange(num_draws))
    recorded = recorded.reshape(num_chains, num_draws, *event_shape)
    return Draws(recorded, info, step, summary), step_size
