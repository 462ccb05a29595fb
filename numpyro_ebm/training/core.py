"""The training core: one pure ``init``/``step`` pair over a problem, an objective and a
negative sampler, used by ``fit`` and ``MaximumLikelihood`` alike.

    state = init(key, params, data, problem, config)
    state, info = step(key, state, batch, problem, config)

A *problem* says what is trained (``problems.EnergyProblem``: one energy on data, for ``fit``;
``model.ModelProblem``: the EBM sites of a NumPyro model, for ``MaximumLikelihood``). It has
``sites(params, key, batch) -> {name: Site}`` (each energy-based site's energy and observed
events) and ``loss(params, key, batch, objective, negatives) -> (loss, {name: SiteTerms})``.
Each step, for every site, the negative sampler (``config.negatives``) draws samples under the
site's CURRENT energy (frozen), the objective (``config.objective``) gives the loss, and one
optimizer update follows. A step whose loss, gradient or new state is not finite is rejected
(``keep_if_finite``).

The ``energy_l2`` penalty (for maximum likelihood ``α (mean E(data)² + mean E(neg)²)`` per
data point) keeps the energies' scale from running away; it is applied only to sites whose
energy has a free additive constant (``free_constants``), which absorbs the mean energy, so
the penalty cannot shift the density (see ``TrainConfig.energy_l2``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from numpyro_ebm.gaussian import fit_base
from numpyro_ebm.logz import LogZEstimate, nce_log_z_loss, tracking
from numpyro_ebm.negatives import ContrastiveDivergence, NegativeInfo, NegativeSampler, Target
from numpyro_ebm.samplers import flat_logdensity
from numpyro_ebm.samplers.kernels import chain_dtype
from numpyro_ebm.training.config import TrainConfig
from numpyro_ebm.training.keys import (
    FLOOR,
    LOG_Z_NOISE,
    PROBES,
    TRACKER,
    model_key,
    objective_key,
    site_keys,
)
from numpyro_ebm.training.objective import ObjectiveTerms

__all__ = [
    "Site",
    "SiteInfo",
    "SiteTerms",
    "StepInfo",
    "TrainState",
    "all_finite",
    "free_constants",
    "init",
    "keep_if_finite",
    "learned_log_z",
    "log_z_of",
    "moving_average",
    "objective_key",
    "select",
    "step",
]

NUM_PROBES = 8  # points at which init compares ∂E/∂θ to find the free constants


class Site(NamedTuple):
    """One energy-based site of a problem in one step.

    Attributes:
        energy: one event (and its condition) -> scalar.
        observed: ``(B, *event_shape)`` the site's data events this step.
        conditions: ``(B, ...)`` their conditions (a conditional energy), else None.
    """

    energy: Callable
    observed: jax.Array
    conditions: Any = None

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.observed.shape[1:])


class SiteTerms(NamedTuple):
    """A site's objective terms and how many data points they stand for (``count``: the
    ``energy_l2`` penalty is per data point)."""

    terms: ObjectiveTerms
    count: Any


class TrainState(NamedTuple):
    """Everything that changes during training (a pytree; checkpointed as is).

    Attributes:
        step: number of accepted steps (int32 scalar).
        params: what is trained: the energy (``fit``) or the model's unconstrained params
            (``MaximumLikelihood``); its floating-point array leaves are the parameters.
        average_params: their exponential moving average (same structure).
        opt_state: optimizer state.
        negatives: per site, the negative sampler's state.
        bases: per site, the ``GaussianBase`` fitted to its data at ``init``.
        consecutive_nonfinite: how many steps in a row were rejected as non-finite.
        log_z: per site, the learned ``log Z`` of the averaged energy (noise-contrastive,
            ``logz.nce_log_z_loss``), the raw iterate (NaN for a conditional site).
        average_log_z: its moving average (the reported value).
        log_z_opt_state: per site, its Adam state.
        free_constant: per site, a mask like the trained parameters: 1.0 where an element is
            a free additive constant of that site's energy (``free_constants``), else 0.0.
        log_z_tracker: per site, the ``logz.tracking.TrackerState`` that follows the averaged
            energy's ``log Z`` through training (None for a conditional site, or without
            ``config.track_log_z``).
        best: ``selection.BestState``, the averaged parameters at the lowest held-out NLL so
            far (``fit`` with validation data), or None.
    """

    step: jax.Array
    params: Any
    average_params: Any
    opt_state: Any
    negatives: dict
    bases: dict
    consecutive_nonfinite: jax.Array
    log_z: dict
    average_log_z: dict
    log_z_opt_state: dict
    free_constant: dict
    log_z_tracker: dict
    best: Any = None


class SiteInfo(NamedTuple):
    """Per-step metrics of one site.

    Attributes:
        acceptance_rate: mean Metropolis acceptance of the negative-phase chains (NaN without).
        step_size: the chains' step size in this step.
        langevin_grad_norm: mean ``‖∇ₓE‖`` at the negatives.
        log_z: the ``log Z`` of the averaged energy after this step: tracked
            (``logz.tracking``) when the site has a tracker, else the noise-contrastive one.
        metrics: the objective's metrics (``energy_gap``, ``energy_data``,
            ``energy_negatives`` for maximum likelihood), the negative sampler's and, with a
            tracker, ``log_z_stderr``, ``log_z_min_ess``, ``log_z_bridge_steps``,
            ``log_z_acceptance`` (its moves' mean acceptance), ``log_z_bound`` (the floor's
            lower bound, ``logz.bound``), ``log_z_missed`` (1 where it raised the estimate),
            ``log_z_fused`` (1 where its importance estimate was fused with it),
            ``log_z_raised`` (what the floor's raises add to ``log_z`` and is not yet
            released) and ``log_z_nce`` (the noise-contrastive estimate).
        recorded: the negative sampler's ``ChainRecord`` (or None).
    """

    acceptance_rate: jax.Array
    step_size: jax.Array
    langevin_grad_norm: jax.Array
    log_z: jax.Array
    metrics: dict
    recorded: Any = None


class StepInfo(NamedTuple):
    """Per-step metrics.

    Attributes:
        loss: the surrogate loss (its gradient is the objective's; for maximum likelihood its
            VALUE is not a convergence signal) plus the ``energy_l2`` penalties.
        grad_norm: global norm of the parameter gradient (before clipping).
        is_finite: False when the step was rejected (non-finite loss, gradient or state).
        heldout_nll: held-out NLL (``fit`` with validation data, every ``record_every``
            steps; else NaN).
        sites: ``SiteInfo`` per site.
    """

    loss: jax.Array
    grad_norm: jax.Array
    is_finite: jax.Array
    heldout_nll: jax.Array
    sites: dict


def free_constants(energy_of: Callable, params, probes, rtol: float = 1e-4):
    """Which parameter elements are free additive constants of the energy.

    An element ``θᵢ`` whose derivative ``∂E(x)/∂θᵢ`` is the same non-zero value at every probe
    point moves ``E`` by a constant: it changes neither the density nor the likelihood gradient
    of any other parameter (e.g. an MLP's output bias, ``∂E/∂b = 1``). These are the elements
    the ``energy_l2`` penalty needs (a site without one gets no penalty).

    Args:
        energy_of: ``(params, x) -> scalar`` for one probe ``x``.
        params: pytree of parameters (``None`` where there is nothing to train).
        probes: ``(num_probes, ...)`` points in general position (at least 2; a tuple of
            such arrays for a conditional energy).
        rtol: relative spread of ``∂E/∂θᵢ`` over the probes below which it counts as constant.

    Returns:
        Pytree like ``params`` of float arrays: 1.0 for a free constant, else 0.0.
    """
    grads = jax.vmap(jax.grad(energy_of), in_axes=(None, 0))(params, probes)

    def mask(g):
        first = g[0]
        spread = jnp.max(jnp.abs(g - first), axis=0)
        return ((jnp.abs(first) > 0) & (spread <= rtol * jnp.abs(first))).astype(g.dtype)

    return jax.tree.map(mask, grads)


def all_finite(tree) -> jax.Array:
    """Whether every floating-point leaf of ``tree`` is finite (a scalar bool; integer leaves
    always are)."""
    # One reduction over all the floating-point leaves, not one per leaf: a training state has
    # hundreds of leaves, and a reduction each made the step's XLA compilation ~35% slower.
    leaves = [jnp.ravel(x) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))]
    return jnp.all(jnp.isfinite(jnp.concatenate(leaves))) if leaves else jnp.array(True)


def moving_average(average, params, step, ema_decay: float | None):
    """``(new_average, decay)``: the parameter average after this step (``params`` itself when
    ``ema_decay`` is None). The decay at step t is ``min(ema_decay, (1 + t) / (10 + t))``, a
    warm-up as in TensorFlow's ExponentialMovingAverage with num_updates: early iterates, far
    from the optimum, are forgotten quickly."""
    if ema_decay is None:
        return params, jnp.zeros(())
    t = step.astype(jnp.float32)
    decay = jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))
    return jax.tree.map(lambda a, p: decay * a + (1 - decay) * p, average, params), decay


def select(pred, new, old):
    """``new`` where ``pred`` else ``old``, leaf by leaf over the arrays; the non-array leaves
    (static: an energy's activation function, say) are the same in both and kept."""
    new_arrays, static = eqx.partition(new, eqx.is_array)
    old_arrays = eqx.filter(old, eqx.is_array)
    chosen = jax.tree.map(lambda n, o: jnp.where(pred, n, o), new_arrays, old_arrays)
    return eqx.combine(chosen, static)


def keep_if_finite(finite, proposed: TrainState, state: TrainState) -> TrainState:
    """``proposed`` if ``finite``, else ``state`` with only ``consecutive_nonfinite`` advanced
    (the step counter too stays: a rejected attempt is retried, see ``attempt_key``)."""
    rejected = state._replace(consecutive_nonfinite=state.consecutive_nonfinite + 1)
    return select(finite, proposed, rejected)


def sampler_for(site: Site, config: TrainConfig) -> NegativeSampler:
    """The negative sampler of ``site``: ``config.negatives``, or for a conditional site one
    that handles conditions (``config.conditional_negatives``, by default contrastive
    divergence with the kernel, steps and gain of ``config.negatives``, or of ``config``
    for negatives without chains)."""
    negatives = config.negatives
    if site.conditions is None or negatives.supports_conditions:
        return negatives
    if config.conditional_negatives is not None:
        return config.conditional_negatives
    names = ("sampler", "num_mcmc_steps", "step_size_gain")
    return ContrastiveDivergence(**{n: getattr(negatives, n, getattr(config, n)) for n in names})


def _flat_energy(site: Site) -> Callable:
    shape = site.event_shape
    if site.conditions is None:
        return lambda z: site.energy(jnp.reshape(z, shape))
    return lambda z, c: site.energy(jnp.reshape(z, shape), c)


def _flat(x: jax.Array) -> jax.Array:
    return jnp.reshape(x, (x.shape[0], -1))


def _frozen(params):
    arrays, static = eqx.partition(params, eqx.is_inexact_array)
    return eqx.combine(jax.lax.stop_gradient(arrays), static)


def init(key: jax.Array, params, data, problem, config: TrainConfig) -> TrainState:
    """Initial state: optimizer state, per site a Gaussian fitted to its data, the negative
    sampler's state, the learned log Z at the Gaussian's, and the free constants.

    Args:
        key: PRNG key (per site: the sampler's init, and folded in, the probe points and the
            log Z tracker's start).
        params: what is trained (the energy, or the model's unconstrained params).
        data: what ``problem.sites`` reads at init (the whole training data for ``fit``).
        problem: the problem (see the module docstring).
        config: the run's resolved ``TrainConfig``.
    """
    # one compiled program, not dozens of eagerly dispatched operations that each compile on
    # first use (the set-up of a small fit: 9.8 s of compiling -> 5.8 s)
    return _compiled_init(key, params, data, problem, config)


def _init(key, params, data, problem, config: TrainConfig) -> TrainState:
    trainable, static = eqx.partition(params, eqx.is_inexact_array)
    sites = problem.sites(params, model_key(key), data)
    keys = site_keys(key, tuple(sites))
    negatives, bases, free, log_z, trackers = {}, {}, {}, {}, {}
    for name, site in sites.items():
        observed = site.observed.astype(chain_dtype(site.observed.dtype))  # as fit's data
        flat = _flat(observed)
        bases[name] = fit_base(flat)
        negatives[name] = sampler_for(site, config).init(keys[name], observed, bases[name])
        probes = bases[name].sample(jax.random.fold_in(keys[name], PROBES), NUM_PROBES)
        probes = jnp.reshape(probes, (NUM_PROBES, *site.event_shape))
        free[name] = _site_free_constants(problem, trainable, static, data, key, name, probes)
        # a conditional energy has a log Z per condition: none is learned (0 stays 0)
        start = bases[name].log_z if site.conditions is None else 0.0
        log_z[name] = jnp.asarray(start, jnp.float32)
        trackers[name] = None
        if site.conditions is None and config.track_log_z:
            tracker_key = jax.random.fold_in(keys[name], TRACKER)
            trackers[name] = _start_tracker(
                tracker_key, bases[name], site.energy, site.event_shape, config.log_z_tracker()
            )
    adam = config.log_z_optimizer()
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        average_params=params,
        opt_state=config.optimizer.init(trainable),
        negatives=negatives,
        bases=bases,
        consecutive_nonfinite=jnp.zeros((), jnp.int32),
        log_z=log_z,
        average_log_z=dict(log_z),
        log_z_opt_state={name: adam.init(jnp.zeros((), jnp.float32)) for name in sites},
        free_constant=free,
        log_z_tracker=trackers,
    )


_compiled_init = eqx.filter_jit(_init)


@eqx.filter_jit
def _start_tracker(key, base, energy, event_shape, settings) -> tracking.TrackerState:
    """``tracking.start`` for ``energy`` (compiled; an equinox energy is a traced argument, so
    another run with the same architecture reuses the compilation)."""
    state, _ = tracking.start(key, base, flat_logdensity(energy, event_shape), settings)
    return state


def _site_free_constants(problem, trainable, static, data, key, name, probes):
    """``free_constants`` of site ``name``'s energy with respect to ALL trained parameters,
    at ``probes`` (paired with the site's first conditions for a conditional energy)."""

    def site_of(p):
        return problem.sites(eqx.combine(p, static), model_key(key), data)[name]

    conditions = site_of(trainable).conditions
    if conditions is None:
        return free_constants(lambda p, x: site_of(p).energy(x), trainable, probes)
    paired = conditions[jnp.arange(NUM_PROBES) % conditions.shape[0]]
    return free_constants(lambda p, xc: site_of(p).energy(*xc), trainable, (probes, paired))


def step(key: jax.Array, state: TrainState, batch, problem, config: TrainConfig):
    """One training update (pure; jit with ``problem`` and ``config`` static).

    1. Per site, the negative sampler draws samples under the CURRENT energy (frozen).
    2. Gradient of the objective (plus the ``energy_l2`` penalty where it applies),
       optimizer update, parameter average, learned ``log Z`` update.
    3. If anything is non-finite the update is rejected (``keep_if_finite``).

    Returns ``(new_state, StepInfo)``.
    """
    k_model = model_key(key)
    if config.sharding is not None:
        batch = jax.lax.with_sharding_constraint(batch, config.sharding)
    sites = problem.sites(_frozen(state.params), k_model, batch)
    keys = site_keys(key, tuple(sites))
    draws, infos = {}, {}
    new_negatives = {}
    for name, site in sites.items():
        target = Target(
            _flat_energy(site),
            _flat(site.observed),
            state.bases[name],
            site.event_shape,
            site.conditions,
            config.sharding,
        )
        sampler = sampler_for(site, config)
        new_negatives[name], flat_neg, infos[name] = sampler.sample(
            keys[name], state.negatives[name], target
        )
        draws[name] = jnp.reshape(flat_neg, (flat_neg.shape[0], *site.event_shape))

    params, static = eqx.partition(state.params, eqx.is_inexact_array)
    (loss, site_terms), grads = objective_grad(
        params, static, problem, k_model, batch, draws, config, state.free_constant, state.step
    )
    updates, opt_state = config.optimizer.update(grads, state.opt_state, params)
    new_params = optax.apply_updates(params, updates)
    average, decay = moving_average(
        eqx.filter(state.average_params, eqx.is_inexact_array),
        new_params,
        state.step,
        config.ema_decay,
    )
    average_params = eqx.combine(average, static)
    averaged = problem.sites(average_params, k_model, batch)
    log_z, average_log_z, log_z_opt_state = _learn_log_z(
        keys, state, averaged, draws, sites, config, decay
    )
    trackers, tracked = _track_log_z(keys, state, problem, averaged, k_model, batch, config)
    proposed = TrainState(
        step=state.step + 1,
        params=eqx.combine(new_params, static),
        average_params=average_params,
        opt_state=opt_state,
        negatives=new_negatives,
        bases=state.bases,
        consecutive_nonfinite=jnp.zeros((), jnp.int32),
        log_z=log_z,
        average_log_z=average_log_z,
        log_z_opt_state=log_z_opt_state,
        free_constant=state.free_constant,
        log_z_tracker=trackers,
        best=state.best,
    )
    finite = jnp.isfinite(loss) & all_finite(grads) & all_finite(proposed)
    new_state = keep_if_finite(finite, proposed, state)
    info = StepInfo(
        loss=loss,
        grad_norm=optax.tree.norm(grads),
        is_finite=finite,
        heldout_nll=jnp.full((), jnp.nan),
        sites={
            name: _site_info(
                infos[name],
                site_terms[name],
                new_state,
                name,
                tracked.get(name),
                site.conditions is not None,
                config,
            )
            for name, site in sites.items()
        },
    )
    return new_state, info


def log_z_of(state: TrainState, name: str) -> tuple[jax.Array, jax.Array]:
    """``(log Z, standard error)`` of site ``name``'s averaged energy in ``state``: the
    tracked estimate when the site has a tracker, else the noise-contrastive one (standard
    error NaN; for a conditional site its unlearned starting value, which ``StepInfo``
    reports as NaN)."""
    tracker = state.log_z_tracker.get(name)
    if tracker is not None:
        return tracking.estimate(tracker)
    return state.average_log_z[name], jnp.full((), jnp.nan)


def learned_log_z(state: TrainState, name: str) -> LogZEstimate:
    """The ``LogZEstimate`` of site ``name``'s averaged energy: ``"tracked"`` (with its
    standard error; ``info``: the noise-contrastive value, the groups' and ``raised``, what the
    floor added and has not released) when tracked, else ``"nce-learned"`` (stderr NaN)."""
    nce = float(state.average_log_z[name])
    tracker = state.log_z_tracker.get(name)
    if tracker is None:
        return LogZEstimate(nce, float("nan"), "nce-learned")
    value, stderr = (float(v) for v in tracking.estimate(tracker))
    groups, raised = np.asarray(tracker.group_log_z), float(tracker.raised)
    info = {"nce": nce, "group_log_z": groups, "raised": raised}
    return LogZEstimate(value, stderr, "tracked", None, info)


def _site_info(
    info: NegativeInfo, site_terms: SiteTerms, state, name, tracked, conditional, config
) -> SiteInfo:
    log_z, stderr = log_z_of(state, name)
    if conditional:
        log_z = jnp.full((), jnp.nan)
    metrics = {**site_terms.terms.metrics, **info.metrics}
    if tracked is not None:
        tracked, bound, missed, fused = tracked
        metrics.update(
            log_z_stderr=stderr,
            log_z_min_ess=tracked.min_ess,
            log_z_bridge_steps=tracked.bridge_steps,
            log_z_acceptance=tracked.acceptance,
            log_z_bound=bound,
            log_z_missed=missed,
            log_z_fused=fused,
            log_z_raised=state.log_z_tracker[name].raised,  # as log_z: the state's
            log_z_nce=state.average_log_z[name],
        )
    recorded = info.record
    if config.sharding is not None and recorded is not None:
        # the host reads the records: with several processes each needs the whole of them
        replicated = jax.sharding.NamedSharding(config.sharding.mesh, jax.sharding.PartitionSpec())
        recorded = jax.lax.with_sharding_constraint(recorded, replicated)
    return SiteInfo(
        acceptance_rate=info.acceptance_rate,
        step_size=info.step_size,
        langevin_grad_norm=info.langevin_grad_norm,
        log_z=log_z,
        metrics=metrics,
        recorded=recorded,
    )


def objective_grad(params, static, problem, key, batch, negatives, config, free_constant, step):
    """``((loss, {site: SiteTerms}), grads)``: the gradient of the objective plus, for each
    site whose energy has a free additive constant (``free_constant``), its ``energy_l2``
    penalty."""

    def total(p):
        loss, site_terms = problem.loss(
            eqx.combine(p, static), key, batch, config.objective, negatives
        )
        weight = config.energy_l2_at(step)
        for name, t in site_terms.items():
            applies = _has_free_constant(free_constant[name])
            loss = loss + applies * weight * t.count * t.terms.penalty
        return loss, site_terms

    (loss, site_terms), grads = jax.value_and_grad(total, has_aux=True)(params)
    return (loss, site_terms), grads


def _has_free_constant(mask) -> jax.Array:
    leaves = [jnp.any(m > 0) for m in jax.tree.leaves(mask)]
    return jnp.any(jnp.stack(leaves)).astype(jnp.float32) if leaves else jnp.zeros(())


def _learn_log_z(keys, state, averaged, draws, sites, config, decay):
    """One Adam step of each unconditional site's learned ``log Z`` (of the AVERAGED energy,
    the one returned; the chains sample the current one, which the average follows closely
    once the learning rate has decayed). Without negatives (score matching) the data batch
    stands in for the model's samples: classic noise-contrastive estimation, exact only as
    far as the model fits the data."""
    adam = config.log_z_optimizer()
    log_z, average_log_z, opt_states = {}, {}, {}
    for name, site in sites.items():
        if site.conditions is not None:
            log_z[name] = state.log_z[name]
            average_log_z[name] = state.average_log_z[name]
            opt_states[name] = state.log_z_opt_state[name]
            continue
        base = state.bases[name]
        flat_neg = _flat(draws[name] if draws[name].shape[0] else site.observed)
        noise = base.sample(jax.random.fold_in(keys[name], LOG_Z_NOISE), flat_neg.shape[0])
        energy = _flat_energy(averaged[name])
        grad = jax.grad(nce_log_z_loss)(state.log_z[name], energy, flat_neg, noise, base)
        update, opt_states[name] = adam.update(grad, state.log_z_opt_state[name])
        log_z[name] = state.log_z[name] + update
        average_log_z[name] = decay * state.average_log_z[name] + (1 - decay) * log_z[name]
    return log_z, average_log_z, opt_states


def _track_log_z(keys, state, problem, averaged, key, batch, config):
    """Each tracker carried from the previous averaged energy to the new one
    (``tracking.advance``), then floored (``tracking.floor``): ``({site: TrackerState or
    None}, {site: (TrackInfo, bound, missed, fused)})`` (the last two 1.0 or 0.0)."""
    trackers, infos = dict(state.log_z_tracker), {}
    previous = None
    for name, tracker in state.log_z_tracker.items():
        if tracker is None:
            continue
        if previous is None:
            previous = problem.sites(state.average_params, key, batch)
        shape, base = averaged[name].event_shape, state.bases[name]
        settings = config.log_z_tracker()
        old, new = (flat_logdensity(s[name].energy, shape) for s in (previous, averaged))
        tracker, info = tracking.advance(
            jax.random.fold_in(keys[name], TRACKER), tracker, old, new, settings, base
        )
        # the batch's rows carry the floor's kernels: wells at the training rows
        rows = _flat(averaged[name].observed)
        trackers[name], bound, missed, fused = tracking.floor(
            jax.random.fold_in(keys[name], FLOOR), tracker, new, rows, base, settings
        )
        infos[name] = (info, bound, missed.astype(bound.dtype), fused.astype(bound.dtype))
    return trackers, infos
