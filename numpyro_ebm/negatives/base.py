"""The negative-sampler interface: where the model samples of the likelihood gradient come from.

The maximum-likelihood gradient ``E_data[∇E] − E_model[∇E]`` needs samples of the current
model in every training step. A *negative sampler* supplies them. Like an optax
``GradientTransformation`` it is a pair of pure functions over a state it owns:

    state = negatives.init(key, data, base)                      # once, before training
    state, samples, info = negatives.sample(key, state, target)  # every training step

``target`` (a ``Target``) is the energy to sample under its CURRENT parameters (frozen: no
gradient flows into the samples), this step's data batch and the Gaussian fitted to the data.
``samples`` is ``(num_negatives, D)`` flat events; ``info`` is a ``NegativeInfo``. Both
functions run inside the compiled training step, so they must be jittable; the sampler object
itself is static (a frozen dataclass: equal settings compare equal, so a second ``fit`` reuses
the compiled step).

The implementations (``persistent``, ``replay``, ``short_run``, ``generator``, ``hybrid``,
``contrastive_divergence``) live one per module in this package. Adding one is a new frozen
dataclass subclassing ``NegativeSampler`` with these two methods; see docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax

from numpyro_ebm import samplers as _samplers
from numpyro_ebm.gaussian import GaussianBase

__all__ = [
    "ChainRecord",
    "NegativeInfo",
    "NegativeSampler",
    "Target",
    "describe",
    "describe_value",
]


class Target(NamedTuple):
    """What a negative sampler samples from in one training step.

    Attributes:
        energy: ``E(z)`` for ONE flat event ``z`` of shape ``(D,)`` (``E(z, c)`` with a
            condition ``c`` when ``conditions`` is given), under the current parameters,
            which are frozen (``stop_gradient``).
        batch: ``(B, D)`` flat data of this step (where chains may restart).
        base: ``GaussianBase`` fitted to the training data.
        event_shape: shape of one event (``batch`` rows reshape to it).
        conditions: ``(B, ...)`` the condition of each batch row, for a conditional energy;
            None otherwise.
        sharding: placement of the leading (chain) axis across devices, or None.
    """

    energy: Callable
    batch: jax.Array
    base: GaussianBase
    event_shape: tuple[int, ...]
    conditions: Any = None
    sharding: Any = None

    def logdensity(self, z: jax.Array) -> jax.Array:
        """``−E(z)`` for one flat event (unconditional energies)."""
        return -self.energy(z)

    def place(self, x: jax.Array) -> jax.Array:
        """``x`` with its leading axis placed as ``sharding`` says (unchanged without one)."""
        if self.sharding is None:
            return x
        return jax.lax.with_sharding_constraint(x, self.sharding)


class ChainRecord(NamedTuple):
    """The recorded negative-phase chains after one training step.

    Attributes:
        positions: ``(num_recorded_chains, D)`` flat positions (the step's negatives).
        info: ``samplers.ChainInfo`` of ``(num_recorded_chains,)`` arrays summarising the
            step's transitions (``samplers.summarize``); acceptance is NaN for samples that
            no chain produced (generator negatives).
    """

    positions: jax.Array
    info: _samplers.ChainInfo


class NegativeInfo(NamedTuple):
    """What a negative sampler reports about one step.

    Attributes:
        acceptance_rate: mean Metropolis acceptance of the chains (NaN without chains).
        step_size: the chains' step size in this step (NaN without chains).
        langevin_grad_norm: mean ``‖∇ₓE‖`` at the negatives (Nijkamp et al. 2020's r_t).
        metrics: further scalar metrics of this sampler, by name (e.g. the generator's
            ``generator_energy``); they become columns of the training history.
        record: ``ChainRecord`` of the first ``num_recorded_chains`` chains, or None.
    """

    acceptance_rate: jax.Array
    step_size: jax.Array
    langevin_grad_norm: jax.Array
    metrics: dict
    record: ChainRecord | None = None


class NegativeSampler:
    """Base class of the negative samplers (subclass it as a frozen dataclass).

    Subclasses set ``name`` (what ``fit(negatives=name)`` calls it) and implement:

    * ``init(key, data, base) -> state``: ``data`` is the ``(N, D)`` flat training data and
      ``base`` the ``GaussianBase`` fitted to it; the state is any pytree of arrays.
    * ``sample(key, state, target) -> (state, negatives, info)``: ``negatives`` is
      ``(num_negatives, D)``, without gradient; ``info`` a ``NegativeInfo``.

    and may set ``supports_conditions = True`` when ``sample`` handles a ``Target`` with
    conditions (one negative per batch row, under that row's condition).
    """

    name: ClassVar[str] = ""
    supports_conditions: ClassVar[bool] = False

    def init(self, key: jax.Array, data: jax.Array, base: GaussianBase) -> Any:
        raise NotImplementedError

    def sample(self, key: jax.Array, state: Any, target: Target) -> tuple[Any, jax.Array, Any]:
        raise NotImplementedError

    def replace(self, **changes) -> NegativeSampler:
        """A copy with some settings changed."""
        return dataclasses.replace(self, **changes)


def describe(negatives: NegativeSampler) -> dict:
    """JSON-able settings by name (a resumed run's are compared with its checkpoint's):
    ``{"name": ..., setting: value, ...}``. The kernel is a dict of its fields, an entropy
    estimator ``{"name": its class, ...fields}``, an optimizer ``"custom"``; fields marked
    ``compare=False`` (a starting network) are left out."""
    out = {"name": negatives.name}
    for f in dataclasses.fields(negatives):
        if f.init and f.compare:
            out[f.name] = describe_value(getattr(negatives, f.name))
    return out


def describe_value(value):
    """One setting as ``describe`` records it (JSON-able)."""
    if isinstance(value, _samplers.Sampler):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.init}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        return {"name": type(value).__name__, **{f.name: getattr(value, f.name) for f in fields}}
    if hasattr(value, "init") and hasattr(value, "update"):
        return "custom"
    return value
