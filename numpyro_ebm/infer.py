"""Maximum-likelihood training of NumPyro models whose sites are energy-based distributions.

``MaximumLikelihood`` mirrors ``numpyro.infer.SVI`` (``init``, ``update``, ``run``) for models
with no latent sites: it fits every ``numpyro.param`` (and ``numpyro.contrib.module.eqx_module``)
of the model by maximum likelihood. Ordinary sites contribute their log-density as SVI's loss
would; for every observed ``EnergyDistribution`` site (also under plates, masks, ``to_event``
and subsampling) the unknown ``log Z_θ`` is replaced by the negative-phase surrogate

    log Z_θ  →  −mean_j E_θ(x̃_j),     x̃ ~ p_θ by BlackJAX chains (stop-gradient),

whose gradient is ``−E_model[∇_θ E]`` = ``∇_θ log Z_θ``. The loss's gradient is then the
maximum-likelihood gradient of the whole model's log-density (its VALUE is not the NLL). Each
EBM site gets its own persistent chains, restarted at that site's observed values as in
``numpyro_ebm.negatives``, and its own tuned step size. One ``update`` is one compiled step;
``run`` scans ``steps_per_call`` of them per compiled call.

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
import warnings
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
from numpyro import handlers
from numpyro.distributions.transforms import biject_to
from numpyro.infer.util import log_density, transform_fn

from numpyro_ebm import negatives as _negatives
from numpyro_ebm import samplers as _samplers
from numpyro_ebm.distribution import EnergyDistribution
from numpyro_ebm.train import (
    TrainingDivergedError,
    _all_finite,
    _is_real,
    adapt_step_size,
    attempt_key,
    free_constants,
    keep_if_finite,
    moving_average,
)
from numpyro_ebm.validation import validate_data

_NUM_PROBES = 8  # points at which init compares ∂E/∂θ to find each site's free constants

__all__ = ["MLInfo", "MLState", "MaximumLikelihood", "MaximumLikelihoodResult", "SiteInfo"]


def _base(fn) -> EnergyDistribution | None:
    """The ``EnergyDistribution`` inside NumPyro's wrappers (plates expand, masks, to_event)."""
    while True:
        if isinstance(fn, EnergyDistribution):
            return fn
        if isinstance(fn, dist.ExpandedDistribution | dist.MaskedDistribution | dist.Independent):
            fn = fn.base_dist
        else:
            return None


def _with_base(fn, base: EnergyDistribution):
    """``fn`` with its inner ``EnergyDistribution`` replaced by ``base`` (wrappers kept)."""
    if isinstance(fn, EnergyDistribution):
        return base
    inner = _with_base(fn.base_dist, base)
    if isinstance(fn, dist.ExpandedDistribution):
        return inner.expand(fn.batch_shape)
    if isinstance(fn, dist.MaskedDistribution):
        return inner.mask(fn._mask)
    return inner.to_event(fn.reinterpreted_batch_ndims)


