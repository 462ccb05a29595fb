"""Maximum-likelihood training: a pure ``init``/``step`` core and the ``fit`` loop on top.

The gradient of the negative log-likelihood ``L(θ) = E_data[E_θ(x)] + log Z_θ`` is

    ∇L = E_data[∇_θ E_θ(x)] − E_{x~p_θ}[∇_θ E_θ(x)],

and the second expectation is estimated with negatives drawn by BlackJAX chains at temperature 1
(``numpyro_ebm.samplers``) started as configured in ``numpyro_ebm.negatives``. The negatives
are ``stop_gradient``-ed: differentiating through the chain is not the likelihood gradient.

Core (BlackJAX style, pure and jittable; states are checkpointable pytrees):

    state = init(key, energy, data, config)
    state, info = step(key, state, batch, config)

``fit`` runs ``step`` ``steps_per_call`` times per compiled call (``lax.scan``; one host
round-trip per call, not per step), shows a tqdm progress bar, records the history, guards
against non-finite steps and checkpoints atomically so that a resumed run continues the same
trajectory.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from numpyro_ebm import _io
from numpyro_ebm import generator as _generator
from numpyro_ebm import logz as _logz
from numpyro_ebm import negatives as _negatives
from numpyro_ebm import samplers as _samplers
from numpyro_ebm._io import LOCK_FILE, folder_lock
from numpyro_ebm.distribution import EnergyDistribution, check_energy
from numpyro_ebm.validation import validate_data

__all__ = [
    "HISTORY_FIELDS",
    "MATMUL_PRECISIONS",
    "NEGATIVES",
    "ChainRecord",
    "CheckpointError",
    "FitResult",
    "StepInfo",
    "TrainConfig",
    "TrainState",
    "TrainingDivergedError",
    "adapt_step_size",
    "attempt_key",
    "checkpoint_step",
    "default_optimizer",
    "fit",
    "free_constants",
    "heldout_nll",
    "init",
    "keep_if_finite",
    "latest_checkpoint",
    "moving_average",
    "step",
    "surrogate_grad",
    "surrogate_loss",
]

NEGATIVES = (*_negatives.KINDS, "generator", "hybrid")
_USES_GENERATOR = ("generator", "hybrid")


@functools.cache  # one object per setting: fit's compiled step is cached on the optimizer
def default_optimizer(num_steps: int, learning_rate: float = 5e-3, clip: float = 1.0):
    """Adam (β₁ = 0.5, as usual for EBMs) with gradient clipping and cosine decay to 10%.

    The same arguments return the same object, so repeated ``fit`` calls with the default
    optimizer reuse the compiled training step instead of compiling it again."""
    schedule = optax.cosine_decay_schedule(learning_rate, max(num_steps, 1), alpha=0.1)
    return optax.chain(optax.clip_by_global_norm(clip), optax.adam(schedule, b1=0.5, b2=0.999))


MATMUL_PRECISIONS = ("float32", "tensorfloat32", "bfloat16", "default")


@dataclass(frozen=True)
class TrainConfig:
    """Everything static about a training run (hashable: it is a ``jit`` static argument).

    Attributes:
        optimizer: optax transformation for the energy's parameters.
        sampler: negative-phase kernel (``numpyro_ebm.samplers.Sampler``).
        negatives: ``"persistent"``, ``"replay"`` or ``"short_run"`` (MCMC chains, see
            ``numpyro_ebm.negatives``); ``"generator"`` (Kim & Bengio: the negatives are
            generator samples, no MCMC) or ``"hybrid"`` (generator samples start the chains,
            ``num_mcmc_steps`` refine them; see ``numpyro_ebm.generator``).
        num_chains: chains run per step (generator modes: generator samples per step).
        num_mcmc_steps: sampler steps per training step.
        batch_size: data points per step (drawn with replacement).
        energy_l2: weight ``α`` of the penalty ``α c²`` on the CENTRE of the energies,
            ``c = ½ (mean E(data) + mean E(neg))``, which pins the energy's free additive
            constant and keeps energies near 0. The likelihood does not change when a constant
            is added to E, so the penalty's gradient is applied ONLY to the parameters that are
            additive constants of E (``free_constants``, found once by ``init``: e.g. an MLP's
            output bias). Every other parameter gets the pure maximum-likelihood gradient, so
            the penalty does not bias the density at any ``α``; an energy without a free
            constant (``GaussianEnergy``, ``DeepEnergy``) gets no penalty at all (nothing can
            drift). Per data point, with the same meaning in ``MaximumLikelihood``.
        ema_decay: decay of the parameter moving average returned as the trained model
            (``None``: return the last iterate); the decay used at step t is
            ``min(ema_decay, (1 + t) / (10 + t))``. PCD parameters oscillate; the average is
            smoother.
        buffer_size: replay bank size.
        reinit_fraction: fraction of replay chains restarted at data points of the batch.
        step_size_gain: Robbins-Monro gain of the per-step update
            ``log h ← log h + gain · (acceptance − target)``.
        log_z_learning_rate: Adam learning rate of the learned ``log Z`` (see ``nce_log_z_loss``).
        sharding: where chains and the batch live: a sharding of their leading axis across
            devices (``fit`` builds it from ``devices``); ``None``: leave placement to JAX.
        generator_optimizer: optax transformation for the generator (generator modes).
        entropy: the generator's entropy estimator (``numpyro_ebm.generator``).
        amortization_weight: weight of the ``"hybrid"`` generator's pull towards the refined
            negatives: the energy distance (``generator.energy_distance``) divided by the
            data's RMS standard deviation (``generator.data_scale``), so the weight does not
            depend on the data's units.
        resample: ``"hybrid"`` with a noisy generator: importance-resample the generator's
            samples towards the model before the chains start
            (``generator.resample_towards_model``), which fixes how mass is shared between
            modes that short chains cannot cross.
        num_recorded_chains: negative-phase chains whose positions and sampler statistics
            ``step`` reports (``StepInfo.recorded``) for diagnostics; persistent chains that are
            recorded are never re-initialised at data (see ``negatives.chain_starts``).
        record_every: ``fit`` keeps every ``record_every``-th record and computes the held-out
            NLL at those steps.
        matmul_precision: precision of float32 matrix products in the compiled step, one of
            ``MATMUL_PRECISIONS`` (``jax.default_matmul_precision``). ``"float32"`` (default)
            is true float32 everywhere: on NVIDIA GPUs since Ampere JAX would otherwise use
            TensorFloat-32 (10-bit mantissa) for them. ``"tensorfloat32"`` / ``"bfloat16"``
            trade accuracy for speed on large networks; the CPU ignores the setting.
    """

    optimizer: optax.GradientTransformation
    sampler: _samplers.Sampler = field(default_factory=_samplers.mala)
    negatives: str = "persistent"
    num_chains: int = 1024
    num_mcmc_steps: int = 20
    batch_size: int = 1024
    energy_l2: float = 0.01
    ema_decay: float | None = 0.995
    buffer_size: int = 10_000
    reinit_fraction: float = 0.1
    step_size_gain: float = 0.2
    log_z_learning_rate: float = 0.01
    sharding: jax.sharding.Sharding | None = None
    generator_optimizer: optax.GradientTransformation | None = None
    entropy: Any = None
    amortization_weight: float = 40.0
    resample: bool = True
    num_recorded_chains: int = 8
    record_every: int = 10
    matmul_precision: str = "float32"

    @property
    def uses_generator(self) -> bool:
        return self.negatives in _USES_GENERATOR

    @property
    def runs_chains(self) -> bool:
        return self.negatives != "generator"

    def __post_init__(self):
        if self.negatives not in NEGATIVES:
            raise ValueError(f"unknown negatives {self.negatives!r}; choose one of {NEGATIVES}")
        if self.uses_generator and (self.generator_optimizer is None or self.entropy is None):
            raise ValueError(f"negatives={self.negatives!r} needs generator_optimizer and entropy")
        if self.amortization_weight < 0:
            raise ValueError(f"amortization_weight must be >= 0, got {self.amortization_weight}")
        for name in ("num_chains", "num_mcmc_steps", "batch_size", "buffer_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.num_recorded_chains, int) and self.num_recorded_chains >= 0):
            raise ValueError(
                f"num_recorded_chains must be an integer >= 0, got {self.num_recorded_chains!r}"
            )
        if self.num_recorded_chains > self.num_chains:
            raise ValueError(
                f"num_recorded_chains ({self.num_recorded_chains}) cannot exceed num_chains "
                f"({self.num_chains})"
            )
        if not (isinstance(self.record_every, int) and self.record_every >= 1):
            raise ValueError(f"record_every must be an integer >= 1, got {self.record_every!r}")
        if not (_is_real(self.energy_l2) and 0 <= self.energy_l2 < math.inf):
            raise ValueError(f"energy_l2 must be a finite number >= 0, got {self.energy_l2!r}")
        check_learning_rate("log_z_learning_rate", self.log_z_learning_rate)
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be None or in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.reinit_fraction <= 1.0:
            raise ValueError(f"reinit_fraction must be in [0, 1], got {self.reinit_fraction}")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(
                f"matmul_precision must be one of {MATMUL_PRECISIONS}, "
                f"got {self.matmul_precision!r}"
            )

    def describe(self) -> dict:
        """JSON-able settings by name (a resumed run's are compared with its checkpoint's).

        The sampler and the entropy estimator are dicts of their fields; the sampler's
        sampling-only fields (``num_warmup``, ``thinning``, ``num_chains``, ``init_scale``:
        used by ``EnergyDistribution.sample`` only) and ``sharding`` (a run may resume on
        other devices) are left out, and optimizers are ``"custom"`` (not comparable)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["optimizer"] = "custom" if out["optimizer"] is not None else None
        out["sampler"] = {
            f.name: getattr(self.sampler, f.name)
            for f in dataclasses.fields(self.sampler)
            if f.init and f.name not in _SAMPLING_ONLY
        }
        out["generator_optimizer"] = "custom" if out["generator_optimizer"] is not None else None
        if self.entropy is not None:
            fields = (
                dataclasses.fields(self.entropy) if dataclasses.is_dataclass(self.entropy) else ()
            )
            out["entropy"] = {
                "name": type(self.entropy).__name__,
                **{f.name: getattr(self.entropy, f.name) for f in fields if f.init},
            }
        del out["sharding"]
        return out


