"""Maximum-likelihood training of NumPyro models whose sites are energy-based distributions.

``MaximumLikelihood`` mirrors ``numpyro.infer.SVI`` (``init``, ``update``, ``run``) for models
with no latent sites: it fits every ``numpyro.param`` (and ``numpyro.contrib.module.eqx_module``)
of the model. Ordinary sites contribute their log-density as SVI's loss would; every observed
``EnergyDistribution`` site (also under plates, subsampling, ``handlers.scale`` weights and
``to_event``; a mask or any other wrapper is refused at ``init``) is a site of the training
core (``training.core``): its negative sampler draws samples under its current energy, and
its log-density term is replaced by the objective's per-event loss. For maximum
likelihood that is ``E(x_i) − mean_j E(x̃_j)``, i.e. the unknown ``log Z_θ`` replaced by
``−mean_j E(x̃_j)``, whose gradient is ``∇_θ log Z_θ``: the loss's gradient is the
maximum-likelihood gradient of the whole model (its VALUE is not the NLL). Every negative
sampler of ``fit`` works here, each site with its own state; conditional energies get
contrastive divergence unless the sampler handles conditions.

Example:
    >>> import jax, numpyro, optax
    >>> from numpyro.contrib.module import eqx_module
    >>> import numpyro_ebm as ebm
    >>> def model(data):
    ...     energy = eqx_module("energy", ebm.energies.MLPEnergy(2, key=jax.random.key(0)))
    ...     with numpyro.plate("data", data.shape[0], subsample_size=256):
    ...         batch = numpyro.subsample(data, event_dim=1)
    ...         numpyro.sample("x", ebm.EnergyDistribution(energy, (2,)), obs=batch)
    >>> data = ebm.datasets.toy("8gaussians").sample(jax.random.key(1), 5000)
    >>> learner = ebm.MaximumLikelihood(model, optax.adam(1e-3), num_chains=256)
    >>> res = learner.run(jax.random.key(2), 100, data, progress_bar=False)  # doctest: +SKIP
    >>> res.params["energy$params"]  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import equinox as eqx
import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpyro.distributions as dist
import optax
from numpyro import handlers
from numpyro.distributions.transforms import biject_to
from numpyro.infer.util import log_density, transform_fn

from numpyro_ebm import negatives as _negatives
from numpyro_ebm.distribution import EnergyDistribution
from numpyro_ebm.training import checkpoint, core, keys, loop
from numpyro_ebm.training.config import TrainConfig, default_energy_l2
from numpyro_ebm.training.inputs import check_spread
from numpyro_ebm.validation import check_count, validate_data

__all__ = ["MLInfo", "MLState", "MaximumLikelihood", "MaximumLikelihoodResult", "ModelProblem"]

MLState = core.TrainState  # the state of the training core (one entry per EBM site)
MLInfo = core.StepInfo


def energy_distribution(fn) -> EnergyDistribution | None:
    """The ``EnergyDistribution`` inside NumPyro's wrappers (plates expand, masks, to_event)."""
    while True:
        if isinstance(fn, EnergyDistribution):
            return fn
        if isinstance(fn, dist.ExpandedDistribution | dist.MaskedDistribution | dist.Independent):
            fn = fn.base_dist
        else:
            return None


def _holds_energy(fn, depth: int = 0) -> bool:
    """Whether an ``EnergyDistribution`` sits anywhere inside ``fn`` (its ``base_dist``
    chain, or any other distribution it holds, e.g. a mixture's components)."""
    if isinstance(fn, EnergyDistribution):
        return True
    if depth > 32 or not isinstance(fn, dist.Distribution):
        return False
    for value in vars(fn).values():
        inner = value if isinstance(value, list | tuple) else (value,)
        if any(_holds_energy(v, depth + 1) for v in inner if isinstance(v, dist.Distribution)):
            return True
    return False