class _negative_phase(handlers.Messenger):
    """At each EBM site: run that site's chains under the CURRENT energy (parameters
    stop-gradient-ed), then give the site ``log_z = −mean E(negatives)`` (same wrappers, same
    energy), so that the model is traced once per step. Results land in ``self.results``."""

    def __init__(self, fn, learner, state, key):
        self.learner, self.state, self.key = learner, state, key
        self.results: dict = {}
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "sample" or msg["name"] not in self.learner._sites:
            return
        learner, name = self.learner, msg["name"]
        base = _base(msg["fn"])
        event_shape = tuple(base.event_shape)
        params, static = eqx.partition(base.energy, eqx.is_inexact_array)
        frozen = eqx.combine(jax.lax.stop_gradient(params), static)
        logdensity = _samplers.flat_logdensity(frozen, event_shape)
        observed = jnp.asarray(msg["value"]).reshape(-1, math.prod(event_shape))
        k_start, k_run = jax.random.split(jax.random.fold_in(self.key, learner._sites.index(name)))
        if base.condition is not None:
            self._conditional(msg, base, frozen, observed, k_run)
            return
        starts, rows = _negatives.chain_starts(
            k_start,
            learner.negatives,
            self.state.banks[name],
            self.state.bases[name],
            learner.num_chains,
            learner.reinit_fraction,
            jax.lax.stop_gradient(observed),
        )
        chains = learner.sampler.init_chains(starts, logdensity)
        chains, trace, _ = _samplers.run_chains(
            k_run, learner.sampler, logdensity, chains, self.state.step_sizes[name],
            learner.num_mcmc_steps,
        )  # fmt: skip
        final = jax.lax.stop_gradient(chains.position)
        negatives = final.reshape(learner.num_chains, *event_shape)
        e_obs = base.energy_of(msg["value"])
        e_neg = base.energy_of(negatives)
        self.results[name] = {
            "final": final,
            "rows": rows,
            "acceptance": jnp.mean(trace.acceptance_rate),
            "langevin_grad_norm": jnp.mean(jnp.linalg.norm(chains.logdensity_grad, axis=1)),
            "energy_gap": jnp.mean(e_obs) - jnp.mean(e_neg),
            "centre": 0.5 * (jnp.mean(e_obs) + jnp.mean(e_neg)),
            "count": _count(msg, e_obs),
        }
        new = EnergyDistribution(
            base.energy,
            base.event_shape,
            log_z=jnp.broadcast_to(-jnp.mean(e_neg), base.batch_shape),
            sampler=base.sampler,
            initializer=base.initializer,
        )
        msg["fn"] = _with_base(msg["fn"], new)

    def _conditional(self, msg, base, frozen, observed, key):
        """Conditional site: one chain per observed event, under that event's condition,
        started at the observed value (contrastive divergence with ``num_mcmc_steps`` steps),
        and a per-event log Z surrogate ``−E(x̃_i | c_i)``."""
        learner, name = self.learner, msg["name"]
        event_shape = tuple(base.event_shape)
        lead_shape = jnp.shape(msg["value"])[: jnp.ndim(msg["value"]) - len(event_shape)]
        conditions = jax.lax.stop_gradient(base._conditions_for(lead_shape))
        step_size = self.state.step_sizes[name]

        def one(k, start, c):
            logdensity = _samplers.flat_logdensity(lambda x: frozen(x, c), event_shape)
            chain = learner.sampler.init_chains(start[None], logdensity)
            chain, trace, _ = _samplers.run_chains(
                k, learner.sampler, logdensity, chain, step_size, learner.num_mcmc_steps
            )
            grad_norm = jnp.linalg.norm(chain.logdensity_grad[0])
            return chain.position[0], jnp.mean(trace.acceptance_rate), grad_norm

        keys = jax.random.split(key, observed.shape[0])
        final, acceptance, grad_norm = jax.vmap(one)(
            keys, jax.lax.stop_gradient(observed), conditions
        )
        final = jax.lax.stop_gradient(final)
        e_obs = base.energy_of(msg["value"])
        e_neg = base.energy_of(final.reshape(*lead_shape, *event_shape))
        self.results[name] = {
            "final": final,
            "rows": None,
            "acceptance": jnp.mean(acceptance),
            "langevin_grad_norm": jnp.mean(grad_norm),
            "energy_gap": jnp.mean(e_obs) - jnp.mean(e_neg),
            "centre": 0.5 * (jnp.mean(e_obs) + jnp.mean(e_neg)),
            "count": _count(msg, e_obs),
        }
        new = EnergyDistribution(
            base.energy,
            base.event_shape,
            log_z=-e_neg,
            sampler=base.sampler,
            initializer=base.initializer,
            condition=base.condition,
        )
        msg["fn"] = _with_base(msg["fn"], new)


def _count(msg, e_obs) -> jax.Array:
    """How many data points the site's log-density term stands for (events × plate scale), so
    that the ``energy_l2`` penalty is ``α c²`` per data point, as in ``fit``."""
    scale = msg.get("scale")
    return e_obs.size * (1.0 if scale is None else scale)


class SiteInfo(NamedTuple):
    """Per-step metrics of one EBM site (see ``train.StepInfo`` for their meaning)."""

    energy_gap: jax.Array
    acceptance_rate: jax.Array
    step_size: jax.Array
    langevin_grad_norm: jax.Array


class MLInfo(NamedTuple):
    """Per-step metrics: ``loss`` (surrogate: its gradient is the ML gradient), gradient norm,
    whether the step was finite, and a ``SiteInfo`` per EBM site."""

    loss: jax.Array
    grad_norm: jax.Array
    is_finite: jax.Array
    sites: dict


class MLState(NamedTuple):
    """Training state (a pytree): unconstrained params, their average, optimizer state, and per
    EBM site the persistent chains (``banks``), step sizes, Gaussian bases and
    ``free_constant``: a mask like ``params`` of the elements that are free additive constants
    of that site's energy (``train.free_constants``), the only ones its ``energy_l2`` penalty
    moves."""

    step: jax.Array
    params: dict
    average_params: dict
    opt_state: Any
    banks: dict
    step_sizes: dict
    bases: dict
    consecutive_nonfinite: jax.Array
    free_constant: dict | None = None


