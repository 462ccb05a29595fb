"""Parallel tempering (replica exchange) between a Gaussian base and the model.

A *ladder* of ``K`` replicas runs at inverse temperatures ``1 = β₀ > β₁ > … > β_{K−1} = 0`` on
the geometric path between a tractable base ``q`` (a ``GaussianBase``) and the model:

    π_β(x) ∝ q(x)^{1−β} exp(−β E(x)) = q(x) exp(β ℓ(x)),   ℓ(x) = −E(x) − log q(x).

Slot 0 is the model, slot ``K − 1`` is the base itself, which is sampled exactly (a fresh draw
of ``q`` every round), so states that reach the bottom of the ladder are independent of where
the chains have been. Each round moves every other slot by one transition of a BlackJAX kernel
(each slot with its own step size), then proposes swaps between neighbours: the even pairs
``(0, 1), (2, 3), …`` in even rounds and the odd pairs in odd rounds (deterministic even/odd
swaps, "non-reversible parallel tempering", Syed, Bouchard-Côté, Deligiannidis & Doucet 2021,
JRSSB). A swap of slots ``i, i+1`` is accepted with probability
``min(1, exp((β_i − β_{i+1}) (ℓ(x_{i+1}) − ℓ(x_i))))``. Every pair's acceptance probability is
recorded in every round (also the pairs not proposed), which estimates the rejection rates
``r_i`` with less noise.

``adapt_ladder`` places the temperatures so that all ``r_i`` are equal (the same paper's
schedule): ``Λ(β) = Σ`` of the rejection rates below ``β`` estimates the *communication
barrier*, and the new ``β``s split ``Λ = Λ(1)`` into equal parts. ``Λ`` measures how hard the
model is to reach from the base: with ``K`` replicas at equal rejection ``r = Λ/(K−1)`` a
replica's round-trip rate is ``1/(2 + 2Λ/(1 − r))``, and the cost per round trip is smallest
near ``K − 1 = 2Λ`` (``suggested_replicas``).

BlackJAX's MALA, HMC and Barker states cache ``(position, logdensity, logdensity_grad)`` of
the density they move on. A replica that swaps moves to another temperature, so the cache must
be rebuilt for the new ``β``: each slot keeps ``ℓ`` and ``∇ℓ`` of its position (recovered from
the kernel's cache after each transition, ``ℓ = (log π_β − log q)/β``, exact up to rounding)
and the tempered cache is rebuilt from them, so a round costs one energy gradient per replica,
as plain MCMC does. Nothing in BlackJAX does parallel tempering over its kernels, hence this
module.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from numpyro_ebm import samplers
    >>> from numpyro_ebm.gaussian import fit_base
    >>> base = fit_base(jax.random.normal(jax.random.key(0), (500, 2)))
    >>> energy = lambda x, c: 0.5 * jnp.sum((x - 3.0) ** 2)
    >>> ladder = samplers.initial_ladder(4, step_size=0.3)
    >>> state = samplers.init_replicas(base, energy, jnp.zeros((8, 4, 2)))
    >>> state, ladder, info = samplers.run_rounds(
    ...     jax.random.key(1), samplers.mala(), base, energy, state, ladder, num_rounds=20)
    >>> state.position.shape, info.swap_acceptance.shape
    ((8, 4, 2), (20, 8, 3))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from numpyro_ebm.gaussian import GaussianBase
from numpyro_ebm.samplers.adaptation import STEP_SIZE_BOUNDS, step_size_bounds
from numpyro_ebm.samplers.chains import summarize
from numpyro_ebm.samplers.kernels import ChainInfo, Sampler
from numpyro_ebm.validation import check_positive

__all__ = [
    "Ladder",
    "ReplicaState",
    "RoundInfo",
    "TemperingSummary",
    "adapt_ladder",
    "adapt_step_sizes",
    "barrier",
    "init_replicas",
    "initial_ladder",
    "isotropic_base",
    "refresh",
    "reset_counters",
    "run_rounds",
    "sample_tempered",
    "suggested_replicas",
    "summary",
    "tempering_round",
    "warmup_ladder",
]

# Interior inverse temperatures stay in [MIN_BETA, 1 − MIN_BETA]: a slot with β → 0 would
# recover ℓ from its cache by dividing by β.
MIN_BETA = 1e-4


class Ladder(NamedTuple):
    """The temperatures and the step sizes of one ladder (shared by all ladders of a run).

    Attributes:
        betas: ``(K,)`` inverse temperatures, ``1 = betas[0] > … > betas[K−1] = 0``.
        step_sizes: ``(K − 1,)`` the kernel's step size at each slot but the base's.
    """

    betas: jax.Array
    step_sizes: jax.Array


class ReplicaState(NamedTuple):
    """Replicas of ``L`` independent ladders of ``K`` slots.

    Attributes:
        position: ``(L, K, D)`` flat position at each slot (slot 0: the model).
        log_ratio: ``(L, K)`` ``ℓ(x) = −E(x) − log q(x)`` at each position.
        log_ratio_grad: ``(L, K, D)`` ``∇ₓℓ``.
        label: ``(L, K)`` which replica is in each slot (the index process: swaps move
            labels along the ladder).
        visited_model: ``(L, K)`` by label: whether the replica reached slot 0 since it was
            last at the base.
        round_trips: ``(L, K)`` by label: base → model → base trips completed.
        rounds: ``()`` rounds run so far (its parity picks the pairs to swap).
    """

    position: jax.Array
    log_ratio: jax.Array
    log_ratio_grad: jax.Array
    label: jax.Array
    visited_model: jax.Array
    round_trips: jax.Array
    rounds: jax.Array


class RoundInfo(NamedTuple):
    """What one round reports (leading axes ``(L,)``; ``run_rounds`` stacks rounds in front).

    Attributes:
        acceptance_rate: ``(L, K − 1)`` the kernel's acceptance probability at each MCMC slot.
        swap_acceptance: ``(L, K − 1)`` ``min(1, exp(log α))`` of each adjacent pair, proposed
            or not (the rejection rates the ladder is tuned on are ``1 −`` its mean).
        swapped: ``(L, K − 1)`` whether the pair swapped this round.
        model: ``ChainInfo`` of ``(L,)`` arrays: the slot-0 (model) chain's step, after swaps
            (its ``logdensity`` is ``−E`` at the state slot 0 holds at the end of the round).
    """

    acceptance_rate: jax.Array
    swap_acceptance: jax.Array
    swapped: jax.Array
    model: ChainInfo


def initial_ladder(num_temperatures: int, step_size: float, dtype=jnp.float32) -> Ladder:
    """``num_temperatures`` slots with ``β_k = (1 − k/(K−1))²`` (denser near the base, where
    the geometric path changes fastest for a model sharper than the base) and one step size.

    Example:
        >>> initial_ladder(3, 0.1).betas.tolist()
        [1.0, 0.25, 0.0]
    """
    if not (isinstance(num_temperatures, int) and num_temperatures >= 2):
        raise ValueError(
            f"num_temperatures must be an integer >= 2 (the model and the base), "
            f"got {num_temperatures!r}"
        )
    check_positive("step_size", step_size)
    fraction = 1.0 - jnp.arange(num_temperatures, dtype=dtype) / (num_temperatures - 1)
    steps = jnp.full((num_temperatures - 1,), step_size, dtype)
    return Ladder(fraction**2, steps)


def _log_ratio_fn(base: GaussianBase, energy: Callable) -> Callable:
    """``(x, c) -> ℓ(x) = −E(x, c) − log q(x)`` for one flat event."""

    def log_ratio(x, condition):
        return -energy(x, condition) - base.log_prob(x[None])[0]

    return log_ratio


def _base_value_and_grad(base: GaussianBase, x):
    """``log q(x)`` and its gradient ``−L⁻ᵀ L⁻¹ (x − μ)`` in closed form."""
    white = base.inverse_scale_tril @ (x - base.mean)
    value = -0.5 * jnp.sum(white**2) - base.log_z
    return value, -(base.inverse_scale_tril.T @ white)


def init_replicas(
    base: GaussianBase, energy: Callable, positions: jax.Array, conditions=None
) -> ReplicaState:
    """Replicas at ``positions`` ``(L, K, D)``, with ``ℓ`` and ``∇ℓ`` evaluated there.

    ``energy(x, c)`` takes one flat event and the ladder's condition (``conditions`` ``(L,
    C)``, or None: ``c`` is then an empty vector). Call it again (``refresh``) whenever the
    energy's parameters change.
    """
    num_ladders, num_slots, _ = positions.shape
    labels = jnp.broadcast_to(jnp.arange(num_slots, dtype=jnp.int32), (num_ladders, num_slots))
    state = ReplicaState(
        positions,
        jnp.zeros(positions.shape[:2], positions.dtype),
        jnp.zeros_like(positions),
        labels,
        jnp.zeros((num_ladders, num_slots), bool),
        jnp.zeros((num_ladders, num_slots), jnp.int32),
        jnp.zeros((), jnp.int32),
    )
    return refresh(base, energy, state, conditions)


def refresh(base: GaussianBase, energy: Callable, state: ReplicaState, conditions=None):
    """``state`` with ``ℓ`` and ``∇ℓ`` evaluated afresh under ``energy`` (after an update of its
    parameters), everything else kept."""
    conditions = _conditions(state.position.shape[0], conditions)
    value_and_grad = jax.value_and_grad(_log_ratio_fn(base, energy))
    per_ladder = jax.vmap(value_and_grad, in_axes=(0, None))
    values, grads = jax.vmap(per_ladder)(state.position, conditions)
    return state._replace(log_ratio=values, log_ratio_grad=grads)


def _conditions(num_ladders: int, conditions):
    if conditions is None:
        return jnp.zeros((num_ladders, 0))
    return conditions


def tempering_round(
    key: jax.Array,
    sampler: Sampler,
    base: GaussianBase,
    energy: Callable,
    state: ReplicaState,
    ladder: Ladder,
    conditions=None,
) -> tuple[ReplicaState, RoundInfo]:
    """One round: one kernel transition at every slot but the base's, a fresh base draw at
    slot ``K − 1``, then the even or odd swaps (by ``state.rounds``' parity)."""
    num_ladders, num_slots, _ = state.position.shape
    conditions = _conditions(num_ladders, conditions)
    log_ratio = _log_ratio_fn(base, energy)
    k_move, k_base, k_swap = jax.random.split(key, 3)

    moved, model_info, acceptance = _move(
        k_move, sampler, base, log_ratio, state, ladder, conditions
    )
    fresh = base.sample(k_base, num_ladders)
    fresh_value, fresh_grad = jax.vmap(jax.value_and_grad(log_ratio))(fresh, conditions)
    position = jnp.concatenate([moved[0], fresh[:, None]], axis=1)
    value = jnp.concatenate([moved[1], fresh_value[:, None]], axis=1)
    grad = jnp.concatenate([moved[2], fresh_grad[:, None]], axis=1)

    betas = ladder.betas
    log_alpha = (betas[:-1] - betas[1:]) * (value[:, 1:] - value[:, :-1])
    # a NaN ratio (two replicas at −inf log-density) is a rejected swap, as uniform < NaN says
    swap_acceptance = jnp.nan_to_num(jnp.exp(jnp.minimum(log_alpha, 0.0)), nan=0.0)
    pairs = jnp.arange(num_slots - 1)
    proposed = (pairs % 2) == (state.rounds % 2)
    uniform = jax.random.uniform(k_swap, (num_ladders, num_slots - 1))
    swapped = proposed & (uniform < swap_acceptance)
    order = _swap_order(swapped)
    take = jax.vmap(lambda a, idx: a[idx])
    label = take(state.label, order)
    visited, trips = jax.vmap(_count_round_trips)(label, state.visited_model, state.round_trips)
    new = ReplicaState(
        take(position, order),
        take(value, order),
        take(grad, order),
        label,
        visited,
        trips,
        state.rounds + 1,
    )
    # slot 0's statistics describe the state it holds after the swaps: −E = ℓ + log q there;
    # a state swapped in has no Hamiltonian of this round
    model_info = model_info._replace(
        logdensity=new.log_ratio[:, 0] + base.log_prob(new.position[:, 0]),
        hamiltonian=jnp.where(swapped[:, 0], jnp.nan, model_info.hamiltonian),
    )
    return new, RoundInfo(acceptance, swap_acceptance, swapped, model_info)


def _move(key, sampler, base, log_ratio, state, ladder, conditions):
    """One kernel transition at slots ``0 .. K−2``: ``((position, ℓ, ∇ℓ), slot-0 ChainInfo,
    acceptance (L, K−1))``."""
    num_ladders, num_slots, _ = state.position.shape
    betas = ladder.betas[:-1]

    def one(k, x, value, grad, beta, step_size, condition):
        base_value, base_grad = _base_value_and_grad(base, x)

        def logdensity(z):
            return base.log_prob(z[None])[0] + beta * log_ratio(z, condition)

        template = jax.eval_shape(lambda z: sampler.init(z, logdensity), x)
        chain = type(template)(x, base_value + beta * value, base_grad + beta * grad)
        chain, info = sampler.step(k, chain, logdensity, step_size)
        new_base_value, new_base_grad = _base_value_and_grad(base, chain.position)
        # ℓ and ∇ℓ from the kernel's cache; a rejected move keeps the exact old values
        still = jnp.all(chain.position == x)
        new_value = jnp.where(still, value, (chain.logdensity - new_base_value) / beta)
        new_grad = jnp.where(still, grad, (chain.logdensity_grad - new_base_grad) / beta)
        return (chain.position, new_value, new_grad), info

    keys = jax.random.split(key, (num_ladders, num_slots - 1))
    per_slot = jax.vmap(one, in_axes=(0, 0, 0, 0, 0, 0, None))
    per_ladder = jax.vmap(per_slot, in_axes=(0, 0, 0, 0, None, None, 0))
    moved, info = per_ladder(
        keys,
        state.position[:, :-1],
        state.log_ratio[:, :-1],
        state.log_ratio_grad[:, :-1],
        betas,
        ladder.step_sizes,
        conditions,
    )
    model_info = jax.tree.map(lambda a: a[:, 0], info)
    return moved, model_info, info.acceptance_rate


def _swap_order(swapped: jax.Array) -> jax.Array:
    """``(L, K)`` gather indices that exchange slots ``i, i+1`` wherever ``swapped[:, i]`` (the
    swapped pairs are disjoint)."""
    num_ladders, num_pairs = swapped.shape
    none = jnp.zeros((num_ladders, 1), bool)
    up = jnp.concatenate([swapped, none], axis=1)  # slot i takes slot i+1's state
    down = jnp.concatenate([none, swapped], axis=1)  # slot i takes slot i−1's state
    slots = jnp.arange(num_pairs + 1)
    return jnp.where(up, slots + 1, jnp.where(down, slots - 1, slots))


def _count_round_trips(label, visited_model, round_trips):
    """One ladder's index process after a round: the replica now at slot 0 has reached the
    model; the one at the base completes a round trip if it reached the model since it last
    left the base."""
    at_model, at_base = label[0], label[-1]
    visited_model = visited_model.at[at_model].set(True)
    round_trips = round_trips.at[at_base].add(visited_model[at_base].astype(jnp.int32))
    return visited_model.at[at_base].set(False), round_trips


def run_rounds(
    key: jax.Array,
    sampler: Sampler,
    base: GaussianBase,
    energy: Callable,
    state: ReplicaState,
    ladder: Ladder,
    num_rounds: int,
    conditions=None,
    *,
    step_size_gain: float = 0.0,
    keep_model_positions: bool = False,
):
    """``num_rounds`` rounds (``lax.scan``) with fixed temperatures.

    Args:
        step_size_gain: when positive, each slot's step size is moved after every round by
            ``adapt_step_sizes`` with this gain (warm-up); 0 keeps them fixed.
        keep_model_positions: also return slot 0's position after every round.

    Returns:
        ``(state, ladder, info)``; ``info`` is ``RoundInfo`` with a leading ``(num_rounds,)``
        axis, or ``(info, positions)`` with ``keep_model_positions`` (``(num_rounds, L, D)``).
    """

    bounds = step_size_bounds(base.variance)  # once, not in every round

    def one(carry, k):
        replicas, current = carry
        new, info = tempering_round(k, sampler, base, energy, replicas, current, conditions)
        if step_size_gain:
            acceptance = jnp.mean(jnp.nan_to_num(info.acceptance_rate), axis=0)
            current = adapt_step_sizes(current, acceptance, sampler, step_size_gain, bounds)
        return (new, current), (info, new.position[:, 0] if keep_model_positions else None)

    keys = jax.random.split(key, num_rounds)
    (state, ladder), (info, positions) = jax.lax.scan(one, (state, ladder), keys)
    if keep_model_positions:
        return state, ladder, (info, positions)
    return state, ladder, info


def warmup_ladder(
    key: jax.Array,
    sampler: Sampler,
    base: GaussianBase,
    energy: Callable,
    state: ReplicaState,
    ladder: Ladder,
    num_rounds: int,
    conditions=None,
    *,
    adapt_temperatures: bool = True,
):
    """Burn in ladders: tune, then run ``num_rounds − num_rounds // 2`` rounds fixed.

    The first ``num_rounds // 2`` rounds run in blocks of 2, 4, 8, … rounds (Syed et al.'s
    doubling rounds): every round moves the step sizes (``adapt_step_sizes``, gain 0.2), and
    after each block the temperatures are set to the equal-rejection schedule of the block's
    swap acceptances (``adapt_ladder``). The remaining rounds keep the ladder fixed, so every
    later round is a kernel that leaves the tempered targets invariant.

    Returns:
        ``(state, ladder, swap_acceptance)``: the ladders after all rounds, the tuned ladder
        and the mean swap acceptance ``(K − 1,)`` of the fixed rounds (``barrier`` of it is
        the estimated ``Λ``; NaN without fixed rounds).
    """
    num_tuning = num_rounds // 2
    if num_tuning:
        key, k_tune = jax.random.split(key)
        state, ladder = _tune(
            k_tune, sampler, base, energy, state, ladder, num_tuning, conditions,
            adapt_temperatures,
        )  # fmt: skip
    num_fixed = num_rounds - num_tuning
    if num_fixed == 0:
        return state, ladder, jnp.full(ladder.step_sizes.shape, jnp.nan)
    state, ladder, info = run_rounds(
        key, sampler, base, energy, state, ladder, num_fixed, conditions
    )
    return state, ladder, jnp.mean(info.swap_acceptance, axis=(0, 1))


def _block_ends(num_rounds: int) -> jax.Array:
    """``(num_rounds,)`` True at the last round of each block of 2, 4, 8, … rounds."""
    ends, end, block = [], 0, 2
    while end < num_rounds:
        end = min(end + block, num_rounds)
        ends.append(end - 1)
        block *= 2
    return jnp.zeros(num_rounds, bool).at[jnp.array(ends)].set(True)


def _tune(key, sampler, base, energy, state, ladder, num_rounds, conditions, adapt_temperatures):
    """The tuning rounds of ``warmup_ladder``, one ``lax.scan`` (the blocks end where
    ``_block_ends`` says, so each block size does not compile a scan of its own)."""

    bounds = step_size_bounds(base.variance)

    def one(carry, inputs):
        replicas, current, total, count = carry
        k, block_end = inputs
        replicas, info = tempering_round(k, sampler, base, energy, replicas, current, conditions)
        acceptance = jnp.mean(jnp.nan_to_num(info.acceptance_rate), axis=0)
        current = adapt_step_sizes(current, acceptance, sampler, 0.2, bounds)
        total, count = total + jnp.mean(info.swap_acceptance, axis=0), count + 1
        if adapt_temperatures:
            retuned = adapt_ladder(current, total / count)
            current = current._replace(betas=jnp.where(block_end, retuned.betas, current.betas))
        total = jnp.where(block_end, jnp.zeros_like(total), total)
        count = jnp.where(block_end, 0, count)
        return (replicas, current, total, count), None

    zeros = jnp.zeros(ladder.step_sizes.shape, ladder.betas.dtype)
    inputs = (jax.random.split(key, num_rounds), _block_ends(num_rounds))
    (state, ladder, _, _), _ = jax.lax.scan(one, (state, ladder, zeros, 0), inputs)
    return state, ladder


def adapt_ladder(ladder: Ladder, swap_acceptance: jax.Array, gain: float = 1.0) -> Ladder:
    """The temperatures moved towards equal rejection rates (the step sizes unchanged).

    Args:
        ladder: the current ladder.
        swap_acceptance: ``(K − 1,)`` mean swap acceptance of each adjacent pair under it
            (NaN counts as a rejection, as for the step sizes).
        gain: 1 replaces the temperatures by the equal-rejection schedule; ``0 < gain < 1``
            moves them part of the way (training, where the model keeps changing). A number
            in ``(0, 1]``: larger values would overshoot the schedule.

    Returns:
        A ``Ladder`` with ``β₀ = 1`` and ``β_{K−1} = 0`` kept and the interior temperatures
        where ``Λ(β)`` (the piecewise-linear cumulative rejection) takes equal steps.
    """
    if check_positive("gain", gain) > 1.0:
        raise ValueError(f"gain must be in (0, 1], got {gain!r}")
    betas = ladder.betas
    num_slots = betas.shape[0]
    # from the base (β = 0) up: Λ(β) accumulates the rejection of the pairs below β;
    # a small floor keeps it strictly increasing for the interpolation
    rejection = jnp.clip(1.0 - jnp.nan_to_num(swap_acceptance[::-1], nan=0.0), 1e-6, 1.0)
    cumulative = jnp.concatenate([jnp.zeros(1, betas.dtype), jnp.cumsum(rejection)])
    levels = jnp.linspace(0.0, cumulative[-1], num_slots)
    target = jnp.interp(levels, cumulative, betas[::-1])[::-1]
    moved = betas + gain * (target - betas)
    interior = jnp.clip(moved[1:-1], MIN_BETA, 1.0 - MIN_BETA)
    return ladder._replace(betas=jnp.concatenate([betas[:1], interior, betas[-1:]]))


def adapt_step_sizes(
    ladder: Ladder, acceptance: jax.Array, sampler: Sampler, gain: float, bounds=STEP_SIZE_BOUNDS
):
    """Each slot's step size moved by Robbins-Monro towards ``sampler.target`` from its mean
    acceptance ``(K − 1,)`` (``samplers.adapt_step_size`` per slot), clipped to ``bounds``
    (``samplers.step_size_bounds`` of the base; default: unit scale)."""
    if not sampler.adapts:
        return ladder
    log_h = jnp.log(ladder.step_sizes) + gain * (acceptance - sampler.target)
    steps = jnp.clip(jnp.exp(log_h), *bounds).astype(ladder.step_sizes.dtype)
    return ladder._replace(step_sizes=steps)


def barrier(swap_acceptance: jax.Array) -> jax.Array:
    """The communication barrier ``Λ = Σ_i r_i`` from ``(…, K − 1)`` pair acceptances."""
    return jnp.sum(1.0 - swap_acceptance, axis=-1)


def suggested_replicas(barrier_value: float) -> int:
    """``⌈2Λ⌉ + 1``: the number of temperatures with the least computation per round trip (at
    equal rejection ``r = Λ/(K − 1)`` the cost per round trip ``∝ K (1 + Λ/(1 − r))`` is least
    near ``K − 1 = 2Λ`` when ``Λ`` is large); at least 2."""
    return max(2, math.ceil(2.0 * float(barrier_value)) + 1)


class TemperingSummary(NamedTuple):
    """What parallel tempering reports about a sampling run, for diagnostics.

    Attributes:
        betas: ``(K,)`` the inverse temperatures used (after warm-up tuning).
        swap_acceptance: ``(K − 1,)`` mean swap acceptance of each adjacent pair.
        round_trips: ``(L, K)`` base → model → base trips of each replica (by label) while
            the draws were recorded.
        barrier: ``()`` the estimated communication barrier ``Λ`` (``barrier``).
        rounds: ``()`` rounds over which ``round_trips`` were counted.
    """

    betas: jax.Array
    swap_acceptance: jax.Array
    round_trips: jax.Array
    barrier: jax.Array
    rounds: jax.Array


def summary(ladder: Ladder, state: ReplicaState, swap_acceptance: jax.Array) -> TemperingSummary:
    """``TemperingSummary`` of ``state`` (round trips counted since its counters were reset)."""
    return TemperingSummary(
        ladder.betas, swap_acceptance, state.round_trips, barrier(swap_acceptance), state.rounds
    )


def reset_counters(state: ReplicaState) -> ReplicaState:
    """``state`` with the round-trip counters and the round count at zero."""
    return state._replace(
        visited_model=jnp.zeros_like(state.visited_model),
        round_trips=jnp.zeros_like(state.round_trips),
        rounds=jnp.zeros_like(state.rounds),
    )


def isotropic_base(dim: int, scale: float, dtype=jnp.float32) -> GaussianBase:
    """``N(0, scale² I)`` over flat events of size ``dim``."""
    eye = jnp.eye(dim, dtype=dtype)
    return GaussianBase(jnp.zeros(dim, dtype), scale * eye, eye / scale)


def sample_tempered(
    key: jax.Array,
    sampler: Sampler,
    logdensity_fn: Callable,
    positions: jax.Array,
    num_draws: int,
    *,
    num_temperatures: int,
    thinning: int,
    num_warmup: int,
    base: GaussianBase,
):
    """Draws of slot 0 of ``L`` ladders started at ``positions`` ``(L, D)`` (every slot there).

    ``num_warmup`` rounds of ``warmup_ladder``, then ``num_draws · thinning`` rounds with the
    tuned ladder, recording slot 0 every ``thinning`` rounds.

    Returns:
        ``(positions (L, num_draws, D), ChainInfo of (L, num_draws), step size of slot 0,
        TemperingSummary)``.
    """
    num_ladders, dim = positions.shape
    energy = lambda x, c: -logdensity_fn(x)
    ladder = initial_ladder(num_temperatures, sampler.step_size, positions.dtype)
    starts = jnp.broadcast_to(positions[:, None], (num_ladders, num_temperatures, dim))
    state = init_replicas(base, energy, starts)
    k_warm, k_draw = jax.random.split(key)
    state, ladder, _ = warmup_ladder(k_warm, sampler, base, energy, state, ladder, num_warmup)
    num_rounds = num_draws * thinning
    state, ladder, (info, recorded) = run_rounds(
        k_draw, sampler, base, energy, reset_counters(state), ladder, num_rounds,
        keep_model_positions=True,
    )  # fmt: skip
    kept = recorded[thinning - 1 :: thinning]  # (num_draws, L, D)

    def per_draw(a):  # (rounds, L) -> (thinning, num_draws, L)
        return jnp.swapaxes(a.reshape(num_draws, thinning, *a.shape[1:]), 0, 1)

    chain_info = summarize(jax.tree.map(per_draw, info.model))
    swap_acceptance = jnp.mean(info.swap_acceptance, axis=(0, 1))
    return (
        jnp.swapaxes(kept, 0, 1),
        jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), chain_info),
        ladder.step_sizes[0],
        summary(ladder, state, swap_acceptance),
    )