def _site_base(name: str, fn) -> EnergyDistribution | None:
    """The site's ``EnergyDistribution`` (None for an ordinary site), refusing the wrappers
    whose EBM the training could not see: a mask, a transform or any other wrapper."""
    if not _holds_energy(fn):
        return None
    inner = fn
    while isinstance(inner, dist.ExpandedDistribution | dist.Independent):
        inner = inner.base_dist
    if isinstance(inner, EnergyDistribution):
        return inner
    if isinstance(inner, dist.MaskedDistribution):
        raise ValueError(
            f"site {name!r}: masks on an EnergyDistribution site (.mask(...) or "
            "handlers.mask) are not supported by MaximumLikelihood: the masked rows would "
            "still start the negatives and count as data. Select the rows instead, e.g. "
            "obs=data[mask] (before the plate)"
        )
    raise ValueError(
        f"site {name!r}: its EnergyDistribution sits inside {type(inner).__name__}, which "
        "MaximumLikelihood cannot train (no negative phase would reach it: the energy would "
        "run away). Transform the data instead and observe the EnergyDistribution itself "
        "(only plates' expand and to_event may wrap it)"
    )


def _with_base(fn, base):
    """``fn`` with its inner ``EnergyDistribution`` replaced by ``base`` (wrappers kept)."""
    if isinstance(fn, EnergyDistribution):
        return base
    inner = _with_base(fn.base_dist, base)
    if isinstance(fn, dist.ExpandedDistribution):
        return inner.expand(fn.batch_shape)
    if isinstance(fn, dist.MaskedDistribution):
        return inner.mask(fn._mask)
    return inner.to_event(fn.reinterpreted_batch_ndims)


class _Surrogate(dist.Distribution):
    """A site's objective as a log-density: ``log_prob(value) = −per-event loss`` (computed
    for the observed ``value``; the site's plate scale and mask apply as to any site)."""

    def __init__(self, log_probs: jax.Array, event_shape):
        self._log_probs = log_probs
        super().__init__(batch_shape=jnp.shape(log_probs), event_shape=tuple(event_shape))

    def log_prob(self, value):
        return self._log_probs


def _site_events(msg, base: EnergyDistribution):
    """``(events (n, *event_shape), conditions (n, ...) or None, lead_shape)`` of a site."""
    event_shape = tuple(base.event_shape)
    value = jnp.asarray(msg["value"])
    lead_shape = value.shape[: value.ndim - len(event_shape)]
    conditions = None
    if base.condition is not None:  # each event with its condition, as ``energy_of`` pairs them
        lead_shape = jnp.broadcast_shapes(lead_shape, tuple(base.batch_shape))
        value = jnp.broadcast_to(value, (*lead_shape, *event_shape))
        conditions = base.conditions_for(lead_shape)
    return value.reshape(-1, *event_shape), conditions, lead_shape


def _count(scale, batch_shape, num_events: int):
    """How many data points a site's ``num_events`` events stand for: each event weighted by
    the site's scale (a subsampling plate's, ``handlers.scale``'s: a number or per-point
    weights broadcasting against the site's batch shape), as NumPyro weights its log-density."""
    if scale is None:
        return float(num_events)
    shape = jnp.broadcast_shapes(jnp.shape(scale), tuple(batch_shape))
    per_element = num_events / max(math.prod(batch_shape), 1)  # events under one batch element
    return jnp.sum(jnp.broadcast_to(scale, shape)) * per_element


class _ObjectiveSites(handlers.Messenger):
    """At each EBM site: replace its log-density by the objective's per-event loss given the
    site's negatives; the terms land in ``self.terms``."""

    def __init__(self, fn, sites, objective, negatives, key):
        self.sites, self.objective, self.negatives = sites, objective, negatives
        self.key = key
        self.terms: dict = {}
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "sample" or msg["name"] not in self.sites:
            return
        name = msg["name"]
        base = energy_distribution(msg["fn"])
        events, conditions, lead_shape = _site_events(msg, base)
        key = jax.random.fold_in(self.key, self.sites.index(name))
        terms = self.objective.terms(base.energy, events, self.negatives[name], conditions, key=key)
        count = _count(msg.get("scale"), msg["fn"].batch_shape, terms.per_event.size)
        self.terms[name] = core.SiteTerms(terms, count)
        surrogate = _Surrogate(-terms.per_event.reshape(lead_shape), base.event_shape)
        msg["fn"] = _with_base(msg["fn"], surrogate)


