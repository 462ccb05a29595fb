"""Many chains at once: ``vmap`` over chains, ``lax.scan`` over steps, a fixed step size.

Chains always move on flat vectors of size ``prod(event_shape)``: ``flat_logdensity`` wraps an
energy for one event of any shape, so that HMC's mass matrix and the noise are plain vectors.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from numpyro_ebm import samplers
    >>> sampler = samplers.mala()
    >>> logdensity = lambda x: -0.5 * jnp.sum(x**2)
    >>> states = sampler.init_chains(jnp.zeros((16, 2)), logdensity)
    >>> states, trace, _ = samplers.run_chains(
    ...     jax.random.key(1), sampler, logdensity, states, 0.5, num_steps=100, thinning=10)
    >>> states.position.shape, trace.acceptance_rate.shape
    ((16, 2), (10, 16))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_ebm.samplers.kernels import ChainInfo, Sampler
from numpyro_ebm.validation import check_count, check_positive

__all__ = [
    "Draws",
    "check_step_size",
    "flat_logdensity",
    "run_chains",
    "summarize",
    "vmapped_step",
]


def check_step_size(step_size) -> None:
    """A concrete step size must be a finite number > 0 (a ``ValueError`` naming it
    otherwise: a negative one turns the chains into NaN); a traced one is not checked."""
    if isinstance(step_size, jax.core.Tracer):
        return
    value = step_size
    if isinstance(value, jax.Array | np.ndarray | np.generic) and jnp.ndim(value) == 0:
        value = value.item()  # a 0-d array's Python number (a bool stays a bool: refused)
    check_positive("step_size", value)


def flat_logdensity(energy: Callable, event_shape: tuple[int, ...]) -> Callable:
    """``z -> -energy(z.reshape(event_shape))`` for flat ``z`` of size ``prod(event_shape)``."""

    def logdensity(z):
        return -energy(jnp.reshape(z, event_shape))

    return logdensity


def run_chains(
    key: jax.Array,
    sampler: Sampler,
    logdensity_fn: Callable,
    states: Any,
    step_size,
    num_steps: int,
    *,
    thinning: int = 1,
    keep_positions: bool = False,
) -> tuple[Any, ChainInfo, jax.Array | None]:
    """Advance ``num_chains`` chains by ``num_steps`` steps with a fixed step size.

    Args:
        key: PRNG key, used once.
        sampler: the kernel configuration.
        logdensity_fn: log-density of ONE chain's flat position.
        states: vmapped BlackJAX states (leading axis: chains), e.g. from
            ``Sampler.init_chains``.
        step_size: scalar step size shared by all chains, a finite number > 0.
        num_steps: number of transitions (static), an integer >= 0.
        thinning: record every ``thinning``-th step (static); ``num_steps`` must be a multiple.
        keep_positions: also return the recorded positions.

    Raises:
        ValueError: a bad ``num_steps``, ``thinning`` or (concrete) ``step_size``, before any
            compute.

    Returns:
        ``(final_states, trace, positions)``: ``trace`` is a ``ChainInfo`` of arrays of
        shape ``(num_steps // thinning, num_chains)`` (with thinning, one record per
        ``thinning`` steps: mean acceptance and step size, any divergence, total gradient
        evaluations, log-density and Hamiltonian at the recorded position); ``positions`` has shape
        ``(num_steps // thinning, num_chains, dim)``, or is ``None`` without ``keep_positions``.
    """
    check_count("num_steps", num_steps, low=0)
    check_count("thinning", thinning)
    check_step_size(step_size)
    if num_steps % thinning:
        raise ValueError(f"num_steps={num_steps} must be a multiple of thinning={thinning}")
    vstep = vmapped_step(sampler, logdensity_fn, states)

    def one_step(carry, step_key):
        return vstep(step_key, carry, step_size)

    def one_record(carry, record_key):
        carry, infos = jax.lax.scan(one_step, carry, jax.random.split(record_key, thinning))
        return carry, (summarize(infos), carry.position if keep_positions else None)

    keys = jax.random.split(key, num_steps // thinning)
    final, (trace, positions) = jax.lax.scan(one_record, states, keys)
    return final, trace, positions


def summarize(infos: ChainInfo) -> ChainInfo:
    """One record for several steps (leading axis of ``infos``): mean acceptance and step size,
    any divergence, total gradient evaluations, the last log-density and Hamiltonian. Thinned
    records built this way hide nothing the diagnostics need."""
    return ChainInfo(
        acceptance_rate=jnp.mean(infos.acceptance_rate, axis=0),
        is_divergent=jnp.any(infos.is_divergent, axis=0),
        logdensity=infos.logdensity[-1],
        hamiltonian=infos.hamiltonian[-1],
        step_size=jnp.mean(infos.step_size, axis=0),
        num_integration_steps=jnp.sum(infos.num_integration_steps, axis=0),
    )


def vmapped_step(sampler: Sampler, logdensity_fn: Callable, states: Any) -> Callable:
    """``(key, states, step_size) -> (states, infos)``: one step of every chain of ``states``
    (leading axis: chains), each chain with its own key split from ``key``."""
    num_chains = jax.tree.leaves(states)[0].shape[0]
    step = jax.vmap(lambda k, s, h: sampler.step(k, s, logdensity_fn, h), in_axes=(0, 0, None))
    return lambda key, s, h: step(jax.random.split(key, num_chains), s, h)


class Draws(NamedTuple):
    """Recorded draws of several chains in ArviZ's ``(chain, draw)`` order, with what the
    sampler reported for each (``numpyro_ebm.diagnostics.to_datatree`` turns it into a DataTree).

    Attributes:
        positions: ``(num_chains, num_draws, *event_shape)``.
        info: ``ChainInfo`` whose fields are ``(num_chains, num_draws)``; with thinning one record
            covers the steps since the previous draw (see ``run_chains``).
        step: ``(num_draws,)`` the step each draw was recorded at (sampler steps after
            warm-up; training steps for the chains ``fit`` records).
        tempering: ``samplers.TemperingSummary`` when the chains were parallel-tempering
            ladders (their model slots' draws), else None.
    """

    positions: Any
    info: ChainInfo
    step: Any
    tempering: Any = None
