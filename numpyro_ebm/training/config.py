"""``TrainConfig``: every setting of a training run, in one hashable object.

``fit(energy, data, key=key, config=TrainConfig(...), **overrides)`` and
``MaximumLikelihood`` read it. The negative sampler, the objective and the optimizers can be
given by name or as configured objects; ``resolve`` turns the names (and the flat settings
such as ``num_chains``) into objects once the run's length is known.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax

from numpyro_ebm import negatives as _negatives
from numpyro_ebm import samplers as _samplers
from numpyro_ebm.logz.tracking import TrackerSettings
from numpyro_ebm.negatives._chains import DEFAULT_RECORDED_CHAINS, recorded_chains
from numpyro_ebm.training.objective import build_objective, describe_objective
from numpyro_ebm.validation import check_count, check_non_negative

__all__ = [
    "MATMUL_PRECISIONS",
    "TrainConfig",
    "check_learning_rate",
    "default_energy_l2",
    "default_optimizer",
]

MATMUL_PRECISIONS = ("float32", "tensorfloat32", "bfloat16", "default")


# the decay of each optimizer default_optimizer built (the key: the optimizer, equal to a copy
# of itself); TrainConfig tells resolve's own optimizer from a user's by it
_DEFAULT_DECAY: dict = {}


@functools.cache  # one object per setting: fit's compiled step is cached on the optimizer
def default_optimizer(
    num_steps: int, learning_rate: float = 5e-3, clip: float = 1.0, weight_decay: float = 0.0
):
    """Adam (β₁ = 0.5, as usual for EBMs) with gradient clipping and cosine decay to 10%;
    with ``weight_decay`` > 0, AdamW's decoupled weight decay (``optax.adamw``;
    ``TrainConfig.weight_decay``, 0 by default in ``fit``).

    The same arguments return the same object, so repeated ``fit`` calls with the default
    optimizer reuse the compiled training step instead of compiling it again."""
    check_weight_decay(weight_decay)
    schedule = optax.cosine_decay_schedule(learning_rate, max(num_steps, 1), alpha=0.1)
    if weight_decay:
        adam = optax.adamw(schedule, b1=0.5, b2=0.999, weight_decay=weight_decay)
    else:
        adam = optax.adam(schedule, b1=0.5, b2=0.999)
    optimizer = optax.chain(optax.clip_by_global_norm(clip), adam)
    _DEFAULT_DECAY[optimizer] = weight_decay
    return optimizer


def default_energy_l2(event_size: int) -> float:
    """``energy_l2``'s default for ``event_size``-dimensional data: ``min(0.01, 0.02 / D)``
    (0.01 in 1 and 2 dimensions, where it was tuned; 3.1e-4 for 64-D digits).

    The stabiliser ``α mean E²`` acts on the spread of the energies, which grows with the
    dimension (it is that of the data's log-density: ``D / 2`` for a Gaussian, far more for
    sharp data such as images), while a fixed ``α`` that keeps 2-D training stable holds a
    64-D energy back from sharpening (digits: 5.9 nats/image at 0.01 against 18 at 1e-4;
    ``benchmarks/real_data.py``, docs/benchmarks.md "Real tables").
    """
    return min(0.01, 0.02 / max(int(event_size), 1))


def is_real(value) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _built_decay(optimizer) -> float | None:
    """The decay ``default_optimizer`` built ``optimizer`` with; None for any other one."""
    try:
        return _DEFAULT_DECAY.get(optimizer)
    except TypeError:  # an unhashable optimizer is not one of default_optimizer's
        return None


def check_weight_decay(value) -> None:
    """A weight decay must be a finite number >= 0 (a ``ValueError`` naming it otherwise)."""
    if not (is_real(value) and 0 <= value < math.inf):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {value!r}")


def check_learning_rate(name: str, value) -> None:
    """A learning rate must be a finite number > 0 (a ``ValueError`` naming it otherwise)."""
    if not (is_real(value) and 0 < value < math.inf):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything static about a training run (hashable: it is a ``jit`` static argument).

    Attributes:
        optimizer: optax transformation for the parameters; None: ``default_optimizer(
            num_steps, learning_rate)`` (Adam β₁ = 0.5, clipping at 1, cosine decay).
        learning_rate: peak learning rate of the default optimizer.
        weight_decay: AdamW's decoupled weight decay in the default optimizer (0: Adam; see
            ``default_optimizer``): every parameter, the output bias included, shrinks by
            ``learning_rate × weight_decay`` per step. It holds back an energy that memorises
            a small training set (``tables.default_weight_decay``: 0.1 on tables with fewer
            than 100 training rows per column, as the command line trains them). It must be
            0 with a custom ``optimizer`` (add the decay to that optimizer instead).
        negatives: where the negatives come from: ``"persistent"``, ``"replay"``,
            ``"short_run"``, ``"generator"``, ``"hybrid"``, ``"contrastive_divergence"``,
            ``"parallel_tempering"``, ``"none"`` (``numpyro_ebm.negatives``), or a configured
            ``NegativeSampler`` (then the chain and generator settings below are its own).
            ``"auto"`` (default): ``"persistent"`` for an objective that needs negatives,
            ``"none"`` for one that does not (a sampler named for score matching runs its
            chains for their health metrics only).
        objective: ``"ml"`` (maximum likelihood), ``"sm"`` (score matching), ``"ssm"``
            (sliced score matching), ``"dsm"`` (denoising score matching), or an
            ``Objective`` (``training.objective``; e.g. ``DenoisingScoreMatching(0.3)``).
        sampler: the kernel of the negative-phase chains (a name or ``samplers.Sampler``).
        num_chains: negatives per step (chains, or generator samples).
        num_mcmc_steps: sampler steps per training step.
        batch_size: data points per step (``fit``: drawn with replacement).
        energy_l2: weight ``α`` of the stabiliser ``α (mean E(data)² + mean E(neg)²)`` per
            data point (the objective's ``penalty``; score matching's is ``α mean E(data)²``,
            which only pins the free constant the score cannot see), applied only to an
            energy with a free additive constant (``free_constants``, e.g. an MLP's output
            bias; an energy without one, ``GaussianEnergy`` or ``DeepEnergy``, gets none).
            None (default): ``default_energy_l2(D)`` for ``D``-dimensional data (``fit``
            passes ``D``: 0.01 up to 2-D, less in more dimensions). Without it,
            maximum-likelihood training of a flexible energy can run away: the energies'
            scale grows until the chains freeze. It also flattens the density, in proportion
            to its weight at the end of training (see ``energy_l2_decay`` and
            ``benchmarks/energy_l2_bias.py``).
        energy_l2_decay: the stabiliser's weight decays over the run like the default
            learning rate, ``α (f + (1 − f)(1 + cos(π t / T)) / 2)`` with ``T`` the schedule
            length, to the fraction ``f`` of ``energy_l2`` (default 0.1: the covariance of
            an MLP energy fitted to Gaussian data is then within 1% of the data's); None
            keeps it constant.
        ema_decay: decay of the parameter moving average returned as the trained model
            (``None``: the last iterate); the decay at step t is
            ``min(ema_decay, (1 + t) / (10 + t))``.
        buffer_size: replay bank size.
        reinit_fraction: replay: share of chains started at the batch each step instead of
            the bank; persistent: share of the chains that are not recorded restarted at the
            batch each step (the ``num_recorded_chains`` recorded ones never restart, so the
            share of all chains is ``reinit_fraction · (num_chains − num_recorded_chains) /
            num_chains``).
        step_size_gain: Robbins-Monro gain of the per-step step-size update (0: fixed).
        log_z_learning_rate: Adam learning rate of the noise-contrastive ``log Z`` (kept
            beside the tracked one, history column ``log_z_nce``).
        track_log_z: follow ``log Z`` of the averaged energy through training by sequential
            Monte Carlo along the trained energies (``logz.tracking``; history columns
            ``log_z``, ``log_z_stderr``, ``log_z_min_ess``, ``log_z_bridge_steps``).
        log_z_particles: the tracker's particles (each moved once per step).
        log_z_groups: its independent groups (their spread is the standard error).
        log_z_bridge_steps: the most sub-steps it splits one large update into.
        log_z_first_anchor: the step at which the tracker first re-anchors (restarts from
            the Gaussian fitted to the data), then at twice that, four times, ... (0: never).
        log_z_floor_samples: importance draws around the batch's rows for a 95% lower
            bound on ``log Z`` (``logz.bound``) that floors the tracked value (0: no floor).
        log_z_floor_every: the floor runs at every this many steps (default: every step).
            Its kernel sums cost more than the rest of the tracker on a CPU; thinning them
            cuts the cost and the floor's catches, and widens the fused error bar on the 2-D
            toys (``TrackerSettings.floor_every``; docs/benchmarks.md).
        log_z_floor_half_life: steps over which half of what the floor raised the tracked
            value by is released unless a later bound raises it again (0: never released;
            ``TrackerSettings.floor_half_life``).
        log_z_fuse_ess: the floor's importance estimate is fused with the tracked value (a
            Kalman update) while the running mean of its effective sample size is at least
            this fraction of ``log_z_floor_samples`` (None: never; ``TrackerSettings.fuse_ess``).
            On the 2-D toys this takes the error bar from about 0.03 nats to 0.003.
        generator_optimizer: optax transformation for the generator (generator modes); None:
            ``default_optimizer(num_steps, generator_learning_rate)``.
        generator_learning_rate: peak learning rate of the generator's default optimizer.
        entropy: the generator's entropy estimator (``numpyro_ebm.generator``).
        amortization_weight: ``"hybrid"``: weight of the generator's pull towards the refined
            negatives (scale-free, see ``negatives.Hybrid``).
        resample: ``"hybrid"``: importance-resample the generator's samples towards the model.
        num_temperatures: ``"parallel_tempering"``: replicas per ladder, from the model to the
            Gaussian fitted to the data (``num_chains`` ladders, ``num_mcmc_steps`` rounds).
        adapt_temperatures: ``"parallel_tempering"``: move the temperatures towards equal swap
            rejection each step.
        ladder_gain: ``"parallel_tempering"``: how far each step moves them (see
            ``negatives.ParallelTempering``).
        negatives_per_ladder: ``"parallel_tempering"``: negatives per ladder and step, the
            model slot after each of the last rounds.
        num_recorded_chains: negative-phase chains recorded for diagnostics each step, at
            most ``num_chains``; None (default): ``min(8, num_chains)``.
        record_every: keep every ``record_every``-th record and compute the held-out NLL then.
        matmul_precision: precision of float32 matrix products in the compiled step, one of
            ``MATMUL_PRECISIONS`` (``jax.default_matmul_precision``). ``"float32"`` (default)
            is true float32 everywhere: on NVIDIA GPUs since Ampere JAX would otherwise use
            TensorFloat-32 for them. The CPU ignores the setting.
        sharding: sharding of the chains' and the batch's leading axis across devices
            (``fit`` builds it from ``devices``); None: leave placement to JAX.
        conditional_negatives: the sampler of conditional sites when ``negatives`` cannot
            handle conditions: a configured ``NegativeSampler`` that handles them
            (``supports_conditions``, e.g. ``negatives.ContrastiveDivergence(...)``); None:
            contrastive divergence with the kernel, ``num_mcmc_steps`` and
            ``step_size_gain`` of ``negatives`` (for negatives without chains, this config's).
        schedule_steps: the length ``T`` of the run's schedules (set by ``resolve``).
    """

    optimizer: optax.GradientTransformation | None = None
    learning_rate: float = 5e-3
    weight_decay: float = 0.0
    negatives: Any = "auto"
    objective: Any = "ml"
    sampler: Any = "mala"
    num_chains: int = 1024
    num_mcmc_steps: int = 20
    batch_size: int = 1024
    energy_l2: float | None = None
    energy_l2_decay: float | None = 0.1
    ema_decay: float | None = 0.995
    buffer_size: int = 10_000
    reinit_fraction: float = 0.1
    step_size_gain: float = 0.2
    log_z_learning_rate: float = 0.01
    track_log_z: bool = True
    log_z_particles: int = 512
    log_z_groups: int = 8
    log_z_bridge_steps: int = 32
    log_z_first_anchor: int = 100
    log_z_floor_samples: int = 1024
    log_z_floor_every: int = 1
    log_z_floor_half_life: int = 5
    log_z_fuse_ess: float | None = 0.2
    generator_optimizer: optax.GradientTransformation | None = None
    generator_learning_rate: float = 1e-3
    entropy: Any = "nearest_neighbour"
    amortization_weight: float = 40.0
    resample: bool = True
    num_temperatures: int = 4
    adapt_temperatures: bool = True
    ladder_gain: float = 0.1
    negatives_per_ladder: int = 1
    num_recorded_chains: int | None = None
    record_every: int = 10
    matmul_precision: str = "float32"
    sharding: Any = None
    conditional_negatives: Any = None
    schedule_steps: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "sampler", _samplers.get_sampler(self.sampler))
        counts = ("num_chains", "num_mcmc_steps", "batch_size", "buffer_size", "record_every")
        for name in (*counts, "log_z_particles", "log_z_groups", "log_z_bridge_steps"):
            check_count(name, getattr(self, name))
        check_count("log_z_first_anchor", self.log_z_first_anchor, low=0)
        if self.num_recorded_chains is not None:
            check_count("num_recorded_chains", self.num_recorded_chains, low=0)
        _check_conditional_negatives(self.conditional_negatives)
        check_count("log_z_floor_samples", self.log_z_floor_samples, low=0)
        check_count("log_z_floor_every", self.log_z_floor_every)
        check_count("log_z_floor_half_life", self.log_z_floor_half_life, low=0)
        fuse = self.log_z_fuse_ess
        if fuse is not None and not (is_real(fuse) and 0.0 < fuse <= 1.0):
            raise ValueError(f"log_z_fuse_ess must be None or a number in (0, 1], got {fuse!r}")
        decay = self.energy_l2_decay
        if decay is not None and not (is_real(decay) and 0.0 <= decay <= 1.0):
            raise ValueError(f"energy_l2_decay must be None or a number in [0, 1], got {decay!r}")
        if self.energy_l2 is not None and not (
            is_real(self.energy_l2) and 0 <= self.energy_l2 < math.inf
        ):
            raise ValueError(
                f"energy_l2 must be None or a finite number >= 0, got {self.energy_l2!r}"
            )
        for name in ("learning_rate", "log_z_learning_rate", "generator_learning_rate"):
            check_learning_rate(name, getattr(self, name))
        check_weight_decay(self.weight_decay)
        check_non_negative("step_size_gain", self.step_size_gain)
        check_non_negative("amortization_weight", self.amortization_weight)
        # a resolved config carries resolve's own AdamW, built with this decay, as its optimizer
        own = self.optimizer is None or _built_decay(self.optimizer) == self.weight_decay
        if self.weight_decay and not own:
            raise ValueError(
                "weight_decay applies to the default optimizer; with a custom optimizer add "
                "the decay to it (e.g. optax.adamw) and leave weight_decay at 0"
            )
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be None or in [0, 1), got {self.ema_decay}")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(
                f"matmul_precision must be one of {MATMUL_PRECISIONS}, "
                f"got {self.matmul_precision!r}"
            )
        if isinstance(self.negatives, str) and self.negatives not in ("auto", *_negatives.KINDS):
            raise ValueError(
                f"unknown negatives {self.negatives!r}; choose one of {_negatives.KINDS} or "
                "pass a numpyro_ebm.negatives.NegativeSampler"
            )
        objective = build_objective(self.objective)  # a clear error now for an unknown name
        if objective.needs_negatives and self.negatives_name == "none":
            raise ValueError(
                f"the {objective.name!r} objective needs negatives: choose a sampler other "
                "than 'none' (or a score-matching objective)"
            )
        if self.track_log_z:
            self.log_z_tracker()  # a clear error now for bad tracker settings

    def replace(self, **changes) -> TrainConfig:
        """A copy with some settings changed (unknown names: ``TypeError``)."""
        return dataclasses.replace(self, **changes)

    @property
    def negatives_name(self) -> str:
        """The negative sampler's name (``"persistent"``, ...; ``"auto"`` resolved)."""
        if self.negatives == "auto":
            return "persistent" if build_objective(self.objective).needs_negatives else "none"
        return self.negatives if isinstance(self.negatives, str) else self.negatives.name

    @property
    def uses_generator(self) -> bool:
        return self.negatives_name in ("generator", "hybrid")

    @property
    def runs_chains(self) -> bool:
        return self.negatives_name not in ("generator", "none")

    def energy_l2_at(self, step):
        """The ``energy_l2`` weight at training step ``step`` (see ``energy_l2_decay``)."""
        if self.energy_l2_decay is None or self.schedule_steps is None:
            return self.energy_l2
        fraction = jnp.minimum(step.astype(jnp.float32) / self.schedule_steps, 1.0)
        cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * fraction))
        final = self.energy_l2_decay
        return self.energy_l2 * (final + (1.0 - final) * cosine)

    def log_z_optimizer(self) -> optax.GradientTransformation:
        return optax.adam(self.log_z_learning_rate)

    def log_z_tracker(self) -> TrackerSettings:
        """The ``logz.tracking`` settings of this run."""
        return TrackerSettings(
            num_particles=self.log_z_particles,
            num_groups=self.log_z_groups,
            max_bridge_steps=self.log_z_bridge_steps,
            first_anchor=self.log_z_first_anchor,
            floor_samples=self.log_z_floor_samples,
            floor_every=self.log_z_floor_every,
            floor_half_life=self.log_z_floor_half_life,
            fuse_ess=self.log_z_fuse_ess,
        ).check()

    def resolve(self, schedule_steps: int, generator=None, *, event_size=None) -> TrainConfig:
        """This config with the optimizer, the negative sampler and the objective as objects
        (default optimizers over ``schedule_steps``; ``generator``: the starting network of
        the generator modes, None for the default one) and ``energy_l2`` as a number
        (``default_energy_l2(event_size)``; without ``event_size``, the 2-D value)."""
        optimizer = self.optimizer or default_optimizer(
            schedule_steps, self.learning_rate, weight_decay=self.weight_decay
        )
        generator_optimizer = self.generator_optimizer
        if generator_optimizer is None and self.uses_generator:
            generator_optimizer = default_optimizer(schedule_steps, self.generator_learning_rate)
        skip = ("optimizer", "negatives", "objective")
        settings = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip
        }
        settings["num_recorded_chains"] = recorded_chains(self.num_chains, self.num_recorded_chains)
        negatives = self.negatives
        negatives = _negatives.build(
            self.negatives_name if negatives == "auto" else negatives,
            **settings,
            optimizer=generator_optimizer,
            generator=generator,
        )
        energy_l2 = self.energy_l2
        if energy_l2 is None:
            energy_l2 = default_energy_l2(2 if event_size is None else event_size)
        return self.replace(
            schedule_steps=schedule_steps,
            energy_l2=energy_l2,
            optimizer=optimizer,
            generator_optimizer=generator_optimizer,
            negatives=negatives,
            objective=build_objective(self.objective),
        )

    def describe_defaults(self) -> dict:
        """``describe``'s shape with every setting at its default (for this negative sampler's
        class): a checkpoint written before a setting existed matches it when the run uses
        the default."""
        defaults = {f.name: _field_default(f) for f in dataclasses.fields(self)}
        defaults["energy_l2"] = 0.01  # the default (in any dimension) before it followed D
        negatives = {"name": self.negatives_name}
        if isinstance(self.negatives, _negatives.NegativeSampler):
            for f in dataclasses.fields(self.negatives):
                if f.init and f.compare:
                    negatives[f.name] = _negatives.describe_value(_field_default(f))
            if negatives.get("num_recorded_chains", 0) is None:  # as stored before the default
                negatives["num_recorded_chains"] = DEFAULT_RECORDED_CHAINS  # followed num_chains
        keep = (
            "batch_size",
            "energy_l2",
            "energy_l2_decay",
            "ema_decay",
            "weight_decay",
            "log_z_learning_rate",
            "track_log_z",
            "log_z_particles",
            "log_z_groups",
            "record_every",
        )
        return {
            "negatives": negatives,
            "objective": "ml",
            **{name: defaults[name] for name in keep},
            "matmul_precision": defaults["matmul_precision"],
            "optimizer": "custom",
        }

    def describe(self) -> dict:
        """JSON-able settings by name of a RESOLVED config (a resumed run's are compared with
        its checkpoint's): the negative sampler's (``negatives.describe``), the objective's
        name and the core's own; optimizers are ``"custom"`` (not comparable) and
        ``sharding`` is left out (a run may resume on other devices)."""
        negatives = self.negatives
        objective = self.objective
        return {
            "negatives": _negatives.describe(negatives)
            if isinstance(negatives, _negatives.NegativeSampler)
            else negatives,
            "objective": describe_objective(build_objective(objective)),
            "batch_size": self.batch_size,
            "energy_l2": self.energy_l2,
            "energy_l2_decay": self.energy_l2_decay,
            "ema_decay": self.ema_decay,
            "weight_decay": self.weight_decay,
            "log_z_learning_rate": self.log_z_learning_rate,
            # the tracker's state has these shapes: a resumed run must match them
            "track_log_z": self.track_log_z,
            "log_z_particles": self.log_z_particles,
            "log_z_groups": self.log_z_groups,
            "record_every": self.record_every,
            "matmul_precision": self.matmul_precision,
            "optimizer": "custom",
        }


def _check_conditional_negatives(sampler) -> None:
    """``conditional_negatives`` must be None or a ``NegativeSampler`` that handles
    conditions (a ``ValueError`` naming the ones that do otherwise)."""
    if sampler is None or (
        isinstance(sampler, _negatives.NegativeSampler) and sampler.supports_conditions
    ):
        return
    kinds = [cls.__name__ for cls in _negatives.REGISTRY.values() if cls.supports_conditions]
    raise ValueError(
        "conditional_negatives must be None or a configured negative sampler that handles "
        f"conditions (one of {kinds}, e.g. ebm.negatives.ContrastiveDivergence("
        f"num_mcmc_steps=20)), got {sampler!r}"
    )


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None