class ModelProblem:
    """The EBM sites of a NumPyro model, as a problem of the training core (``data`` is the
    model's ``(args, kwargs)``, the same every step: subsample inside the model). Hashed by
    identity: one per ``MaximumLikelihood``, so its compiled step is reused."""

    prefix_sites = True  # history columns "<site>.<metric>"

    def __init__(self, model, inverse_transforms: dict, event_shapes: dict):
        self.model = model
        self.inverse_transforms = inverse_transforms
        self.event_shapes = event_shapes  # site name -> the shape of one event
        self.site_names = tuple(event_shapes)
        self.conditional: set[str] = set()  # sites of conditional energies (found at init)

    def constrain(self, params: dict) -> dict:
        return transform_fn(self.inverse_transforms, params)

    def batch(self, key, data):
        return data

    def _seeded(self, params, key):
        return handlers.substitute(handlers.seed(self.model, key), self.constrain(params))

    def sites(self, params, key, data) -> dict:
        args, kwargs = data
        trace = handlers.trace(self._seeded(params, key)).get_trace(*args, **kwargs)
        out = {}
        for name in self.site_names:
            base = energy_distribution(trace[name]["fn"])
            events, conditions, _ = _site_events(trace[name], base)
            out[name] = core.Site(base.energy, events, conditions)
        return out

    def loss(self, params, key, data, objective, negatives):
        args, kwargs = data
        model = _ObjectiveSites(
            handlers.seed(self.model, key),
            self.site_names,
            objective,
            negatives,
            core.objective_key(key),
        )
        log_joint, _ = log_density(model, args, kwargs, self.constrain(params))
        return -log_joint, model.terms

    def heldout_nll(self, state, validation):
        raise NotImplementedError("MaximumLikelihood takes no validation data")


class MaximumLikelihoodResult(NamedTuple):
    """What ``run`` returns: constrained ``params`` (the parameter average), the final
    ``state``, ``history`` (dict of per-step numpy arrays; site metrics as
    ``"<site>.<metric>"``), the recorded chains per site (``samplers.Draws``) and the learned
    ``log Z`` per unconditional site (a ``logz.LogZEstimate``: tracked, with a standard error,
    see ``core.learned_log_z``)."""

    params: dict
    state: core.TrainState
    history: dict
    recorded_chains: dict | None = None
    log_z: dict | None = None


def _trace_params(model, key, args, kwargs):
    """The model's params (unconstrained), their inverse transforms, its EBM sites' event
    shapes and the names of the conditional ones (the model is run once, its params'
    random initialisers drawing from a stream of their own)."""
    params_key = keys.params_key(keys.model_key(key))
    trace = handlers.trace(handlers.seed(model, params_key)).get_trace(*args, **kwargs)
    params, transforms, sites, conditional = {}, {}, {}, set()
    for name, site in trace.items():
        if site["type"] == "param":
            constraint = site["kwargs"].get("constraint", dist.constraints.real)
            transforms[name] = biject_to(constraint)
            value = transforms[name].inv(site["value"])
            if isinstance(value, int | float):  # trained are the floating-point array leaves
                value = jnp.asarray(value, dtype=float)
            params[name] = value
        elif site["type"] == "sample":
            if not site["is_observed"]:
                raise ValueError(
                    f"site {name!r} is latent: MaximumLikelihood fits parameters of models "
                    "whose sample sites are all observed (use numpyro.infer.SVI or MCMC "
                    "for latent variables)"
                )
            base = _site_base(name, site["fn"])
            if base is not None:
                _check_event_shape(name, site["value"], tuple(base.event_shape))
                sites[name] = tuple(base.event_shape)
                if base.condition is not None:
                    conditional.add(name)
    if not params:
        raise ValueError("the model has no numpyro.param / eqx_module sites to fit")
    return params, transforms, sites, conditional


