"""``log Z`` tracked through training: sequential Monte Carlo along the trained energies.

Training produces a sequence of energies ``E₀, E₁, …`` (one per update). The tracker carries its
own weighted particles along that sequence and, after every update ``Eₜ → Eₜ₊₁``,

1. reweights them by ``exp(Eₜ(x) − Eₜ₊₁(x))``: the weighted mean of this ratio estimates
   ``Zₜ₊₁ / Zₜ`` (``log Zₜ₊₁ − log Zₜ = log E_{pₜ}[exp(Eₜ − Eₜ₊₁)]``);
2. resamples a group whose effective sample size fell below ``resample_ess``;
3. moves them by a Metropolis kernel that leaves ``exp(−Eₜ₊₁)`` invariant.

This is annealed importance sampling, or SMC with resampling, whose path is the training
trajectory (Neal 2001; Desjardins, Courville & Bengio 2011; Béreux et al. 2024). Given the
trajectory, each group's ``Ẑ`` is an unbiased estimate of ``Z`` whatever the kernel's mixing
(poor mixing costs variance, not bias): there is no drift to correct. The groups are
independent SMC runs; the estimate is the log of the mean of their ``Ẑ`` and its standard error
the delta-method error over groups, as ``logz.ais`` does over runs.

**Large updates.** When one reweighting would leave a group with a conditional effective sample
size (Zhou, Johansen & Aston 2016) below ``target_ess``, the update is bridged: the geometric
path ``(1 − s) Eₜ + s Eₜ₊₁`` is walked in sub-steps chosen by bisection to keep it at
``target_ess``, with a move at each sub-step (at most ``max_bridge_steps``; the last one goes
to ``s = 1`` whatever its ESS, and ``TrackInfo.min_ess`` reports it).

**Start.** The same bridge from the normalised base ``q`` (``log Z_q = 0``: the Gaussian fitted
to the data) to ``E₀``, with ``start_moves`` moves per sub-step: AIS once, at initialisation.

**Re-anchoring.** At updates ``first_anchor``, twice that, and so on, the tracker restarts
from the base at the current energy (the start's bridge, with ``num_particles``). The fresh
estimate is fused with the carried one by inverse variances when the two agree within
``FUSE_SIGMAS`` combined standard errors; when they do not, the larger one goes on alone (the
smaller one missed mass, which its error bar cannot show: ``_fuse``).

**Floor.** After every ``floor_every``-th update, ``floor`` raises the estimate to a lower
confidence bound from importance sampling around the training rows (``logz.bound``) when it
lies below it: wells the energy grows at its training rows hold mass no particle reaches,
which neither the groups' spread nor a re-anchor shows (breast cancer, 30-D: 60 nats by step
1300). The bound is below ``log Z`` with probability ≥ 95% (Markov); a raised estimate is a
lower bound when raised, and its standard error does not cover it. The increments cannot see
the wells go, so a raise is released with a half-life of ``floor_half_life`` updates unless a
later bound raises it again. Where the same importance estimate is good (its running ESS at
least ``fuse_ess`` of the draws: low dimension), ``floor`` also fuses it with the tracked value
by a Kalman update on ``Z`` (2-D toys: the error bar from about 0.03 nats to 0.003).

**Why its own particles.** The negative phase's chains are not a valid SMC system for this:
they follow the iterate (the model returned is the average), shape the update they would
weight, and most negative samplers restart them every step.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from numpyro_ebm.gaussian import fit_base
    >>> from numpyro_ebm.logz import tracking
    >>> base = fit_base(jax.random.normal(jax.random.key(0), (1000, 2)))
    >>> settings = tracking.TrackerSettings(num_particles=256, num_groups=4)
    >>> def gaussian(scale):   # log-density of exp(−‖x‖² / (2 scale²)), log Z = 2 log(√(2π) scale)
    ...     return lambda x: -0.5 * jnp.sum(x**2) / scale**2
    >>> state, info = tracking.start(jax.random.key(1), base, gaussian(1.0), settings)
    >>> state, info = tracking.advance(
    ...     jax.random.key(2), state, gaussian(1.0), gaussian(1.2), settings, base)
    >>> exact = 2 * jnp.log(jnp.sqrt(2 * jnp.pi) * 1.2)
    >>> bool(abs(info.log_z - exact) < 4 * info.stderr + 0.01)
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from numpyro_ebm.logz.bound import floor
from numpyro_ebm.logz.particles import (
    FUSE_SIGMAS,
    conditional_ess,
    largest_fraction,
    over_groups,
    respread,
    reweight,
    reweight_and_resample,
    systematic,
)
from numpyro_ebm.samplers import Sampler, adapt_step_size_multiplicative, get_sampler, run_chains
from numpyro_ebm.samplers.adaptation import step_size_bounds

__all__ = ["TrackInfo", "TrackerSettings", "TrackerState", "advance", "estimate", "floor", "start"]


class TrackerSettings(NamedTuple):
    """How the tracker runs (hashable: part of the static training configuration).

    Attributes:
        num_particles: particles in all (``num_groups`` groups of equal size).
        num_groups: independent SMC runs; their spread gives the standard error (≥ 2).
        max_bridge_steps: most sub-steps per training update (1: never bridge).
        target_ess: conditional ESS (a fraction) each bridging sub-step keeps; an update
            whose one reweighting keeps it is not bridged (digits after step 300: 1.03 to
            1.08 sub-steps per update at 0.9, about 3 at 0.99; docs/benchmarks.md).
        resample_ess: a group is resampled (systematic) when its ESS fraction falls below this.
        num_moves: kernel moves per training update.
        bridge_moves: kernel moves at each intermediate sub-step of a bridged update (the
            particles must follow a large change).
        start_bridge_steps: most sub-steps of the start (base → initial energy).
        start_ess: the conditional ESS each sub-step of the start keeps (higher than
            ``target_ess``: the start is the one long bridge, and its moves must spread the
            particles from the base to the initial energy).
        start_moves: kernel moves per sub-step of the start.
        start_factor: the start runs with this many times more particles per group, then
            resamples each group down (the start's error is most of the tracker's: this
            divides its variance by about ``start_factor``).
        lost_ess: an update whose last sub-step leaves a conditional ESS below this loses the
            track: its weights are degenerate, and the estimate would be far lower than
            ``log Z`` with an error bar that does not show it. The tracker then reports NaN
            (standard error inf) until it restarts.
        restart_after: updates after a loss at which the tracker restarts from the base at
            the current energy (``start``); training early on can change the energy faster
            than any bridge follows, and this bounds the cost of waiting it out.
        first_anchor: the update at which the tracker first re-anchors: restarts from the
            base at the energy of that moment, as after a loss; then at twice as many updates
            since the start, and so on (100, 200, 400, ...; 0: never). Particles carried
            through the collapse of early training miss mass the model builds where they
            never were (digits: 15 nats by update 100), which a fresh start covers. Agreeing
            estimates are fused, else the larger is kept (late re-anchors' short AIS misses
            mass: digits 1.3 nats at update 1600).
        floor_samples: importance draws around the training rows for ``floor`` (0: none).
        floor_every: ``floor`` runs at every ``floor_every``-th update only: cheaper on a CPU,
            with fewer catches and fused estimates (8gaussians: error bar 0.0037 → 0.0066 at
            4; docs/benchmarks.md).
        floor_half_life: updates over which half of what ``floor`` raised the estimate by is
            released, unless a later bound raises it again (0: never released). Wells at the
            training rows come and go during training; the increments cannot see them go, so
            a raise kept for good holds the estimate above ``log Z`` after they have gone.
        fuse_ess: the floor's importance estimate of ``log Z`` is fused with the tracked one
            (a Kalman update, ``logz.bound.floor``) while the running mean of its ESS is at
            least this fraction of its ``floor_samples`` draws (None: never). Where the
            data-centred proposal fits the model (low dimension) this is a second estimate
            each floor, independent of the particles: the increments carry the estimate,
            the importance estimates correct it. In more dimensions the ESS is a few draws
            and nothing is fused.
        sampler: the kernel (with a Metropolis step); its ``step_size`` is the first one, then
            tuned toward its target acceptance after every move (inside
            ``samplers.step_size_bounds`` of the base).
    """

    num_particles: int = 512
    num_groups: int = 8
    max_bridge_steps: int = 32
    target_ess: float = 0.9
    resample_ess: float = 0.5
    num_moves: int = 1
    bridge_moves: int = 10
    start_bridge_steps: int = 1000
    start_ess: float = 0.9
    start_moves: int = 10
    start_factor: int = 8
    lost_ess: float = 0.5
    restart_after: int = 100
    first_anchor: int = 100
    floor_samples: int = 1024
    floor_every: int = 1
    floor_half_life: int = 5
    fuse_ess: float | None = 0.2
    sampler: Sampler = get_sampler("mala")

    def check(self) -> TrackerSettings:
        """The settings, or a ``ValueError`` naming the bad one."""
        if self.num_groups < 2 or self.num_particles % self.num_groups:
            raise ValueError(
                f"the log Z tracker needs num_groups >= 2 dividing num_particles, got "
                f"{self.num_particles} particles in {self.num_groups} groups"
            )
        if self.num_particles // self.num_groups < 2:
            raise ValueError("the log Z tracker needs at least 2 particles per group")
        counts = ("max_bridge_steps", "num_moves", "bridge_moves", "start_bridge_steps")
        counts = (*counts, "start_moves")
        for name in ("first_anchor", "floor_samples", "floor_half_life"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in (*counts, "start_factor", "restart_after", "floor_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("target_ess", "resample_ess", "start_ess", "lost_ess"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        fuse = self.fuse_ess
        if fuse is not None and not (
            isinstance(fuse, int | float) and not isinstance(fuse, bool) and 0.0 < fuse <= 1.0
        ):
            raise ValueError(f"fuse_ess must be None or in (0, 1], got {self.fuse_ess}")
        if self.sampler.target is None:
            raise ValueError(
                f"the log Z tracker needs a kernel with a Metropolis step, got "
                f"{self.sampler.kernel!r}"
            )
        return self


class TrackerState(NamedTuple):
    """The tracker's particles (a pytree; checkpointed with the training state).

    Attributes:
        position: ``(N, D)`` particles (flat events).
        logdensity: ``(N,)`` the tracked log-density ``−E(x)`` at them (cached by the last move).
        log_weight: ``(G, N/G)`` unnormalised log-weights within each group.
        group_log_z: ``(G,)`` each group's running ``log Ẑ``.
        step_size: the kernel's step size.
        updates_lost: 0 while on track; else how many updates ago the track was lost
            (``TrackerSettings.lost_ess``).
        updates: updates since the start (``start`` sets 0).
        next_anchor: the update at which the tracker re-anchors next (0: never).
        raised: nats ``floor`` has added to ``group_log_z`` and not yet released (0 after a
            start or restart).
        importance_variance: running mean over updates of the relative variance (squared
            standard error) of ``floor``'s importance estimate; the measurement noise of its
            fusion.
        importance_ess: running mean of its ESS fraction, the gate of its fusion; −1 before
            the first estimate (the state must stay finite: the training step rejects
            non-finite ones).
    """

    position: jax.Array
    logdensity: jax.Array
    log_weight: jax.Array
    group_log_z: jax.Array
    step_size: jax.Array
    updates_lost: jax.Array
    updates: jax.Array
    next_anchor: jax.Array
    raised: jax.Array
    importance_variance: jax.Array
    importance_ess: jax.Array


class TrackInfo(NamedTuple):
    """What one ``start`` or ``advance`` reports (scalars).

    Attributes:
        log_z: the estimate after it (``estimate``).
        stderr: its standard error.
        min_ess: the lowest conditional ESS fraction of its reweightings (below
            ``target_ess`` only when the sub-steps ran out).
        bridge_steps: sub-steps it took (1: the update needed no bridge).
        acceptance: mean acceptance of its last moves.
    """

    log_z: jax.Array
    stderr: jax.Array
    min_ess: jax.Array
    bridge_steps: jax.Array
    acceptance: jax.Array


@eqx.filter_jit
def estimate(state: TrackerState) -> tuple[jax.Array, jax.Array]:
    """``(log Ẑ, standard error)``: the log of the mean of the groups' ``Ẑ`` and the
    delta-method error ``std(Ẑ_g) / (√G mean(Ẑ_g))`` over the groups; ``(NaN, inf)`` while
    the track is lost."""
    value, stderr = over_groups(state.group_log_z)
    lost = state.updates_lost > 0
    return jnp.where(lost, jnp.nan, value), jnp.where(lost, jnp.inf, stderr)


def _fuse(carried: TrackerState, fresh: TrackerState, logdensity: jax.Array) -> TrackerState:
    """A re-anchor's outcome: ``fresh`` (AIS from the base to the new energy) against the
    ``carried`` track (of the previous energy, carried through the update by one reweighting,
    without a move; ``logdensity``: the new log-density at its particles).

    When the two estimates agree within ``FUSE_SIGMAS`` combined standard errors, ``fresh``
    with its groups shifted to their inverse-variance combination. The error bar stays the
    fresh one's, not ``√(v_c v_f / (v_c + v_f))``: the two are AIS-type estimates that miss
    the same hard-to-reach mass, which neither spread shows (measured over 20 seeds of a 32-D
    ``SeparableEnergy``: the shrunk error bar covered 85% of the errors within 3 standard
    errors, this one 90%, with the same RMS error). When they disagree, the one with the
    larger estimate goes on alone: each group's ``Ẑ`` is unbiased, so ``log Ẑ`` exceeds
    ``log Z`` by ``t`` nats with probability at most ``e⁻ᵗ`` (Markov), while mass the particles
    never reached makes it fall short by any amount, with an error bar that does not show it
    (early in training the carried track misses mass; late, a re-anchor's short AIS does).
    A carried estimate kept over a smaller fresh one may instead be an upward fluke (measured:
    +0.37 nats at 3.5 standard errors, one seed in 20 of a 32-D ``GaussianEnergy``), so its
    groups are spread until its standard error is about ``√(v_c + (gap / 2)²)``."""
    shape = carried.log_weight.shape
    log_weight, groups = reweight(
        carried.log_weight,
        carried.group_log_z,
        jnp.reshape(logdensity - carried.logdensity, shape),
    )
    value_c, stderr_c = over_groups(groups)
    value_f, stderr_f = over_groups(fresh.group_log_z)
    var_c, var_f = stderr_c**2, stderr_f**2
    gap = jnp.abs(value_c - value_f)
    usable = jnp.isfinite(value_c) & jnp.isfinite(var_c)
    agree = gap <= FUSE_SIGMAS * jnp.sqrt(var_c + var_f)
    fuse = usable & agree & (var_c + var_f > 0)
    keep_carried = usable & ~agree & (value_c > value_f)
    total = jnp.where(fuse, var_c + var_f, 1.0)
    combined = (var_f * value_c + var_c * value_f) / total
    shifted = fresh.group_log_z + combined - value_f
    fused = fresh._replace(group_log_z=jnp.where(fuse, shifted, fresh.group_log_z))
    # kept over a smaller fresh estimate, the carried one may be the outlier (an upward fluke):
    # its groups are spread until the error bar is about √(v_c + (gap / 2)²)
    widened = respread(
        groups, value_c, jnp.sqrt(1.0 + (0.5 * gap / jnp.maximum(stderr_c, 1e-6)) ** 2)
    )
    advanced = carried._replace(
        logdensity=logdensity.astype(carried.logdensity.dtype),
        log_weight=log_weight.astype(carried.log_weight.dtype),
        group_log_z=widened.astype(carried.group_log_z.dtype),
    )
    return jax.tree.map(lambda a, b: jnp.where(keep_carried, a, b), advanced, fused)


def start(
    key: jax.Array, base, logdensity: Callable, settings: TrackerSettings
) -> tuple[TrackerState, TrackInfo]:
    """Particles for the energy at initialisation: base draws carried by the bridge from the
    normalised ``base`` (a ``gaussian.GaussianBase``) to ``logdensity`` (``−E₀`` of one flat
    event).

    Returns:
        ``(state, info)``; ``info.log_z`` is the estimate of ``log Z₀``.
    """
    settings = settings.check()
    k_draw, k_bridge, k_thin = jax.random.split(key, 3)
    group_size = settings.num_particles // settings.num_groups
    position = base.sample(k_draw, settings.num_particles * settings.start_factor)
    state = TrackerState(
        position,
        base.log_prob(position),
        jnp.zeros((settings.num_groups, group_size * settings.start_factor), position.dtype),
        jnp.zeros((settings.num_groups,), position.dtype),
        jnp.asarray(settings.sampler.step_size, position.dtype),
        jnp.zeros((), jnp.int32),
        jnp.zeros((), jnp.int32),
        jnp.asarray(settings.first_anchor, jnp.int32),
        jnp.zeros((), position.dtype),
        jnp.zeros((), position.dtype),
        jnp.full((), -1.0, position.dtype),
    )
    state, info = _bridge(
        jax.random.split(k_bridge),
        state,
        base.log_prob,
        logdensity,
        settings,
        settings.start_bridge_steps,
        settings.start_moves,
        settings.start_ess,
        moves_last=True,
        bounds=step_size_bounds(base.variance),
    )
    # each group resampled down to its size: still an unbiased SMC step
    keys = jax.random.split(k_thin, settings.num_groups)
    local = jax.vmap(lambda k, lw: systematic(k, jax.nn.softmax(lw), group_size))(
        keys, state.log_weight
    )
    index = local + group_size * settings.start_factor * jnp.arange(settings.num_groups)[:, None]
    index = index.reshape(-1)
    thinned = state._replace(
        position=state.position[index],
        logdensity=state.logdensity[index],
        log_weight=jnp.zeros((settings.num_groups, group_size), position.dtype),
    )
    return thinned, info


def advance(
    key: jax.Array,
    state: TrackerState,
    old_logdensity: Callable,
    new_logdensity: Callable,
    settings: TrackerSettings,
    base,
) -> tuple[TrackerState, TrackInfo]:
    """Carry the particles from ``old_logdensity`` (the one ``state`` tracks, ``−Eₜ``) to
    ``new_logdensity`` (``−Eₜ₊₁``): reweight, resample where needed, move; bridged when the
    update is large. ``1 + num_moves`` gradients per particle when no bridge is needed (the
    first, at the particles, both reweights them and starts their moves).

    An update the bridge cannot follow (its last sub-step's ESS below ``lost_ess``) loses
    the track; ``restart_after`` updates later the tracker restarts from ``base`` (the
    normalised base of ``start``) at the energy of that moment, with the start's ESS and
    sub-steps but ``num_particles`` particles and ``num_moves`` final moves.
    """

    updates = state.updates + 1
    anchor = (state.next_anchor > 0) & (updates == state.next_anchor)
    restart = (state.updates_lost >= settings.restart_after) | anchor
    waiting = (state.updates_lost > 0) & ~restart
    k_draw, k_bridge = jax.random.split(key)
    k_loop, k_final = jax.random.split(k_bridge)
    dtype = state.position.dtype
    value_and_grad = jax.vmap(jax.value_and_grad(new_logdensity))
    new_at, new_grad = value_and_grad(state.position)
    difference = jnp.reshape(new_at - state.logdensity, state.log_weight.shape)
    one_step_ess = jnp.min(conditional_ess(state.log_weight, difference))

    # Each branch returns (position, log_weight, group_log_z, step_size, min_ess, sub-steps,
    # (−Eₜ₊₁, its gradient) at position) before the final moves, which all three share.
    def single(_):
        # most updates: on track, one reweighting keeps target_ess (the bridge's one sub-step)
        index, log_weight, group_log_z = reweight_and_resample(
            jax.random.split(k_loop, 3)[1],
            state.log_weight,
            state.group_log_z,
            difference,
            settings.resample_ess,
        )
        min_ess = jnp.minimum(jnp.ones((), dtype), one_step_ess).astype(dtype)
        one = jnp.ones((), jnp.int32)
        cached = new_at[index], new_grad[index]
        return state.position[index], log_weight, group_log_z, state.step_size, min_ess, one, cached

    def follow(_):
        # a large update, or a restart: the same bridge from fresh base draws
        bridged = _bridge_or_restart(
            k_draw, k_loop, state, restart, old_logdensity, new_logdensity, settings, base
        )
        return *bridged, value_and_grad(bridged[0])

    def wait(_):
        nan = jnp.full((), jnp.nan, dtype)
        return (
            state.position, state.log_weight, state.group_log_z, state.step_size, nan,
            jnp.zeros((), jnp.int32), (new_at, new_grad),
        )  # fmt: skip

    # one branch per update (on a GPU each waits for its predicate on the host: the five of
    # the general path cost 0.9 ms per update on an H200 whatever the energy)
    simple = (state.updates_lost == 0) & ~restart & (one_step_ess >= settings.target_ess)
    branch = jnp.where(simple, 0, jnp.where(waiting, 2, 1))
    position, log_weight, group_log_z, step, min_ess, count, cached = jax.lax.switch(
        branch, (single, follow, wait), None
    )
    position, logdensity, step, acceptance = _moves(
        k_final, position, new_logdensity, step, settings.sampler, settings.num_moves,
        step_size_bounds(base.variance), cached,
    )  # fmt: skip
    moved = state._replace(
        position=position,
        logdensity=logdensity.astype(state.logdensity.dtype),
        log_weight=log_weight,
        group_log_z=group_log_z,
        step_size=step,
        updates_lost=(min_ess < settings.lost_ess).astype(jnp.int32),
        raised=jnp.where(restart, 0.0, state.raised).astype(state.raised.dtype),
    )
    waited = state._replace(updates_lost=state.updates_lost + 1)
    new = jax.tree.map(lambda a, b: jnp.where(waiting, a, b), waited, moved)
    # a re-anchor of a track that was not lost: the fresh estimate against the carried one
    # (cheap, new_at is the new energy at the carried particles: a select, not a branch)
    fused = _fuse(state, new, new_at)
    new = jax.tree.map(lambda a, b: jnp.where(anchor & (state.updates_lost == 0), a, b), fused, new)
    new = new._replace(
        updates=updates, next_anchor=jnp.where(anchor, 2 * updates, state.next_anchor)
    )
    value, stderr = estimate(new)
    acceptance = jnp.where(waiting, jnp.nan, acceptance).astype(dtype)
    return new, TrackInfo(value, stderr, min_ess, count, acceptance)


def _bridge_or_restart(k_draw, k_loop, state, restart, old_logdensity, new_logdensity,
                       settings, base):  # fmt: skip
    """``advance``'s bridge without its final moves, from ``state`` or, when ``restart``,
    from fresh ``base`` draws (one compiled bridge for both): ``(position, log_weight,
    group_log_z, step_size, min_ess, sub-steps)``."""
    dtype = state.position.dtype
    position = base.sample(k_draw, state.position.shape[0]).astype(dtype)
    fresh = state._replace(
        position=position,
        logdensity=base.log_prob(position),
        log_weight=jnp.zeros_like(state.log_weight),
        group_log_z=jnp.zeros_like(state.group_log_z),
    )
    source = jax.tree.map(lambda a, b: jnp.where(restart, a, b), fresh, state)

    def old(x):
        return jnp.where(restart, base.log_prob(x), old_logdensity(x))

    bridged, info = _bridge(
        (k_loop, None),
        source,
        old,
        new_logdensity,
        settings,
        jnp.where(restart, settings.start_bridge_steps, settings.max_bridge_steps),
        settings.bridge_moves,
        jnp.where(restart, settings.start_ess, settings.target_ess),
        moves_last=False,
        bounds=step_size_bounds(base.variance),
    )
    return (
        bridged.position, bridged.log_weight, bridged.group_log_z, bridged.step_size,
        info.min_ess, info.bridge_steps,
    )  # fmt: skip


def _moves(key, position, logdensity, step_size, sampler, num_moves, bounds, cached=None):
    """``num_moves`` kernel moves of every particle under ``logdensity``: new positions, the
    log-density there, the step size tuned within ``bounds`` and the mean acceptance.
    ``cached``: the log-density and its gradient at ``position``, when the caller has them."""
    if cached is None:
        states = sampler.init_chains(position, logdensity)
    else:
        states = sampler.chains_from(position, *cached)
    states, trace, _ = run_chains(key, sampler, logdensity, states, step_size, num_moves)
    acceptance = jnp.mean(jnp.nan_to_num(trace.acceptance_rate, nan=0.0))
    new_step = adapt_step_size_multiplicative(step_size, acceptance, sampler.target, 2.0, bounds)
    return states.position, states.logdensity, new_step.astype(step_size.dtype), acceptance


def _bridge(keys, state, old_logdensity, new_logdensity, settings, max_steps, moves, target_ess,
            *, moves_last: bool, bounds):  # fmt: skip
    """Reweight/resample/move from ``old_logdensity`` (cached in ``state.logdensity``) to
    ``new_logdensity`` in at most ``max_steps`` sub-steps keeping the conditional ESS at
    ``target_ess``, with ``moves`` kernel moves after each sub-step but the last. After the
    last, ``moves`` more under ``new_logdensity`` when ``moves_last`` (the start); else the
    caller makes its own (``advance``: one compiled kernel for all its paths). ``keys``: the
    sub-steps' key and the last moves' (None without ``moves_last``)."""
    sampler = settings.sampler
    old_all = jax.vmap(old_logdensity)
    new_all = jax.vmap(new_logdensity)
    shape = state.log_weight.shape
    dtype = state.position.dtype
    k_bridge, k_final = keys

    def body(carry):
        s, count, key, position, old, new, log_weight, group_log_z, step, min_ess, acc = carry
        key, k_resample, k_move = jax.random.split(key, 3)
        difference = jnp.reshape(new - old, shape)
        remaining = 1.0 - s
        last = count + 1 >= max_steps
        fraction = largest_fraction(log_weight, difference, remaining, target_ess)
        delta = jnp.where(last, remaining, fraction)
        min_ess = jnp.minimum(min_ess, jnp.min(conditional_ess(log_weight, delta * difference)))
        index, log_weight, group_log_z = reweight_and_resample(
            k_resample, log_weight, group_log_z, delta * difference, settings.resample_ess
        )
        position, old, new = position[index], old[index], new[index]
        s = jnp.where(last | (delta >= remaining), 1.0, s + delta).astype(dtype)
        final = ~(s < 1.0)  # the last sub-step

        def between(x):
            return (1.0 - s) * old_logdensity(x) + s * new_logdensity(x)

        def bridge_move(args):
            position, _, _, step, acc = args
            position, _, step, acc = _moves(k_move, position, between, step, sampler, moves, bounds)
            return position, old_all(position), new_all(position), step, acc

        def target(x):  # the last sub-step's moves: under new_logdensity alone
            parts = new_logdensity, between
            dtype = jnp.result_type(*(jax.eval_shape(f, x).dtype for f in parts))
            return jax.lax.cond(final, *(lambda x, f=f: f(x).astype(dtype) for f in parts), x)

        if moves_last:  # the last sub-step's moves are the loop's: one compiled kernel
            key_moves = jnp.where(final, k_final, k_move)
            position, moved, step, acc = _moves(
                key_moves, position, target, step, sampler, moves, bounds
            )
            old, new = jax.lax.cond(
                final,
                lambda p: (old, moved.astype(new.dtype)),
                lambda p: (old_all(p), new_all(p)),
                position,
            )
        else:
            position, old, new, step, acc = jax.lax.cond(
                s < 1.0, bridge_move, lambda args: args, (position, old, new, step, acc)
            )
        return s, count + 1, key, position, old, new, log_weight, group_log_z, step, min_ess, acc

    def unfinished(carry):
        return carry[0] < 1.0

    zero = jnp.zeros((), dtype)
    carry = (
        zero,
        jnp.zeros((), jnp.int32),
        k_bridge,
        state.position,
        state.logdensity,
        new_all(state.position),
        state.log_weight,
        state.group_log_z,
        state.step_size,
        jnp.ones((), dtype),
        zero,
    )
    carry = jax.lax.while_loop(unfinished, body, carry)
    _, count, _, position, _, logdensity, log_weight, group_log_z, step, min_ess, acceptance = carry
    new_state = state._replace(
        position=position,
        logdensity=logdensity,
        log_weight=log_weight,
        group_log_z=group_log_z,
        step_size=step,
    )
    value, stderr = estimate(new_state)
    return new_state, TrackInfo(value, stderr, min_ess, count, acceptance)