class TrainState(NamedTuple):
    """Everything that changes during training (a pytree; checkpointed as is).

    Attributes:
        step: number of steps taken (int32 scalar).
        energy: the energy being trained (its array leaves are the parameters).
        average_energy: exponential moving average of the parameters (same structure).
        opt_state: optimizer state.
        bank: persistent chains ``(num_chains, D)`` or replay bank ``(buffer_size, D)``.
        step_size: current sampler step size (scalar).
        base: Gaussian fitted to the data (where short runs start).
        consecutive_nonfinite: how many steps in a row were rejected as non-finite.
        log_z: learned ``log Z`` of ``average_energy`` (noise-contrastive, see
            ``nce_log_z_loss``), the raw iterate.
        average_log_z: its moving average (same decay as the parameters): the reported value.
        log_z_opt_state: its Adam state.
        generator: the generator (``"generator"``/``"hybrid"`` negatives), else None.
        generator_opt_state: its optimizer state (or None).
        free_constant: ``free_constants`` of the energy: 1.0 where a parameter element is an
            additive constant of E (the only elements the ``energy_l2`` penalty moves), else
            0.0; same structure as the trained parameters.
    """

    step: jax.Array
    energy: Any
    average_energy: Any
    opt_state: Any
    bank: jax.Array
    step_size: jax.Array
    base: _negatives.GaussianBase
    consecutive_nonfinite: jax.Array
    log_z: jax.Array
    average_log_z: jax.Array
    log_z_opt_state: Any
    generator: Any = None
    generator_opt_state: Any = None
    free_constant: Any = None


class ChainRecord(NamedTuple):
    """The recorded negative-phase chains after one training step.

    Attributes:
        positions: ``(num_recorded_chains, D)`` flat positions (the step's negatives).
        info: ``samplers.ChainInfo`` of ``(num_recorded_chains,)`` arrays summarising the
            step's ``num_mcmc_steps`` transitions (``samplers.summarize``); acceptance is NaN
            for generator negatives, which run no chain.
    """

    positions: jax.Array
    info: _samplers.ChainInfo


class StepInfo(NamedTuple):
    """Per-step metrics (the columns of ``FitResult.history``) and the recorded chains.

    Attributes:
        loss: the surrogate ``mean E(data) − mean E(neg) + α c²`` (``surrogate_loss``). Its
            gradient is the ML gradient; its VALUE is not a convergence signal.
        energy_gap: ``mean E(data) − mean E(neg)``; hovers around 0 when training is stable.
        energy_data: mean energy of the batch.
        energy_negatives: mean energy of the negatives.
        acceptance_rate: mean Metropolis acceptance of the negative-phase chains.
        step_size: sampler step size used in this step.
        grad_norm: global norm of the parameter gradient (before clipping).
        langevin_grad_norm: mean ``‖∇ₓE‖`` at the negatives (r_t in Nijkamp et al. 2020).
        is_finite: False when the step was rejected (non-finite loss, gradient or chains).
        log_z: the learned ``log Z`` (moving average) after this step.
        generator_energy: mean energy of the generator's samples (NaN without a generator).
        generator_entropy: the entropy estimator's value for the generator (NaN without one).
        amortization: energy distance from the generator's samples to the refined negatives,
            divided by the data's RMS standard deviation (``"hybrid"``; NaN otherwise).
        resampling_ess: effective sample size (fraction of the batch) of the hybrid's
            importance weights; below 0.05 the resampling is skipped (NaN without it).
        heldout_nll: ``mean E(validation) + log Z`` (learned ``log Z``) of the averaged energy:
            computed by ``fit`` every ``record_every`` steps when it has validation data, else
            NaN.
        recorded: ``ChainRecord`` of the first ``num_recorded_chains`` chains (None if 0); not
            a history column (``fit`` collects it into ``FitResult.recorded_chains``).
    """

    loss: jax.Array
    energy_gap: jax.Array
    energy_data: jax.Array
    energy_negatives: jax.Array
    acceptance_rate: jax.Array
    step_size: jax.Array
    grad_norm: jax.Array
    langevin_grad_norm: jax.Array
    is_finite: jax.Array
    log_z: jax.Array
    generator_energy: jax.Array
    generator_entropy: jax.Array
    amortization: jax.Array
    resampling_ess: jax.Array
    heldout_nll: jax.Array
    recorded: ChainRecord | None = None


HISTORY_FIELDS = tuple(name for name in StepInfo._fields if name != "recorded")


def _log_z_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    return optax.adam(config.log_z_learning_rate)


def check_array_leaves(energy) -> None:
    """Every pytree leaf must be an array (the generator is carried through ``lax.scan`` whole)."""
    bad = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(energy)
        if not eqx.is_array(leaf)
    ]
    if bad:
        raise TypeError(
            f"energy has non-array pytree leaves at {', '.join(bad[:5])}: training needs array "
            "leaves. Mark hyper-parameters static (eqx.field(static=True)) or wrap numbers in "
            "jnp.asarray."
        )


def check_trainable(energy) -> None:
    """Training updates the energy's floating-point array leaves (everything else, e.g. an
    activation function or a Python number, is static, as in ``eqx.partition(energy,
    eqx.is_inexact_array)``): an energy without any has nothing to train."""
    if not jax.tree_util.tree_leaves(eqx.filter(energy, eqx.is_inexact_array)):
        raise ValueError(
            f"energy {type(energy).__name__} has no floating-point array leaves, so training has "
            "no parameters to fit. Pass the parameters as a pytree next to the function: "
            "jax.tree_util.Partial(fn, params) with fn(params, x) -> scalar, or write the energy "
            "as an eqx.Module whose parameters are float arrays."
        )


def _is_real(value) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def check_learning_rate(name: str, value) -> None:
    """A learning rate must be a finite number > 0 (a ``ValueError`` naming it otherwise)."""
    if not (_is_real(value) and 0 < value < math.inf):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _params(energy):
    return eqx.filter(energy, eqx.is_inexact_array)