def _check_event_shape(name: str, value, event_shape: tuple[int, ...]) -> None:
    """The observed values of an EBM site end in its event shape (else a ``ValueError``)."""
    shape = tuple(jnp.shape(value))
    if len(shape) < len(event_shape) or shape[len(shape) - len(event_shape) :] != event_shape:
        raise ValueError(
            f"site {name!r}: its observed values have shape {shape}, which does not end in "
            f"the EnergyDistribution's event_shape {event_shape}: pass obs of shape "
            f"(..., {', '.join(map(str, event_shape))}) or fix the event_shape"
        )


def _check_sites(problem: ModelProblem, params, key, data) -> None:
    """Validate the data of each EBM site exactly as ``core.init`` will see it (the same
    trace: ``model_key(key)``), and refuse a site whose energy no trained parameter reaches."""
    model_key = keys.model_key(key)
    sites = problem.sites(params, model_key, data)
    for name, site in sites.items():
        what = f"the observed values of site {name!r}"
        observed = site.observed.reshape(site.observed.shape[0], -1)
        check_spread(validate_data(observed, name=what), what)
    trainable, static = eqx.partition(params, eqx.is_inexact_array)
    num_params = len(jax.tree.leaves(trainable))
    for name, site in sites.items():
        point = (site.observed[0],)
        if site.conditions is not None:
            point = (*point, site.conditions[0])

        def energy_at(p, data, point, name=name):
            return problem.sites(eqx.combine(p, static), model_key, data)[name].energy(*point)

        # traced as core.init traces it: the params and the data's arrays are its inputs
        closed, _, _ = eqx.filter_make_jaxpr(energy_at)(trainable, data, point)
        if not _depends_on_inputs(closed, num_params):
            raise ValueError(
                f"site {name!r}: its energy depends on no numpyro.param / eqx_module site, so "
                "MaximumLikelihood would leave it untrained. Register the energy's parameters "
                'in the model, e.g. energy = eqx_module("energy", energy), or build it from '
                "numpyro.param values"
            )


def _depends_on_inputs(closed, num_inputs: int) -> bool:
    """Whether a jaxpr's output is computed from any of its first ``num_inputs`` inputs (a
    structural test: forward reachability over the equations, so a dependence is never
    missed; one that is multiplied by zero still counts)."""
    jaxpr = closed.jaxpr
    reached = set(jaxpr.invars[:num_inputs])

    def hit(variables):
        return any(isinstance(v, jcore.Var) and v in reached for v in variables)

    for eqn in jaxpr.eqns:
        if hit(eqn.invars):
            reached.update(eqn.outvars)
    return hit(jaxpr.outvars)