class MaximumLikelihoodResult(NamedTuple):
    """What ``run`` returns: constrained ``params`` (the parameter average), the final
    ``state`` and ``history`` (dict of per-step numpy arrays; site metrics as
    ``"<site>.<metric>"``)."""

    params: dict
    state: MLState
    history: dict


class MaximumLikelihood:
    """Maximum likelihood for NumPyro models with ``EnergyDistribution`` sites (SVI's interface).

    Args:
        model: a NumPyro model. Every sample site must be observed; ``numpyro.param`` and
            ``eqx_module`` sites are fitted.
        optimizer: an optax ``GradientTransformation``. The loss is the model's total
            negative log-density (as SVI's), so scale-free optimizers (Adam) behave as on a
            per-point loss; avoid gradient clipping at a fixed norm.
        sampler: negative-phase kernel (``"mala"``, ``"hmc"``, ``"ula"``, ``"barker"`` or a
            ``samplers.Sampler``).
        negatives: ``"persistent"`` (default), ``"replay"`` or ``"short_run"``.
        num_chains: negative-phase chains per EBM site.
        num_mcmc_steps: sampler steps per update.
        reinit_fraction: share of chains restarted at the site's observed values each step.
        buffer_size: replay bank size.
        energy_l2: weight ``α`` of the penalty ``α c²`` per observed point of each EBM site,
            ``c = ½ (mean E(obs) + mean E(neg))``: the same meaning as in ``fit``
            (``train.TrainConfig``). Its gradient reaches only the parameters that are free
            additive constants of that site's energy (found by ``init``), so it pins the
            constant without biasing the maximum-likelihood solution. (A parameter that is a
            free constant of one site but also enters another site or factor is moved by the
            penalty too: keep such constants per site.)
        ema_decay: parameter-average decay (``None``: last iterate), as in ``fit``.
        step_size_gain: Robbins-Monro gain of the step-size update.
    """

    def __init__(
        self,
        model,
        optimizer: optax.GradientTransformation,
        *,
        sampler="mala",
        negatives: str = "persistent",
        num_chains: int = 1024,
        num_mcmc_steps: int = 20,
        reinit_fraction: float = 0.1,
        buffer_size: int = 10_000,
        energy_l2: float = 0.01,
        ema_decay: float | None = 0.995,
        step_size_gain: float = 0.2,
    ):
        if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
            raise TypeError(f"optimizer must be an optax GradientTransformation, got {optimizer!r}")
        if negatives not in _negatives.KINDS:
            raise ValueError(f"negatives must be one of {_negatives.KINDS}, got {negatives!r}")
        for name, value in (("num_chains", num_chains), ("num_mcmc_steps", num_mcmc_steps)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be None or in [0, 1), got {ema_decay}")
        if not (_is_real(energy_l2) and 0 <= energy_l2 < math.inf):
            raise ValueError(f"energy_l2 must be a finite number >= 0, got {energy_l2!r}")
        self.model = model
        self.optimizer = optimizer
        self.sampler = _samplers.get_sampler(sampler)
        self.negatives = negatives
        self.num_chains = num_chains
        self.num_mcmc_steps = num_mcmc_steps
        self.reinit_fraction = reinit_fraction
        self.buffer_size = buffer_size
        self.energy_l2 = energy_l2
        self.ema_decay = ema_decay
        self.step_size_gain = step_size_gain
        self._inverse_transforms: dict = {}
        self._sites: tuple[str, ...] = ()
        self._update = eqx.filter_jit(self._update_impl)
        self._run_steps = eqx.filter_jit(self._run_steps_impl)

    # -- model inspection --------------------------------------------------------------------

    def constrain(self, params: dict) -> dict:
        """Unconstrained parameters -> the values the model sees."""
        return transform_fn(self._inverse_transforms, params)

    def init(self, key: jax.Array, *args, **kwargs) -> MLState:
        """Trace the model, collect its params and EBM sites, start the chains.

        Raises:
            ValueError: the model has latent sample sites, or no EBM site and no param.
        """
        k_model, k_bank = jax.random.split(key)
        trace = handlers.trace(handlers.seed(self.model, k_model)).get_trace(*args, **kwargs)
        params, transforms, sites = {}, {}, []
        for name, site in trace.items():
            if site["type"] == "param":
                constraint = site["kwargs"].get("constraint", dist.constraints.real)
                transform = biject_to(constraint)
                transforms[name] = transform
                params[name] = transform.inv(site["value"])
            elif site["type"] == "sample":
                if not site["is_observed"]:
                    raise ValueError(
                        f"site {name!r} is latent: MaximumLikelihood fits parameters of models "
                        "whose sample sites are all observed (use numpyro.infer.SVI or MCMC "
                        "for latent variables)"
                    )
                if _base(site["fn"]) is not None:
                    sites.append(name)
        if not params:
            raise ValueError("the model has no numpyro.param / eqx_module sites to fit")
        self._inverse_transforms = transforms
        self._sites = tuple(sites)
        banks, step_sizes, bases, free_constant = {}, {}, {}, {}
        for i, name in enumerate(sites):
            observed = validate_data(
                _flat_observed(trace[name]), name=f"the observed values of site {name!r}"
            )
            step_sizes[name] = jnp.asarray(self.sampler.step_size, jnp.float32)
            free_constant[name] = self._free_constants(
                name, params, observed, jax.random.fold_in(k_bank, len(sites) + i),
                k_model, args, kwargs,
            )  # fmt: skip
            if _base(trace[name]["fn"]).condition is not None:
                banks[name] = bases[name] = None  # chains per condition, from the data
                continue
            bases[name] = _negatives.fit_base(observed)
            banks[name] = _negatives.init_bank(
                jax.random.fold_in(k_bank, i),
                self.negatives,
                observed,
                self.num_chains,
                self.buffer_size,
            )
        return MLState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            average_params=params,
            opt_state=self.optimizer.init(params),
            banks=banks,
            step_sizes=step_sizes,
            bases=bases,
            consecutive_nonfinite=jnp.zeros((), jnp.int32),
            free_constant=free_constant,
        )

    def _free_constants(self, name, params, observed, key, k_model, args, kwargs):
        """``train.free_constants`` of site ``name``'s energy with respect to ALL params, at
        points drawn from a Gaussian fitted to its observed values (and, for a conditional
        energy, its first conditions)."""

        def site(p):
            model = handlers.substitute(handlers.seed(self.model, k_model), self.constrain(p))
            return _base(handlers.trace(model).get_trace(*args, **kwargs)[name]["fn"])

        base = site(params)
        probes = _negatives.fit_base(observed).sample(key, _NUM_PROBES)
        probes = probes.reshape(_NUM_PROBES, *base.event_shape)
        if base.condition is None:
            return free_constants(lambda p, x: site(p).energy(x), params, probes)
        conditions = base._conditions_for((observed.shape[0],))
        conditions = conditions[jnp.arange(_NUM_PROBES) % conditions.shape[0]]
        return free_constants(lambda p, xc: site(p).energy(*xc), params, (probes, conditions))

    def get_params(self, state: MLState) -> dict:
        """Constrained parameters: the average when ``ema_decay`` is set, else the iterate."""
        return self.constrain(state.average_params)

    # -- one step ----------------------------------------------------------------------------
    def update(self, key: jax.Array, state: MLState, *args, **kwargs) -> tuple[MLState, MLInfo]:
        """One compiled maximum-likelihood step (``key`` drives the chains and subsampling)."""
        return self._update(key, state, args, kwargs)

    def _update_impl(self, key, state, args, kwargs):
        k_model, k_chains = jax.random.split(key)

        def terms(params):
            model = _negative_phase(handlers.seed(self.model, k_model), self, state, k_chains)
            log_joint, _ = log_density(model, args, kwargs, self.constrain(params))
            penalties = jnp.stack(
                [self.energy_l2 * r["count"] * r["centre"] ** 2 for r in model.results.values()]
                or [jnp.zeros(())]
            )
            return (-log_joint, penalties), model.results

        (nll, penalties), pullback, results = jax.vjp(terms, state.params, has_aux=True)
        loss = nll + jnp.sum(penalties)
        if self.energy_l2 == 0 or not self._sites:
            (grads,) = pullback((jnp.ones_like(nll), jnp.zeros_like(penalties)))
        else:
            # one backward pass per term (batched): the ML gradient, then each site's
            # penalty gradient, which only that site's free constants receive
            num = len(self._sites)
            basis = jnp.eye(num + 1, dtype=nll.dtype)
            (each,) = jax.vmap(pullback)((basis[:, 0], basis[:, 1:]))
            grads = jax.tree.map(lambda g: g[0], each)
            for i, name in enumerate(self._sites):
                grads = jax.tree.map(
                    lambda total, g, mask, i=i: total + mask * g[i + 1],
                    grads, each, state.free_constant[name],
                )  # fmt: skip
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        average, _ = moving_average(state.average_params, params, state.step, self.ema_decay)
        banks, step_sizes, infos = {}, {}, {}
        for name in self._sites:
            result = results[name]
            banks[name] = state.banks[name]
            if banks[name] is not None:
                banks[name] = _negatives.update_bank(
                    self.negatives, banks[name], result["final"], result["rows"]
                )
            acceptance = result["acceptance"]
            step_sizes[name] = adapt_step_size(
                state.step_sizes[name], acceptance, self.sampler, self.step_size_gain
            )
            infos[name] = SiteInfo(
                result["energy_gap"], acceptance, state.step_sizes[name],
                result["langevin_grad_norm"],
            )  # fmt: skip
        proposed = MLState(
            step=state.step + 1,
            params=params,
            average_params=average,
            opt_state=opt_state,
            banks=banks,
            step_sizes=step_sizes,
            bases=state.bases,
            consecutive_nonfinite=jnp.zeros((), jnp.int32),
            free_constant=state.free_constant,
        )
        finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(proposed)
        new_state = keep_if_finite(finite, proposed, state)
        info = MLInfo(loss, optax.tree.norm(grads), finite, infos)
        return new_state, info

    def _run_steps_impl(self, key, state, args, kwargs, num_steps_total, length):
        def body(state, _):
            new_state, info = self._update_impl(
                attempt_key(key, state.step, state.consecutive_nonfinite), state, args, kwargs
            )
            active = state.step < num_steps_total
            new_state = jax.tree.map(lambda n, o: jnp.where(active, n, o), new_state, state)
            return new_state, (info, active)

        return jax.lax.scan(body, state, None, length=length)

    # -- the loop ----------------------------------------------------------------------------
    def run(
        self,
        key: jax.Array,
        num_steps: int,
        *args,
        progress_bar: bool = True,
        steps_per_call: int = 100,
        max_nonfinite: int = 10,
        init_state: MLState | None = None,
        **kwargs,
    ) -> MaximumLikelihoodResult:
        """``init`` (unless ``init_state`` is given), then ``num_steps`` updates.

        Args:
            key: PRNG key (split into an init key and a loop key; step ``t`` uses
                ``fold_in(loop_key, t)``).
            num_steps: updates.
            *args: the model's positional arguments (the same every step; subsample inside
                the model with ``numpyro.plate(..., subsample_size=...)``).
            **kwargs: the model's keyword arguments.
            progress_bar: tqdm bar.
            steps_per_call: updates per compiled call (one host round-trip each).
            max_nonfinite: stop after this many consecutive rejected (non-finite) steps.
            init_state: continue from this state.

        Raises:
            TrainingDivergedError: ``max_nonfinite`` consecutive non-finite steps.
        """
        if not (isinstance(num_steps, int) and num_steps >= 1):
            raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
        k_init, k_loop = jax.random.split(key)
        state = self.init(k_init, *args, **kwargs) if init_state is None else init_state
        target = int(state.step) + num_steps
        history: dict[str, list] = {}
        bar = None
        if progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=num_steps, desc="MaximumLikelihood", unit="step")
        try:
            while int(state.step) < target:
                state, (infos, active) = self._run_steps(
                    k_loop, state, args, kwargs, target, steps_per_call
                )
                active = np.asarray(active)
                for column, values in _flatten_info(infos).items():
                    history.setdefault(column, []).append(np.asarray(values)[active])
                if bar is not None:
                    bar.update(int(active.sum()))
                bad = int(np.sum(~np.asarray(infos.is_finite)[active]))
                if bad:
                    warnings.warn(
                        f"{bad} non-finite step(s) were rejected (parameters kept)",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                if int(state.consecutive_nonfinite) >= max_nonfinite:
                    raise TrainingDivergedError(
                        f"training diverged: {int(state.consecutive_nonfinite)} consecutive "
                        f"non-finite steps up to step {int(state.step)}",
                        state,
                        {k: np.concatenate(v) for k, v in history.items()},
                    )
        finally:
            if bar is not None:
                bar.close()
        history_arrays = {k: np.concatenate(v) for k, v in history.items()}
        return MaximumLikelihoodResult(self.get_params(state), state, history_arrays)


def _flat_observed(site) -> jax.Array:
    """The site's observed events as ``(n, D)``."""
    size = math.prod(_base(site["fn"]).event_shape)
    return jnp.asarray(site["value"]).reshape(-1, size)


def _flatten_info(info: MLInfo) -> dict:
    out = {"loss": info.loss, "grad_norm": info.grad_norm, "is_finite": info.is_finite}
    for name, site in info.sites.items():
        for field, value in site._asdict().items():
            out[f"{name}.{field}"] = value
    return out