def free_constants(energy_of: Callable, params, probes: jax.Array, rtol: float = 1e-4):
    """Which parameter elements are free additive constants of the energy.

    An element ``θᵢ`` whose derivative ``∂E(x)/∂θᵢ`` is the same non-zero value at every probe
    point moves ``E`` by a constant: it changes neither the density nor the likelihood gradient
    of any other parameter (e.g. an MLP's output bias, ``∂E/∂b = 1``). These are the elements
    the ``energy_l2`` penalty may move (see ``TrainConfig``).

    Args:
        energy_of: ``(params, x) -> scalar`` for one event ``x``.
        params: pytree of parameters (``None`` where there is nothing to train).
        probes: ``(num_probes, *event_shape)`` points in general position (at least 2).
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


def _event_shape_of(data: jax.Array) -> tuple[int, ...]:
    return tuple(data.shape[1:])


def init(
    key: jax.Array, energy, data: jax.Array, config: TrainConfig, generator=None
) -> TrainState:
    """Initial training state: optimizer state, base Gaussian fitted to ``data``, chains.

    Args:
        key: PRNG key (for the initial chain positions; ``fold_in(key, 1)`` draws the probe
            points of ``free_constants`` from the base Gaussian).
        energy: callable pytree, one event -> scalar (e.g. ``MLPEnergy``).
        data: ``(num_points, *event_shape)`` training data (validated by the caller, ``fit``).
        config: the run's ``TrainConfig``.
        generator: a ``numpyro_ebm.generator.Generator`` (required by the generator modes).
    """
    if config.uses_generator and generator is None:
        raise ValueError(f"negatives={config.negatives!r} needs a generator")
    flat = jnp.reshape(data, (data.shape[0], -1))
    base = _negatives.fit_base(flat)
    bank = _negatives.init_bank(key, config.negatives, flat, config.num_chains, config.buffer_size)
    generator_opt_state = None
    if config.uses_generator:
        generator_opt_state = config.generator_optimizer.init(
            eqx.filter(generator, _generator.trainable(generator))
        )
    else:
        generator = None
    params, static = eqx.partition(energy, eqx.is_inexact_array)
    probes = base.sample(jax.random.fold_in(key, 1), _NUM_PROBES)
    free_constant = free_constants(
        lambda p, x: eqx.combine(p, static)(x.reshape(data.shape[1:])), params, probes
    )
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        energy=energy,
        average_energy=energy,
        opt_state=config.optimizer.init(_params(energy)),
        bank=bank,
        step_size=jnp.asarray(config.sampler.step_size, jnp.float32),
        base=base,
        consecutive_nonfinite=jnp.zeros((), jnp.int32),
        log_z=jnp.asarray(base.log_z, jnp.float32),
        average_log_z=jnp.asarray(base.log_z, jnp.float32),
        log_z_opt_state=_log_z_optimizer(config).init(jnp.zeros((), jnp.float32)),
        generator=generator,
        generator_opt_state=generator_opt_state,
        free_constant=free_constant,
    )


_NUM_PROBES = 8  # points at which init compares ∂E/∂θ to find the free constants


def nce_log_z_loss(log_z, energy, model_samples, noise_samples, base: _negatives.GaussianBase):
    """Noise-contrastive loss whose minimiser in ``log_z`` is ``log ∫ exp(−E)``.

    Logistic regression of samples of the model (positives) against samples of the noise
    ``q = base`` (negatives) with the logit ``−E(x) − log_z − log q(x)`` (Gutmann & Hyvärinen
    2010). Only ``log_z`` is trained by it (the energy gets the maximum-likelihood gradient).
    When the positives are exact draws of ``exp(−E)/Z``, the population minimiser is exactly
    ``log Z``: the classes are then ``p`` vs ``q`` and the logit is the true log-ratio. The
    negative-phase chains supply the positives, so no extra sampling is needed.
    """

    def logit(x):
        return -jax.vmap(energy)(x) - log_z - base.log_prob(x)

    pos = logit(jax.lax.stop_gradient(model_samples))
    neg = logit(jax.lax.stop_gradient(noise_samples))
    return jnp.mean(jax.nn.softplus(-pos)) + jnp.mean(jax.nn.softplus(neg))


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _mean_energies(energy, batch: jax.Array, negatives: jax.Array) -> jax.Array:
    """``[mean E(batch), mean E(negatives)]`` (no gradient flows into the negatives)."""
    e_data = jax.vmap(energy)(batch)
    e_neg = jax.vmap(energy)(jax.lax.stop_gradient(negatives))
    return jnp.stack([jnp.mean(e_data), jnp.mean(e_neg)])


def _loss_terms(means: jax.Array, energy_l2: float):
    gap = means[0] - means[1]
    centre = 0.5 * (means[0] + means[1])
    return gap + energy_l2 * centre**2, (gap, means[0], means[1])


def surrogate_loss(energy, batch: jax.Array, negatives: jax.Array, energy_l2: float = 0.0):
    """``mean E(batch) − mean E(negatives) + α c²`` with ``c = ½ (mean E(batch) + mean
    E(negatives))``, the centre of the energies.

    With ``negatives`` drawn from the model (and held fixed: no gradient flows into them), the
    gradient of the first two terms is an unbiased estimate of the NLL gradient
    ``E_data[∇E] − E_model[∇E]``. ``step`` does not differentiate this function as a whole:
    ``surrogate_grad`` sends the gradient of ``α c²`` only to the energy's free constants.
    Returns ``(loss, (energy_gap, mean E(batch), mean E(neg)))``.
    """
    return _loss_terms(_mean_energies(energy, batch, negatives), energy_l2)


def surrogate_grad(
    params, static, batch: jax.Array, negatives: jax.Array, energy_l2: float, free_constant
):
    """``((loss, aux), grads)`` of ``surrogate_loss`` for ``eqx.combine(params, static)``, the
    gradient of ``α c²`` masked by ``free_constant`` (see ``free_constants``).

    Every parameter gets the maximum-likelihood gradient; the free constants also get the
    penalty's, which moves E by a constant only. One forward pass, one (batched) backward pass
    per term.
    """
    means, pullback = jax.vjp(
        lambda p: _mean_energies(eqx.combine(p, static), batch, negatives), params
    )
    loss, aux = _loss_terms(means, energy_l2)
    if energy_l2 == 0:
        return (loss, aux), pullback(jnp.array([1.0, -1.0], means.dtype))[0]
    # d(α c²)/d(mean E) = α c for both means
    centre = 0.5 * (means[0] + means[1])
    cotangents = jnp.stack([jnp.array([1.0, -1.0], means.dtype), energy_l2 * centre * jnp.ones(2)])
    (both,) = jax.vmap(pullback)(cotangents)
    grads = jax.tree.map(lambda g, mask: g[0] + mask * g[1], both, free_constant)
    return (loss, aux), grads


def step(
    key: jax.Array, state: TrainState, batch: jax.Array, config: TrainConfig
) -> tuple[TrainState, StepInfo]:
    """One maximum-likelihood update (pure; jit with ``config`` static, e.g. ``eqx.filter_jit``).

    1. Start ``num_chains`` chains as ``config.negatives`` says and run ``num_mcmc_steps``
       sampler steps under the CURRENT energy (chain states are re-initialised, so no cached
       log-density from older parameters enters the Metropolis ratio).
    2. Gradient of ``mean E(batch) − mean E(stop_gradient(negatives))`` (+ the ``energy_l2``
       penalty on the free constants, ``surrogate_grad``), optimizer update, parameter
       average update, Robbins-Monro step-size update.
    3. If anything is non-finite, the update is rejected: the state is kept (only
       ``consecutive_nonfinite`` advances; see ``keep_if_finite``) and ``info.is_finite`` is
       False.

    Args:
        key: PRNG key for this step (``fit`` uses ``fold_in(key, step)``).
        state: current ``TrainState``.
        batch: ``(batch_size, *event_shape)`` data.
        config: static ``TrainConfig``.

    Returns:
        ``(new_state, StepInfo)``.
    """
    event_shape = _event_shape_of(batch)
    k_start, k_chains = jax.random.split(key)
    if config.sharding is not None:
        batch = jax.lax.with_sharding_constraint(batch, config.sharding)
    phase = _negative_phase(k_start, k_chains, state, batch, config)
    finals = phase.finals
    negatives = finals.reshape(config.num_chains, *event_shape)

    params, static = eqx.partition(state.energy, eqx.is_inexact_array)
    (loss, (gap, e_data, e_neg)), grads = surrogate_grad(
        params, static, batch, negatives, config.energy_l2, state.free_constant
    )
    updates, opt_state = config.optimizer.update(grads, state.opt_state, params)
    new_params = optax.apply_updates(params, updates)
    average, decay = moving_average(
        _params(state.average_energy), new_params, state.step, config.ema_decay
    )

    average_energy = eqx.combine(average, static)
    k_noise = jax.random.fold_in(k_start, 1)
    noise = state.base.sample(k_noise, config.num_chains)
    flat_negatives = finals.reshape(config.num_chains, -1)

    def log_z_loss(log_z):
        # log Z of the AVERAGED energy (the one returned); the chains sample the current one,
        # which the average follows closely once the learning rate has decayed
        def energy_flat(z):
            return average_energy(z.reshape(event_shape))

        return nce_log_z_loss(log_z, energy_flat, flat_negatives, noise, state.base)

    log_z_grad = jax.grad(log_z_loss)(state.log_z)
    log_z_update, log_z_opt_state = _log_z_optimizer(config).update(
        log_z_grad, state.log_z_opt_state
    )
    log_z = state.log_z + log_z_update

    acceptance = phase.acceptance
    step_size = state.step_size
    if config.runs_chains:
        step_size = adapt_step_size(step_size, acceptance, config.sampler, config.step_size_gain)

    proposed = TrainState(
        step=state.step + 1,
        energy=eqx.combine(new_params, static),
        average_energy=average_energy,
        opt_state=opt_state,
        bank=_negatives.update_bank(config.negatives, state.bank, finals, phase.rows),
        step_size=step_size,
        base=state.base,
        consecutive_nonfinite=jnp.zeros((), jnp.int32),
        log_z=log_z,
        average_log_z=decay * state.average_log_z + (1 - decay) * log_z,
        log_z_opt_state=log_z_opt_state,
        generator=phase.generator,
        generator_opt_state=phase.generator_opt_state,
        free_constant=state.free_constant,
    )
    finite = (
        jnp.isfinite(loss)
        & _all_finite(grads)
        & _all_finite(phase.generator_grads)
        & _all_finite(proposed)
    )
    new_state = keep_if_finite(finite, proposed, state)

    terms = phase.generator_terms
    info = StepInfo(
        loss=loss,
        energy_gap=gap,
        energy_data=e_data,
        energy_negatives=e_neg,
        acceptance_rate=acceptance,
        step_size=state.step_size,
        grad_norm=optax.tree.norm(grads),
        langevin_grad_norm=phase.langevin_grad_norm,
        is_finite=finite,
        log_z=new_state.average_log_z,
        generator_energy=terms.energy,
        generator_entropy=terms.entropy,
        amortization=terms.amortization,
        resampling_ess=phase.resampling_ess,
        heldout_nll=jnp.full((), jnp.nan),
        recorded=phase.record,
    )
    if config.sharding is not None and info.recorded is not None:
        # the host reads the records: with several processes each needs the whole of them
        info = info._replace(
            recorded=jax.lax.with_sharding_constraint(info.recorded, _replicated(config.sharding))
        )
    return new_state, info


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


def adapt_step_size(step_size, acceptance, sampler: _samplers.Sampler, gain: float):
    """Robbins-Monro ``log h ← log h + gain · (acceptance − target)``, clipped to
    ``samplers.STEP_SIZE_BOUNDS`` (unchanged for kernels that do not adapt)."""
    log_h = jnp.log(step_size)
    if sampler.adapts:
        log_h = log_h + gain * (acceptance - sampler.target)
    low, high = _samplers.STEP_SIZE_BOUNDS
    return jnp.clip(jnp.exp(log_h), low, high).astype(step_size.dtype)


def keep_if_finite(finite, proposed, state):
    """``proposed`` if ``finite``, else ``state`` with only ``consecutive_nonfinite`` advanced
    (both states need ``step`` and that field). A rejected step does not count as training:
    ``step`` stays at the last accepted step, and the retry gets a new key
    (``attempt_key``)."""
    rejected = state._replace(consecutive_nonfinite=state.consecutive_nonfinite + 1)
    return _select(finite, proposed, rejected)


def _select(pred, new, old):
    """``new`` where ``pred`` else ``old``, leaf by leaf over the arrays; the non-array leaves
    (static: an energy's activation function, say) are the same in both and kept."""
    new_arrays, static = eqx.partition(new, eqx.is_array)
    old_arrays = eqx.filter(old, eqx.is_array)
    chosen = jax.tree.map(lambda n, o: jnp.where(pred, n, o), new_arrays, old_arrays)
    return eqx.combine(chosen, static)


def attempt_key(key: jax.Array, step: jax.Array, num_rejected: jax.Array) -> jax.Array:
    """The PRNG key of an attempt at training step ``step``: ``fold_in(key, step)`` for the
    first attempt; after ``num_rejected`` consecutive rejected attempts (``keep_if_finite``),
    also folded with ``num_rejected``, so a retry draws a new batch and new chains instead of
    repeating the rejected step exactly. Both numbers are in the training state, so a resumed
    run retries exactly as an uninterrupted one."""
    step_key = jax.random.fold_in(key, step)
    return jax.lax.cond(
        num_rejected > 0,
        lambda k: jax.random.fold_in(k, num_rejected),
        lambda k: k,
        step_key,
    )


class _NegativePhase(NamedTuple):
    finals: jax.Array  # (num_chains, D) negatives, no gradient
    rows: jax.Array | None  # replay-bank rows the chains came from
    acceptance: jax.Array  # mean acceptance (NaN without chains)
    langevin_grad_norm: jax.Array
    generator: Any  # updated generator (or None)
    generator_opt_state: Any
    generator_grads: Any
    generator_terms: _generator.GeneratorLoss
    resampling_ess: jax.Array  # hybrid: ESS fraction of the importance weights (else NaN)
    record: ChainRecord | None  # the first config.num_recorded_chains chains


def _negative_phase(
    k_start: jax.Array, k_chains: jax.Array, state: TrainState, batch: jax.Array, config
) -> _NegativePhase:
    """Negatives for this step from chains, the generator, or both (``config.negatives``)."""
    event_shape = _event_shape_of(batch)
    logdensity = _samplers.flat_logdensity(state.energy, event_shape)
    nan = jnp.full((), jnp.nan)
    no_terms = _generator.GeneratorLoss(nan, nan, nan)
    n_rec = config.num_recorded_chains

    def run_from(starts):
        if config.sharding is not None:
            starts = jax.lax.with_sharding_constraint(starts, config.sharding)
        chains = config.sampler.init_chains(starts, logdensity)
        chains, trace, _ = _samplers.run_chains(
            k_chains, config.sampler, logdensity, chains, state.step_size, config.num_mcmc_steps
        )
        # the chains' states cache ∇ₓ log p at their final positions: no extra gradient pass
        norm = jnp.mean(jnp.linalg.norm(chains.logdensity_grad, axis=1))
        finals = jax.lax.stop_gradient(chains.position)
        record = None
        if n_rec:
            info = _samplers.summarize(jax.tree.map(lambda a: a[:, :n_rec], trace))
            record = ChainRecord(finals[:n_rec], info)
        return finals, jnp.mean(trace.acceptance_rate), norm, record

    if not config.uses_generator:
        starts, rows = _negatives.chain_starts(
            k_start,
            config.negatives,
            state.bank,
            state.base,
            config.num_chains,
            config.reinit_fraction,
            batch.reshape(batch.shape[0], -1),
            num_kept=n_rec,
        )
        finals, acceptance, norm, record = run_from(starts)
        return _NegativePhase(
            finals, rows, acceptance, norm, None, None, None, no_terms, nan, record
        )

    generator = state.generator
    params, static = eqx.partition(generator, _generator.trainable(generator))
    z, eps = generator.sample_inputs(k_start, config.num_chains)

    def update_generator(target, weight):
        (_, (terms, updated, _)), grads = jax.value_and_grad(
            _generator.generator_loss, has_aux=True
        )(
            params,
            static,
            state.energy,
            z,
            eps,
            config.entropy,
            target=target,
            amortization_weight=weight,
            amortization_scale=_generator.data_scale(state.base.scale_tril),
        )
        updates, opt_state = config.generator_optimizer.update(
            grads, state.generator_opt_state, params
        )
        new_params = optax.apply_updates(params, updates)
        new_generator = eqx.combine(
            new_params, eqx.partition(updated, _generator.trainable(updated))[1]
        )
        return new_generator, opt_state, grads, terms

    if config.negatives == "generator":
        # Kim & Bengio's order: a generator step against the current energy, then the
        # negatives are the UPDATED generator's samples for the same z
        new_generator, opt_state, grads, terms = update_generator(None, 0.0)
        samples, _ = new_generator.generate(z, eps, train=True)
        finals = jax.lax.stop_gradient(samples)
        logdensities, grad_x = jax.vmap(jax.value_and_grad(logdensity))(finals)
        norm = jnp.mean(jnp.linalg.norm(grad_x, axis=1))
        record = None
        if n_rec:
            ones = jnp.ones((n_rec,), finals.dtype)
            info = _samplers.ChainInfo(
                acceptance_rate=jnp.nan * ones,
                is_divergent=jnp.zeros((n_rec,), bool),
                logdensity=logdensities[:n_rec],
                hamiltonian=jnp.nan * ones,
                step_size=jnp.nan * ones,
                num_integration_steps=jnp.zeros((n_rec,), jnp.int32),
            )
            record = ChainRecord(finals[:n_rec], info)
        return _NegativePhase(
            finals, None, nan, norm, new_generator, opt_state, grads, terms, nan, record
        )

    # hybrid: generator samples start the chains; the refined negatives train the energy and
    # pull the generator (amortization) while its KL objective keeps it on the model
    # one forward pass: the noise enters after the network, x = G(z) + σ ⊙ ε
    means, _ = generator.generate(z, jnp.zeros_like(eps), train=True)
    samples = means + jnp.exp(generator.log_noise_scale) * eps if generator.noisy else means
    ess = nan
    if config.resample and generator.noisy:
        resampled = _generator.resample_towards_model(
            jax.random.fold_in(k_start, 3),
            lambda v: -logdensity(v),
            means,
            generator.log_noise_scale,
            samples,
        )
        samples, ess = resampled.samples, resampled.ess
    finals, acceptance, norm, record = run_from(samples)
    new_generator, opt_state, grads, terms = update_generator(finals, config.amortization_weight)
    return _NegativePhase(
        finals, None, acceptance, norm, new_generator, opt_state, grads, terms, ess, record
    )


def heldout_nll(energy, log_z, data: jax.Array) -> jax.Array:
    """``mean E(data) + log_z``: the held-out negative log-likelihood per point (nats)."""
    return jnp.mean(jax.vmap(energy)(data)) + log_z


def _run_steps(key, state, data, config, num_steps_total, length, validation=None):
    """``length`` steps in one ``lax.scan``; steps at index >= ``num_steps_total`` are no-ops.

    Returns ``(state, (infos, active))``: ``infos`` stacks the ``StepInfo`` of every step and
    ``active`` says which steps ran.
    """

    # lax.scan carries arrays only: the non-array leaves (e.g. an eqx.nn.MLP's activation)
    # stay outside the carry, as in equinox's filtered transformations
    carry, static = eqx.partition(state, eqx.is_array)

    def body(carry, _):
        state = eqx.combine(carry, static)
        step_key = attempt_key(key, state.step, state.consecutive_nonfinite)
        k_batch, k_step = jax.random.split(step_key)
        rows = jax.random.randint(k_batch, (config.batch_size,), 0, data.shape[0])
        new_state, info = step(k_step, state, data[rows], config)
        if validation is not None:
            nll = jax.lax.cond(
                info.is_finite & (new_state.step % config.record_every == 0),
                lambda s: heldout_nll(s.average_energy, s.average_log_z, validation),
                lambda s: jnp.full((), jnp.nan, s.average_log_z.dtype),
                new_state,
            )
            info = info._replace(heldout_nll=nll)
        active = state.step < num_steps_total
        new_state = _select(active, new_state, state)
        return eqx.filter(new_state, eqx.is_array), (info, active)

    carry, outputs = jax.lax.scan(body, carry, None, length=length)
    return eqx.combine(carry, static), outputs


def _run_steps_donated(inputs, state, config, num_steps_total, length):
    """``_run_steps`` with the state's buffers donated: XLA writes the new state into them, so
    chains, parameters and optimizer state are not held twice. ``inputs = (key, data,
    validation)`` comes first and is never donated."""
    key, data, validation = inputs
    return _run_steps(key, state, data, config, num_steps_total, length, validation)


_run_steps_jit = eqx.filter_jit(_run_steps_donated, donate="all-except-first")


def _own_buffers(state: TrainState) -> TrainState:
    """A copy of ``state`` whose array leaves share no buffer with each other or with the
    caller's objects (``init`` puts the user's energy in two fields): donation needs that."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, state)


def chain_sharding(devices, num_chains: int, batch_size: int):
    """``NamedSharding`` splitting a leading chain/batch axis over ``devices`` (None for one)."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) <= 1:
        return None
    n = len(devices)
    if num_chains % n or batch_size % n:
        raise ValueError(
            f"with {n} devices, num_chains ({num_chains}) and batch_size ({batch_size}) must be "
            f"multiples of {n}; or pass devices=jax.devices()[:1]"
        )
    mesh = jax.sharding.Mesh(np.array(devices), ("chains",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("chains"))


def _replicated(sharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())


def _host_readable(state: TrainState, sharding) -> TrainState:
    """``state`` with every array whole on every process (multi-host runs shard the chains
    over processes; checkpoints and the returned result need them all). Collective: every
    process must call it."""
    if sharding is None or jax.process_count() == 1:
        return state
    arrays, static = eqx.partition(state, eqx.is_array)
    arrays = jax.jit(lambda s: s, out_shardings=_replicated(sharding))(arrays)
    return eqx.combine(arrays, static)


class TrainingDivergedError(RuntimeError):
    """Training produced non-finite values too many steps in a row.

    Attributes:
        state: the last good ``TrainState`` (rejected steps never modify it).
        history: metrics up to the failure.
    """

    def __init__(self, message: str, state: TrainState, history: dict):
        super().__init__(message)
        self.state = state
        self.history = history


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: a file is damaged, truncated or inconsistent with the
    others. ``path`` names the file (or the folder); ``problem`` says what is wrong with it.
    Nothing is deleted when it is raised."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


@dataclass
class FitResult:
    """What ``fit`` returns.

    Attributes:
        energy: the trained energy (parameter average if ``ema_decay`` is set).
        last_energy: the last iterate's energy.
        chains: final negative-phase positions ``(num_chains or buffer_size, *event_shape)``.
        history: dict of ``(num_steps,)`` numpy arrays, one per ``StepInfo`` field.
        state: the final ``TrainState`` (for resuming or inspection).
        config: the ``TrainConfig`` used.
        event_shape: shape of one event.
        log_z: ``LogZEstimate`` of ``log Z`` of ``energy`` learned during training by
            noise-contrastive estimation (``nce_log_z_loss``; ``stderr`` is NaN: it is a
            stochastic-approximation iterate, not an estimator with an error bar). Reliable in
            low dimension only: with its Gaussian noise it was ~18 nats off on 64-D digits; use
            ``calibrate_log_z=True`` (AIS) beyond a few dimensions.
        log_z_ais: AIS recalibration at the end (``fit(..., calibrate_log_z=True)``) or None.
        generator: the trained ``numpyro_ebm.generator.Generator`` (``"generator"`` and
            ``"hybrid"`` negatives; else None): ``generator(key, n)`` draws ``(n,
            *event_shape)`` fast approximate samples.
        recorded_chains: ``samplers.Draws`` (numpy) of the recorded negative-phase chains,
            positions ``(num_recorded_chains, num_steps // record_every, *event_shape)``, one
            draw every ``record_every`` training steps (``Draws.step``); None if none were
            recorded. For persistent negatives each is one chain followed through training;
            for the other kinds a "chain" is a slot of the negative batch. See
            ``numpyro_ebm.diagnostics``.
    """

    energy: Any
    last_energy: Any
    chains: jax.Array
    history: dict
    state: TrainState
    config: TrainConfig
    event_shape: tuple[int, ...]
    log_z: Any = None
    log_z_ais: Any = None
    generator: Any = None
    recorded_chains: _samplers.Draws | None = None

    def distribution(self, log_z=None) -> EnergyDistribution:
        """``EnergyDistribution`` with the trained energy and ``log_z`` (default: the AIS
        recalibration if it was run, else the learned ``log_z``); its chains start at the
        generator's samples when there is a generator."""
        if log_z is None:
            best = self.log_z_ais if self.log_z_ais is not None else self.log_z
            log_z = None if best is None else getattr(best, "value", best)
        return EnergyDistribution(
            self.energy,
            self.event_shape,
            log_z=log_z,
            sampler=self.config.sampler,
            initializer=self.generator,
        )


# -- checkpoints -----------------------------------------------------------------------------
#
# Layout of a checkpoint folder: one sub-folder per checkpoint, ``step-00000080/`` holding
# ``state.eqx``, ``history.npz`` and ``meta.json`` (which records the other two files' sizes and
# SHA-256), and the pointer file ``latest`` naming the current one. A save writes a complete new
# sub-folder under a temporary name, renames it, then replaces the pointer (the one atomic
# switch), and only then removes older sub-folders: a crash at any point leaves the pointer on
# a complete checkpoint, the new one or the previous one.

_STATE_FILE = "state.eqx"
_RECORDED_PREFIX = "recorded."  # recorded-chain arrays share history.npz under this prefix
_HISTORY_FILE = "history.npz"
_META_FILE = "meta.json"
_POINTER_FILE = "latest"
_STEP_FOLDER = re.compile(r"step-\d{8,}(\.\d+)?")  # the only sub-folders a save ever removes
_TMP_FOLDER = ".tmp-step-"
_TMP_POINTER = ".tmp-latest-"
# Sampler settings used only by EnergyDistribution.sample: they do not change training.
_SAMPLING_ONLY = ("num_warmup", "thinning", "num_chains", "init_scale")


def _manifest_entry(data: bytes) -> dict:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def save_checkpoint(folder: str, state: TrainState, history: dict, meta: dict) -> None:
    """Write ``state``, ``history`` and ``meta`` (JSON-able; must hold ``"step"``) as one new
    checkpoint of ``folder``, atomically as a set.

    The three files go into a new sub-folder ``step-<step>/`` (fsynced, under a temporary name
    until complete); then the pointer file ``latest`` is replaced to name it (the switch), and
    only then are older ``step-*`` sub-folders removed. A crash at any point leaves ``latest``
    on a complete checkpoint. Nothing else in ``folder`` is touched.
    """
    os.makedirs(folder, exist_ok=True)
    state_buffer, history_buffer = io.BytesIO(), io.BytesIO()
    eqx.tree_serialise_leaves(state_buffer, state)
    np.savez(history_buffer, **history)
    files = {_STATE_FILE: state_buffer.getvalue(), _HISTORY_FILE: history_buffer.getvalue()}
    meta = {**meta, "files": {name: _manifest_entry(data) for name, data in files.items()}}
    files[_META_FILE] = (json.dumps(meta, indent=1) + "\n").encode()  # last: it vouches for all
    tmp = tempfile.mkdtemp(dir=folder, prefix=_TMP_FOLDER)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes the folder private; checkpoints are not
        for name, data in files.items():
            _io.write_synced(os.path.join(tmp, name), data)
        _io.fsync_folder(tmp)
        name = _free_step_name(folder, int(meta["step"]))
        os.rename(tmp, os.path.join(folder, name))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _io.fsync_folder(folder)
    _io.atomic_write(
        os.path.join(folder, _POINTER_FILE), lambda f: f.write(name + "\n"), "w", _TMP_POINTER
    )
    _remove_older(folder, keep=name)


def _free_step_name(folder: str, step: int) -> str:
    """``step-<step>``, or ``step-<step>.<n>`` when a checkpoint of that step exists already
    (a run that diverged is saved again at its last accepted step)."""
    name = f"step-{step:08d}"
    n = 0
    while os.path.lexists(os.path.join(folder, name if n == 0 else f"{name}.{n}")):
        n += 1
    return name if n == 0 else f"{name}.{n}"


def _remove_older(folder: str, keep: str) -> None:
    """Remove the sub-folders and temporary files of earlier saves (the library's own names
    only), all but ``keep``."""
    for entry in os.listdir(folder):
        path = os.path.join(folder, entry)
        if entry == keep or os.path.islink(path):
            continue
        if os.path.isdir(path) and (_STEP_FOLDER.fullmatch(entry) or entry.startswith(_TMP_FOLDER)):
            shutil.rmtree(path)
        elif entry.startswith(_TMP_POINTER) and os.path.isfile(path):
            os.remove(path)


def latest_checkpoint(folder: str) -> str | None:
    """The folder holding the current checkpoint of ``folder`` (``folder/step-<step>``; a
    checkpoint of the previous layout, with the files directly in ``folder``: ``folder``
    itself), or None when there is none.

    Raises:
        CheckpointError: the pointer file is damaged or names no checkpoint.
    """
    pointer = os.path.join(folder, _POINTER_FILE)
    if not os.path.lexists(pointer):
        return folder if os.path.lexists(os.path.join(folder, _META_FILE)) else None
    try:
        with open(pointer, encoding="utf-8") as f:
            name = f.read(4096).strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(pointer, f"cannot be read ({err})") from err
    if not _STEP_FOLDER.fullmatch(name) or not os.path.isdir(os.path.join(folder, name)):
        raise CheckpointError(
            pointer, f"does not name a checkpoint folder of {folder} (it holds {name[:40]!r})"
        )
    return os.path.join(folder, name)


def _read_meta(checkpoint: str) -> dict:
    path = os.path.join(checkpoint, _META_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise TypeError(f"a JSON object was expected, not {type(meta).__name__}")
        if not (isinstance(meta["step"], int) and meta["step"] >= 0):
            raise ValueError(f"step {meta['step']!r} is not a step number")
        if not isinstance(meta.get("files", {}), dict):
            raise TypeError("its 'files' entry is not a JSON object")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(path, f"cannot be read ({type(err).__name__}: {err})") from err
    return meta


def _read_verified(checkpoint: str, name: str, meta: dict) -> bytes:
    """A checkpoint file's bytes, checked against the size and hash ``meta`` recorded."""
    path = os.path.join(checkpoint, name)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise CheckpointError(path, f"cannot be read ({err})") from err
    entry = meta.get("files", {}).get(name)
    if entry is not None and _manifest_entry(data) != entry:
        raise CheckpointError(
            path,
            f"is damaged or truncated ({len(data)} bytes; {entry.get('bytes')} were written, "
            "and its SHA-256 differs)",
        )
    return data


def checkpoint_step(folder: str | os.PathLike) -> int | None:
    """The step of the current checkpoint in ``folder`` (None when there is none).

    Checks the whole checkpoint (pointer, meta data and the recorded size and SHA-256 of the
    state and history files) without building the state.

    Raises:
        CheckpointError: a damaged, truncated or missing checkpoint file (named).
    """
    checkpoint = latest_checkpoint(os.fspath(folder))
    if checkpoint is None:
        return None
    meta = _read_meta(checkpoint)
    for name in (_STATE_FILE, _HISTORY_FILE):
        _read_verified(checkpoint, name, meta)
    return meta["step"]


def load_checkpoint(
    folder: str, like: TrainState, expected: dict | None = None
) -> tuple[TrainState, dict, dict] | None:
    """Read the current checkpoint of ``folder`` (``None`` if it has none).

    Args:
        folder: a folder written by ``save_checkpoint`` (or by the previous version, with the
            files directly in it).
        like: a ``TrainState`` of the same structure (e.g. ``init``'s).
        expected: the run's settings (``{"config": TrainConfig.describe(), ...}``); they are
            compared by name with the stored ones before the state is read (``ValueError``
            naming each differing setting with both values; a setting the checkpoint does
            not record matches its default).

    Returns:
        ``(state, history, meta)``.

    Raises:
        CheckpointError: a damaged, truncated or inconsistent file (named); nothing is deleted.
    """
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        return None
    meta = _read_meta(checkpoint)
    if expected is not None:
        differences = _setting_differences(meta, expected)
        if differences:
            raise ValueError(
                f"{folder} holds a checkpoint of a run with different settings "
                f"({'; '.join(differences)}); use the same settings to resume it, or another "
                "checkpoint_dir"
            )
    state_path = os.path.join(checkpoint, _STATE_FILE)
    data = _read_verified(checkpoint, _STATE_FILE, meta)
    try:
        state = eqx.tree_deserialise_leaves(io.BytesIO(data), like)
    except Exception as err:  # truncated or foreign file: equinox/numpy raise various types
        raise CheckpointError(state_path, f"cannot be read ({type(err).__name__}: {err})") from err
    history_path = os.path.join(checkpoint, _HISTORY_FILE)
    data = _read_verified(checkpoint, _HISTORY_FILE, meta)
    try:
        with np.load(io.BytesIO(data)) as npz:
            history = {k: npz[k] for k in npz.files}
    except Exception as err:  # truncated zip, bad header: numpy raises various types
        raise CheckpointError(
            history_path, f"cannot be read ({type(err).__name__}: {err})"
        ) from err
    columns = [v for k, v in history.items() if not k.startswith(_RECORDED_PREFIX)]
    rows = meta.get("history_rows", meta["step"])  # the previous version: one row per step
    if int(state.step) != meta["step"] or any(len(v) != rows for v in columns):
        raise CheckpointError(
            checkpoint,
            f"inconsistent checkpoint (state step {int(state.step)}, meta step {meta['step']}, "
            f"{rows} history rows expected)",
        )
    return state, history, meta


def _flat_settings(settings: dict, prefix: str = "") -> dict:
    """``{"config": {"sampler": {"kernel": ...}}}`` -> ``{"sampler.kernel": ...}`` (the
    ``config`` level is dropped: its settings are named as ``fit``'s arguments are)."""
    out = {}
    for key, value in settings.items():
        name = key if key == "config" and not prefix else f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_settings(value, "" if name == "config" else f"{name}."))
        else:
            out[name] = value
    return out


def _named_settings(meta: dict) -> dict:
    """The settings in a checkpoint's meta data (or in ``fit``'s expected meta data), by name."""
    settings = {k: meta[k] for k in ("config", "event_shape") if k in meta}
    config = settings.get("config")
    if isinstance(config, dict):  # the previous version stored reprs of these two
        config = dict(config)
        for name in ("sampler", "entropy"):
            if isinstance(config.get(name), str):
                config[name] = _settings_from_repr(config[name])
        settings["config"] = config
    rates = meta.get("learning_rates")
    if isinstance(rates, list) and len(rates) == 2:
        settings["learning_rate"], settings["generator_learning_rate"] = rates
    return _flat_settings(settings)


def _settings_from_repr(text: str):
    """``"Sampler(kernel='mala', step_size=0.05, ...)"`` -> the settings ``describe`` gives
    (``"None"`` -> None); the text itself when it is not of that form."""
    try:
        node = ast.parse(text, mode="eval").body
        if isinstance(node, ast.Constant) and node.value is None:
            return None
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            return text
        fields = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    except (SyntaxError, ValueError):
        return text
    if node.func.id == _samplers.Sampler.__name__:
        return {k: v for k, v in fields.items() if k not in _SAMPLING_ONLY}
    return {"name": node.func.id, **fields}


def _setting_default(name: str):
    """The default of a ``TrainConfig`` setting (``"sampler.step_size"`` for a field of the
    sampler), JSON-encoded; ``dataclasses.MISSING`` when it has none."""
    cls = TrainConfig
    *owners, last = name.split(".")
    for owner in owners:
        owner_field = {f.name: f for f in dataclasses.fields(cls)}.get(owner)
        if owner_field is None or owner_field.default_factory is dataclasses.MISSING:
            return dataclasses.MISSING
        cls = type(owner_field.default_factory())
    if not dataclasses.is_dataclass(cls):
        return dataclasses.MISSING
    setting = {f.name: f for f in dataclasses.fields(cls)}.get(last)
    if setting is None or setting.default is dataclasses.MISSING:
        return dataclasses.MISSING
    return json.loads(json.dumps(setting.default))


def _setting_differences(meta: dict, expected: dict) -> list[str]:
    """``"name: stored -> wanted"`` for each setting the run wants that the checkpoint has
    otherwise. A setting the checkpoint lacks (written before the setting existed) matches its
    default; settings the run no longer has are ignored."""
    stored = _named_settings(meta)
    wanted = _named_settings(json.loads(json.dumps(expected)))  # tuples -> lists, as stored
    differences = []
    for name, new in wanted.items():
        if name in stored:
            if stored[name] != new:
                differences.append(f"{name}: {stored[name]} -> {new}")
            continue
        owner = name.split(".")[0]
        inside = {k: v for k, v in stored.items() if k.startswith(f"{name}.")}
        if owner != name and owner in stored:  # e.g. entropy None -> an estimator
            differences.append(f"{owner}: {stored[owner]} -> {new!r} for {name}")
        elif inside:  # e.g. an estimator -> entropy None
            differences.append(f"{name}: {inside} -> {new}")
        else:
            default = _setting_default(name)
            if default is not dataclasses.MISSING and default != new:
                differences.append(f"{name}: {default} (its default; not recorded) -> {new}")
    return differences


@contextlib.contextmanager
def _checkpoint_lock(folder: str):
    """Hold ``folder``'s lock (``_io.folder_lock``), creating the folder if needed; if it was
    created here and no checkpoint was written, remove it again (and the parents created with
    it) on the way out."""
    created = []
    path = os.path.abspath(folder)
    while not os.path.lexists(path):
        created.append(path)
        path = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    try:
        with folder_lock(folder):
            try:
                yield
            finally:
                if created and os.listdir(folder) == [LOCK_FILE]:
                    os.remove(os.path.join(folder, LOCK_FILE))  # still held: no writer waits
    finally:
        for path in created:  # innermost first; a folder someone else filled stays
            try:
                os.rmdir(path)
            except OSError:
                break


def _one_writer(fit_function):
    """``fit`` holding ``checkpoint_dir``'s lock for the whole run (process 0 only: the one
    that writes), so a second writer fails before any compute."""

    @functools.wraps(fit_function)
    def locked(*args, checkpoint_dir=None, **kwargs):
        if checkpoint_dir is None or jax.process_index() != 0:
            return fit_function(*args, checkpoint_dir=checkpoint_dir, **kwargs)
        with _checkpoint_lock(os.fspath(checkpoint_dir)):
            return fit_function(*args, checkpoint_dir=checkpoint_dir, **kwargs)

    return locked


# -- the loop --------------------------------------------------------------------------------


@_one_writer
def fit(
    energy,
    data,
    *,
    key: jax.Array,
    num_steps: int = 2000,
    sampler: str | _samplers.Sampler = "mala",
    negatives: str = "persistent",
    num_chains: int = 1024,
    num_mcmc_steps: int = 20,
    batch_size: int = 1024,
    optimizer: optax.GradientTransformation | None = None,
    learning_rate: float = 5e-3,
    energy_l2: float = 0.01,
    ema_decay: float | None = 0.995,
    buffer_size: int = 10_000,
    reinit_fraction: float = 0.1,
    steps_per_call: int = 100,
    max_nonfinite: int = 10,
    progress_bar: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    devices: list | None = None,
    calibrate_log_z: bool = False,
    log_z_learning_rate: float = 0.01,
    generator: _generator.Generator | None = None,
    entropy: str | Callable = "nearest_neighbour",
    generator_optimizer: optax.GradientTransformation | None = None,
    generator_learning_rate: float = 1e-3,
    amortization_weight: float = 40.0,
    validation_data=None,
    num_recorded_chains: int = 8,
    record_every: int = 10,
    matmul_precision: str = "float32",
) -> FitResult:
    """Train ``energy`` on ``data`` by maximum likelihood with BlackJAX negative-phase chains.

    Args:
        energy: callable pytree, one event -> scalar (e.g. ``energies.MLPEnergy``, any
            ``eqx.Module``, or ``jax.tree_util.Partial(fn, params)``). Its floating-point array
            leaves are trained; every other leaf (activation functions, Python numbers) is
            static, as in ``eqx.partition(energy, eqx.is_inexact_array)``.
        data: ``(num_points, *event_shape)`` float array, finite.
        key: PRNG key (required; split once into an init key and a loop key, and the loop
            key is folded with the step number, so a resumed run repeats the same trajectory).
        num_steps: parameter updates (accepted ones: a step rejected as non-finite is retried
            with a new key and does not count). Resuming from ``checkpoint_dir`` with a larger
            ``num_steps`` extends the run; the default optimizers keep the cosine schedule of
            the ``num_steps`` the run started with, so the extra steps run at its final
            learning rate (10% of the peak) and the first steps stay as they were.
        sampler: ``"mala"`` (default), ``"hmc"``, ``"ula"``, ``"barker"`` or a ``Sampler``.
        negatives: ``"persistent"`` (default), ``"replay"`` or ``"short_run"`` (MCMC chains);
            ``"generator"`` (Kim & Bengio: a generator's samples, no MCMC) or ``"hybrid"``
            (generator samples start ``num_mcmc_steps`` of MCMC; see ``TrainConfig``).
        num_chains: negative-phase chains (generator samples) per step.
        num_mcmc_steps: sampler steps per update.
        batch_size: data points per update (sampled with replacement).
        optimizer: optax transformation; ``None`` uses ``default_optimizer(num_steps,
            learning_rate)`` (Adam β₁=0.5, clipping at 1, cosine decay).
        learning_rate: peak learning rate of the default optimizer (finite, > 0; as are the
            other learning rates).
        energy_l2: weight of the penalty pinning the energy's free additive constant; it
            does not bias the density (see ``TrainConfig``).
        ema_decay: parameter-average decay, ``None`` for the last iterate (see ``TrainConfig``).
        buffer_size: replay bank size.
        reinit_fraction: share of chains restarted at data points each step (persistent and
            replay; see ``numpyro_ebm.negatives``).
        steps_per_call: updates per compiled call (one host round-trip each).
        max_nonfinite: stop after this many consecutive rejected (non-finite) steps (>= 1).
        progress_bar: show a tqdm bar with live metrics.
        checkpoint_dir: folder for checkpoints (each an atomic unit: see
            ``save_checkpoint``); if it already holds one from the same settings, training
            resumes from it (or extends it, see ``num_steps``) on the same trajectory. ``fit``
            holds the folder's lock (``_io.folder_lock``) for the whole run.
        checkpoint_every: steps between checkpoints (default: every ``steps_per_call``).
        log_z_learning_rate: Adam learning rate of the learned (NCE) ``log Z``.
        calibrate_log_z: after training, also estimate ``log Z`` of the trained energy by AIS
            (``logz.ais`` with a base fitted to the data; ``FitResult.log_z_ais``).
        devices: devices to spread the chains and the batch over (default ``jax.devices()``).
            With more than one, ``num_chains`` and ``batch_size`` must be multiples of their
            number; parameters and data are replicated, each device runs its share of chains.
        generator: the ``Generator`` to train (generator modes). Default: latent dimension
            ``max(4, D)``, hidden ``(128, 128)``, batch norm, uniform latents; output noise
            (initial σ = 0.1) for ``"hybrid"`` and when the entropy estimator needs it. A
            hybrid's generator without noise is not resampled (see ``TrainConfig.resample``).
        entropy: ``"nearest_neighbour"`` (default; k-NN estimate on a noisy generator's
            output) or ``"batch_norm"`` (the paper's approximation), or an estimator object.
        generator_optimizer: optax transformation for the generator; ``None`` uses
            ``default_optimizer(num_steps, generator_learning_rate)``.
        generator_learning_rate: peak learning rate of the generator's default optimizer.
        amortization_weight: ``"hybrid"``: weight of the generator's pull towards the refined
            negatives, an energy distance divided by the data's RMS standard deviation (so,
            like the energy and entropy terms, it has no units; see ``TrainConfig``).
        validation_data: held-out ``(num_points, *event_shape)`` data; every ``record_every``
            steps the history's ``heldout_nll`` gets ``mean E(validation) + log Z`` of the
            averaged energy with the learned ``log Z`` (as reliable as that ``log Z``).
        num_recorded_chains: negative-phase chains recorded for diagnostics
            (``FitResult.recorded_chains``, ``numpyro_ebm.diagnostics``); 0 records none.
        record_every: record those chains every this many steps (in the compiled loop; the
            host receives them once per ``steps_per_call``).
        matmul_precision: ``"float32"`` (default: true float32 also on GPUs, where JAX
            would use TensorFloat-32), or ``"tensorfloat32"`` / ``"bfloat16"`` / ``"default"``
            for speed on large networks (see ``TrainConfig``).

    Returns:
        ``FitResult``.

    Raises:
        ValueError: bad data (NaN/inf, wrong dtype or shape) or bad settings, before any
            compute; a checkpoint of other settings (each differing setting named) or beyond
            ``num_steps``.
        TrainingDivergedError: ``max_nonfinite`` consecutive non-finite steps; carries the last
            good state (also written to ``checkpoint_dir``, marked diverged: rerunning it
            raises this error again at once).
        CheckpointError: a damaged, truncated or inconsistent checkpoint file (named).
        FolderLockedError: another process is writing to ``checkpoint_dir``.

    Example:
        >>> import jax, numpyro_ebm as ebm
        >>> data = ebm.datasets.toy("8gaussians").sample(jax.random.key(0), 5000)
        >>> energy = ebm.energies.MLPEnergy(2, key=jax.random.key(1))
        >>> res = ebm.fit(energy, data, key=jax.random.key(2), num_steps=200,
        ...               progress_bar=False)  # doctest: +SKIP
    """
    for name, value in (
        ("num_steps", num_steps),
        ("steps_per_call", steps_per_call),
        ("max_nonfinite", max_nonfinite),
    ):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    check_learning_rate("learning_rate", learning_rate)
    check_learning_rate("log_z_learning_rate", log_z_learning_rate)
    if negatives in _USES_GENERATOR:
        check_learning_rate("generator_learning_rate", generator_learning_rate)
    check_trainable(energy)
    data = validate_data(data)
    event_shape = _event_shape_of(data)
    if validation_data is not None:
        validation_data = validate_data(validation_data, event_shape, name="validation_data")
    check_energy(energy, event_shape)
    stored_meta = None
    if checkpoint_dir is not None:
        checkpoint_dir = os.fspath(checkpoint_dir)
        checkpoint = latest_checkpoint(checkpoint_dir)
        stored_meta = None if checkpoint is None else _read_meta(checkpoint)
    # the default optimizers' schedules keep the length the run started with (see Args)
    schedule_steps = _schedule_steps(stored_meta, num_steps, checkpoint_dir)
    sharding = chain_sharding(devices, num_chains, batch_size)
    uses_generator = negatives in _USES_GENERATOR
    entropy = _generator.get_entropy(entropy) if uses_generator else None
    k_init, k_loop = jax.random.split(key)
    default_generator_optimizer = generator_optimizer is None
    if uses_generator:
        generator = _check_generator(
            generator, event_shape, entropy, negatives, key=jax.random.fold_in(k_init, 2)
        )
        if generator_optimizer is None:
            generator_optimizer = default_optimizer(schedule_steps, generator_learning_rate)
    config = TrainConfig(
        sharding=sharding,
        optimizer=default_optimizer(schedule_steps, learning_rate)
        if optimizer is None
        else optimizer,
        sampler=_samplers.get_sampler(sampler),
        negatives=negatives,
        num_chains=num_chains,
        num_mcmc_steps=num_mcmc_steps,
        batch_size=batch_size,
        energy_l2=energy_l2,
        ema_decay=ema_decay,
        buffer_size=buffer_size,
        reinit_fraction=reinit_fraction,
        log_z_learning_rate=log_z_learning_rate,
        generator_optimizer=generator_optimizer if uses_generator else None,
        entropy=entropy,
        amortization_weight=amortization_weight,
        num_recorded_chains=num_recorded_chains,
        record_every=record_every,
        matmul_precision=matmul_precision,
    )
    state = init(k_init, energy, data, config, generator)
    history: dict[str, np.ndarray] = {name: np.zeros((0,)) for name in HISTORY_FIELDS}
    recorded: dict[str, np.ndarray] = {}
    meta = {
        "schedule_steps": schedule_steps,
        "num_steps": num_steps,
        "config": config.describe(),
        "event_shape": event_shape,
        # a custom optimizer is not comparable; the default ones are, by their learning rates
        "learning_rates": [
            learning_rate if optimizer is None else None,
            generator_learning_rate if uses_generator and default_generator_optimizer else None,
        ],
    }
    if stored_meta is not None:
        state, stored, stored_meta = load_checkpoint(checkpoint_dir, state, expected=meta)
        history = {k: v for k, v in stored.items() if not k.startswith(_RECORDED_PREFIX)}
        recorded = {
            k.removeprefix(_RECORDED_PREFIX): v
            for k, v in stored.items()
            if k.startswith(_RECORDED_PREFIX)
        }
        if stored_meta.get("diverged"):  # the same settings diverge again: say so at once
            raise TrainingDivergedError(
                f"{checkpoint_dir} holds a run that diverged after step {int(state.step)} "
                f"with these settings. {_DIVERGED_ADVICE}",
                state,
                history,
            )
    if sharding is not None:
        data = jax.device_put(data, _replicated(sharding))
        if validation_data is not None:
            validation_data = jax.device_put(validation_data, _replicated(sharding))
        arrays, static = eqx.partition(state, eqx.is_array)
        state = eqx.combine(jax.device_put(arrays, _replicated(sharding)), static)
        if config.negatives == "persistent":
            state = state._replace(bank=jax.device_put(state.bank, sharding))
    state = _own_buffers(state)  # donated to the first compiled call

    def save(state, history, recorded, diverged=False):
        if jax.process_index() == 0:  # one writer; multi-host runs share the folder
            records = _with_records(history, recorded)
            rows = len(history["is_finite"])  # accepted and rejected steps
            save_checkpoint(
                checkpoint_dir,
                state,
                records,
                {**meta, "step": int(state.step), "history_rows": rows, "diverged": diverged},
            )

    checkpoint_every = checkpoint_every or steps_per_call

    bar = None
    if progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, initial=int(state.step), desc="fit", unit="step")
    last_saved = int(state.step)
    try:
        while int(state.step) < num_steps:
            start_step = int(state.step)
            # the precision is read when the call is traced and lowered (and keys jit's cache)
            with jax.default_matmul_precision(config.matmul_precision):
                state, (infos, active) = _run_steps_jit(
                    (k_loop, data, validation_data), state, config, num_steps, steps_per_call
                )
            active = np.asarray(active)
            chunk = {k: np.asarray(getattr(infos, k))[active] for k in HISTORY_FIELDS}
            history = {k: np.concatenate([history[k], chunk[k]]) for k in history}
            accepted = chunk["is_finite"].astype(bool)
            if infos.recorded is not None:
                recorded = _append_records(
                    recorded, infos.recorded, active, accepted, start_step, config
                )
            num_bad = int(np.sum(~accepted))
            if bar is not None:
                bar.update(int(accepted.sum()))
                bar.set_postfix(
                    gap=f"{chunk['energy_gap'][-1]:.3f}",
                    acc=f"{chunk['acceptance_rate'][-1]:.2f}",
                    h=f"{chunk['step_size'][-1]:.3g}",
                    refresh=False,
                )
            if num_bad:
                warnings.warn(
                    f"{num_bad} non-finite training step(s) after step {start_step} were "
                    "rejected (parameters kept, the step retried with a new key); lower the "
                    "learning rate or step size, or raise energy_l2",
                    RuntimeWarning,
                    stacklevel=3,  # the caller of fit (through _one_writer)
                )
            if int(state.consecutive_nonfinite) >= max_nonfinite:
                state = _host_readable(state, sharding)
                if checkpoint_dir is not None:
                    save(state, history, recorded, diverged=True)
                raise TrainingDivergedError(
                    f"training diverged: {int(state.consecutive_nonfinite)} consecutive "
                    f"non-finite steps after step {int(state.step)}, the last accepted one (its "
                    f"parameters are in error.state). {_DIVERGED_ADVICE}",
                    state,
                    history,
                )
            step_now = int(state.step)
            if checkpoint_dir is not None and (
                step_now - last_saved >= checkpoint_every or step_now >= num_steps
            ):
                save(_host_readable(state, sharding), history, recorded)
                last_saved = step_now
    finally:
        if bar is not None:
            bar.close()
    state = _host_readable(state, sharding)

    chains = state.bank.reshape(-1, *event_shape)
    learned = _logz.LogZEstimate(float(state.average_log_z), float("nan"), "nce-learned")
    calibrated = None
    if calibrate_log_z:
        k_ais = jax.random.fold_in(k_init, 1)  # init consumed k_init itself; this is a new key
        calibrated = _logz.ais(state.average_energy, event_shape, key=k_ais, data=data)
    return FitResult(
        energy=state.average_energy,
        last_energy=state.energy,
        chains=chains,
        history=history,
        state=state,
        config=config,
        event_shape=event_shape,
        log_z=learned,
        log_z_ais=calibrated,
        generator=state.generator,
        recorded_chains=_draws_from_records(recorded, event_shape),
    )


def _append_records(recorded: dict, record: ChainRecord, active, accepted, start_step: int, config):
    """Add this call's records of the accepted steps that are multiples of
    ``config.record_every`` (``accepted``: which of the ``active`` steps were)."""
    steps = start_step + np.cumsum(accepted)  # the step count after each active attempt
    keep = accepted & (steps % config.record_every == 0)
    new = {"step": steps[keep], "positions": np.asarray(record.positions)[active][keep]}
    for name in _samplers.ChainInfo._fields:
        new[name] = np.asarray(getattr(record.info, name))[active][keep]
    if not recorded:
        return new
    return {k: np.concatenate([recorded[k], new[k]]) for k in new}


_DIVERGED_ADVICE = (
    "Rerunning with the same settings diverges again: lower learning_rate or the sampler's "
    "step_size, or raise energy_l2, and train into a new checkpoint_dir."
)


def _schedule_steps(stored_meta: dict | None, num_steps: int, folder: str | None) -> int:
    """The length of the default optimizers' schedules: ``num_steps`` for a new run, the
    stored one for a resumed or extended run (checked: ``num_steps`` cannot go back)."""
    if stored_meta is None:
        return num_steps
    step = stored_meta["step"]
    if step > num_steps:
        raise ValueError(
            f"{folder} holds a checkpoint at step {step}, beyond num_steps={num_steps}; pass "
            f"num_steps >= {step} to resume or extend it, or use another checkpoint_dir"
        )
    # the previous version recorded the schedule's length as num_steps
    steps = stored_meta.get("schedule_steps", stored_meta.get("num_steps"))
    if not (isinstance(steps, int) and steps >= 1):
        raise CheckpointError(
            os.path.join(latest_checkpoint(folder), _META_FILE),
            f"records no schedule length (schedule_steps {steps!r})",
        )
    return steps


def _with_records(history: dict, recorded: dict) -> dict:
    return {**history, **{_RECORDED_PREFIX + k: v for k, v in recorded.items()}}


def _draws_from_records(recorded: dict, event_shape) -> _samplers.Draws | None:
    """Draw-major records -> chain-major ``samplers.Draws`` (None when nothing was kept)."""
    if not recorded or len(recorded["step"]) == 0:
        return None
    num_draws, num_chains = recorded["positions"].shape[:2]
    positions = np.swapaxes(recorded["positions"], 0, 1).reshape(
        num_chains, num_draws, *event_shape
    )
    info = _samplers.ChainInfo(
        *(np.swapaxes(recorded[name], 0, 1) for name in _samplers.ChainInfo._fields)
    )
    return _samplers.Draws(positions, info, recorded["step"])


def _check_generator(generator, event_shape, entropy, negatives, *, key):
    """The given generator after checks, or the default one (see ``fit``)."""
    needs_noise = isinstance(entropy, _generator.NearestNeighbourEntropy)
    size = math.prod(event_shape)
    if generator is None:
        # the hybrid's importance resampling needs the noise too
        noisy = needs_noise or negatives == "hybrid"
        return _generator.Generator(
            event_shape, max(4, size), key=key, noise_scale=0.1 if noisy else None
        )
    if not isinstance(generator, _generator.Generator):
        raise TypeError(f"generator must be a numpyro_ebm.generator.Generator, got {generator!r}")
    if tuple(generator.event_shape) != tuple(event_shape):
        raise ValueError(
            f"generator makes events of shape {generator.event_shape}, the data has "
            f"{tuple(event_shape)}"
        )
    if needs_noise and not generator.noisy and generator.latent_dim < size:
        raise ValueError(
            "the nearest-neighbour entropy needs an output with a density in R^D: give the "
            "generator noise_scale=... (or latent_dim >= D)"
        )
    check_array_leaves(generator)
    return generator