class MaximumLikelihood:
    """Maximum likelihood for NumPyro models with ``EnergyDistribution`` sites (SVI's interface).

    Args:
        model: a NumPyro model. Every sample site must be observed; ``numpyro.param`` and
            ``eqx_module`` sites are fitted.
        optimizer: an optax ``GradientTransformation``. The loss is the model's total
            negative log-density (as SVI's), so scale-free optimizers (Adam) behave as on a
            per-point loss; avoid gradient clipping at a fixed norm.
        sampler: negative-phase kernel (a name or ``samplers.Sampler``).
        negatives: a negative sampler (name or object, as in ``fit``); each EBM site has its
            own state. Conditional sites use contrastive divergence unless it handles
            conditions. ``"auto"``: persistent chains, or none for a score-matching
            ``objective=`` (a ``TrainConfig`` field, passed in ``settings``).
        num_chains: as in ``TrainConfig``.
        num_mcmc_steps: as in ``TrainConfig``.
        reinit_fraction: as in ``TrainConfig``.
        buffer_size: as in ``TrainConfig``.
        energy_l2: as in ``TrainConfig``, per observed point of each EBM site whose energy
            has a free additive constant; None: ``init`` sets ``default_energy_l2(D)`` for
            the largest EBM site's event size ``D``.
        ema_decay: as in ``TrainConfig``.
        step_size_gain: as in ``TrainConfig``.
        **settings: any other ``TrainConfig`` field (e.g. ``num_recorded_chains``,
            ``generator_optimizer``: for the generator modes; default a constant-rate Adam).
            ``energy_l2_decay`` defaults to None (constant) here: the learner does not know
            the run's length when it is built.
    """

    def __init__(
        self,
        model,
        optimizer: optax.GradientTransformation,
        *,
        sampler="mala",
        negatives="auto",
        num_chains: int = 1024,
        num_mcmc_steps: int = 20,
        reinit_fraction: float = 0.1,
        buffer_size: int = 10_000,
        energy_l2: float | None = None,
        ema_decay: float | None = 0.995,
        step_size_gain: float = 0.2,
        **settings,
    ):
        if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
            raise TypeError(f"optimizer must be an optax GradientTransformation, got {optimizer!r}")
        settings.setdefault("energy_l2_decay", None)  # no run length is known here
        config = TrainConfig(
            optimizer=optimizer, sampler=sampler, negatives=negatives, num_chains=num_chains,
            num_mcmc_steps=num_mcmc_steps, reinit_fraction=reinit_fraction,
            buffer_size=buffer_size, energy_l2=energy_l2, ema_decay=ema_decay,
            step_size_gain=step_size_gain, **settings,
        )  # fmt: skip
        if config.uses_generator and config.generator_optimizer is None:
            config = config.replace(
                generator_optimizer=optax.adam(config.generator_learning_rate, b1=0.5)
            )
        self.model = model
        self.optimizer = optimizer
        self.config = config.resolve(schedule_steps=1)  # both optimizers are given by now
        self._energy_l2 = energy_l2
        self.sampler = self.config.sampler
        self.problem: ModelProblem | None = None
        self._update = eqx.filter_jit(core.step)

    @property
    def _sites(self) -> tuple[str, ...]:
        return () if self.problem is None else self.problem.site_names

    def _problem(self) -> ModelProblem:
        if self.problem is None:
            raise RuntimeError(
                "this MaximumLikelihood has not traced its model yet: call init(key, *args) "
                "first (or run(key, num_steps, *args), which calls it)"
            )
        return self.problem

    def constrain(self, params: dict) -> dict:
        """Unconstrained parameters -> the values the model sees."""
        return self._problem().constrain(params)

    def init(self, key: jax.Array, *args, **kwargs) -> core.TrainState:
        """Trace the model, collect its params and EBM sites, start each site's negatives.

        Raises:
            ValueError: the model has latent sample sites or no param; an EBM site is masked,
                sits inside a wrapper other than a plate's expand or ``to_event``, has
                observed values that do not end in its event shape, non-finite or constant
                data, or an energy that depends on no param.

        Warns:
            DataScaleWarning: an EBM site's observed values far from unit scale
                (``validation.warn_if_not_unit_scale``).
        """
        return self._init(core.init, key, args, kwargs)

    def _init(self, start, key, args, kwargs) -> core.TrainState:
        """``init`` with ``start`` (``core.init``, or its shapes) after tracing the model."""
        params = self._trace(key, args, kwargs)
        return start(key, params, (args, kwargs), self.problem, self.config)

    def _trace(self, key, args, kwargs) -> dict:
        """Trace the model, set up ``self.problem`` and check its sites: the params."""
        params, transforms, sites, conditional = _trace_params(self.model, key, args, kwargs)
        if self.problem is None or self.problem.event_shapes != sites:
            self.problem = ModelProblem(self.model, transforms, sites)
        self.problem.conditional = conditional
        _check_sites(self.problem, params, key, (args, kwargs))
        if self._energy_l2 is None and sites:  # follows the data, as in fit
            size = max(math.prod(shape) for shape in sites.values())
            self.config = self.config.replace(energy_l2=default_energy_l2(size))
        return params

    def get_params(self, state: core.TrainState) -> dict:
        """Constrained parameters: the average when ``ema_decay`` is set, else the iterate."""
        return self.constrain(state.average_params)

    def update(self, key: jax.Array, state, *args, **kwargs):
        """One compiled maximum-likelihood step (``key`` drives the negatives and the model's
        randomness, e.g. its subsampling)."""
        return self._update(key, state, (args, kwargs), self._problem(), self.config)

    @checkpoint.one_writer
    def run(
        self,
        key: jax.Array,
        num_steps: int,
        *args,
        progress_bar: bool = True,
        steps_per_call: int = 100,
        max_nonfinite: int = 10,
        init_state=None,
        checkpoint_dir: str | os.PathLike | None = None,
        **kwargs,
    ) -> MaximumLikelihoodResult:
        """``init`` (unless ``init_state`` is given), then ``num_steps`` updates.

        Args:
            key: PRNG key (split into an init key and a loop key; step ``t`` uses
                ``fold_in(loop_key, t)``).
            num_steps: updates (with ``init_state``: more updates; with a checkpoint:
                the total to reach).
            *args: the model's arguments (the same every step; subsample inside the model
                with ``numpyro.plate(..., subsample_size=...)``).
            **kwargs: the model's keyword arguments, likewise.
            progress_bar: tqdm bar.
            steps_per_call: updates per compiled call (one host round-trip each).
            max_nonfinite: stop after this many consecutive rejected (non-finite) steps.
            init_state: continue from this state (a learner that has not run ``init``
                traces the model first: its params must have the state's structure).
            checkpoint_dir: checkpoint folder (as ``fit``'s): resumes from it when it
                holds a checkpoint of the same settings.

        Raises:
            TrainingDivergedError: ``max_nonfinite`` consecutive non-finite steps.
        """
        check_count("num_steps", num_steps)
        k_init, k_loop = jax.random.split(key)
        stored = None if checkpoint_dir is None else checkpoint.stored_meta(checkpoint_dir)
        state = init_state
        if state is None:
            start = checkpoint.init_or_shapes(core.init, stored)
            state = self._init(start, k_init, args, kwargs)
        elif self.problem is None:
            _check_resumable(self._trace(k_init, args, kwargs), state)
        target = num_steps if stored is not None else int(state.step) + num_steps
        meta = {
            "config": self.config.describe(),
            "defaults": self.config.describe_defaults(),
            "sites": list(self._sites),
        }
        if checkpoint_dir is not None:
            meta["num_steps"] = target
        state, history, recorded = checkpoint.resume(checkpoint_dir, state, meta, stored)
        state, history, recorded = loop.train(
            state, key=k_loop, data=(args, kwargs), problem=self.problem, config=self.config,
            num_steps=target, steps_per_call=steps_per_call, max_nonfinite=max_nonfinite,
            progress_bar=progress_bar, history=history, recorded=recorded,
            save=checkpoint.saver(checkpoint_dir, meta), description="MaximumLikelihood",
        )  # fmt: skip
        return self._result(state, history, recorded)

    def _result(self, state, history, recorded) -> MaximumLikelihoodResult:
        shapes = self.problem.event_shapes
        draws = {
            name: loop.records_to_draws(r, shapes[name], _tempering(state, name, self))
            for name, r in recorded.items()
        }
        log_z = {
            name: core.learned_log_z(state, name)
            for name in state.average_log_z
            if name not in self.problem.conditional
        }
        return MaximumLikelihoodResult(self.get_params(state), state, history, draws, log_z)


def _check_resumable(params: dict, state) -> None:
    """``state`` (an ``init_state``) holds params of the model's structure."""
    if not hasattr(state, "params") or jax.tree.structure(state.params) != jax.tree.structure(
        params
    ):
        raise ValueError(
            "init_state does not fit this model: its params differ from the model's "
            f"({sorted(params)}); pass a state from init or run of this model"
        )


def _tempering(state, name: str, model: MaximumLikelihood):
    """The ladders' summary of an unconditional site trained with parallel tempering."""
    negatives = state.negatives[name]
    if isinstance(negatives, _negatives.TemperingState) and name not in model.problem.conditional:
        return _negatives.tempering_summary(negatives)
    return None
