"""The objectives: the loss of the energy given a data batch (and, for maximum likelihood, the
negatives).

An objective turns ``(energy, batch, negatives, conditions, key)`` into per-event losses whose
mean is minimised, and the *penalty* that ``energy_l2`` weighs (a stabiliser of the energies'
scale; see ``training.TrainConfig``). The training core differentiates it and never branches
on which objective it is: each is a frozen dataclass with ``name``, ``needs_negatives`` and

    terms = objective.terms(energy, batch, negatives, conditions, key=key)

* ``"ml"``, ``LikelihoodObjective``: maximum likelihood, with negatives from the model.
* ``"sm"``, ``ScoreMatching``: Hyvärinen's (2005) score matching, the Hessian's trace exact.
* ``"ssm"``, ``SlicedScoreMatching``: sliced score matching (Song et al. 2019), random
  projections instead of the trace, with or without variance reduction.
* ``"dsm"``, ``DenoisingScoreMatching``: denoising score matching (Vincent 2011) at one noise
  level, or over several (``noise_scales``) with a noise-conditional energy
  (``energies.NoiseConditionalEnergy``; Song & Ermon 2019).

The score-matching objectives need no negatives: they see only the score ``−∇ₓE`` at (or
near) the data, so the energy's free constant is theirs to ignore, and so is the relative mass
of regions the data do not connect (see docs/concepts/objectives.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from numpyro_ebm.validation import check_count, check_positive

__all__ = [
    "DenoisingScoreMatching",
    "LikelihoodObjective",
    "Objective",
    "ObjectiveTerms",
    "ScoreMatching",
    "SlicedScoreMatching",
    "build_objective",
    "describe_objective",
    "objective_from_description",
]


class ObjectiveTerms(NamedTuple):
    """What an objective gives for one batch.

    Attributes:
        per_event: ``(B,)`` loss of each data event; the objective is their mean (in a NumPyro
            model each event's term is weighted by its plate scale and mask).
        penalty: the scalar that ``energy_l2`` weighs.
        metrics: scalar metrics by name (history columns).
    """

    per_event: jax.Array
    penalty: jax.Array
    metrics: dict


class Objective:
    """Base class of the objectives (subclass as a frozen dataclass; see the module doc)."""

    name: ClassVar[str] = ""
    needs_negatives: ClassVar[bool] = True

    def terms(
        self,
        energy: Callable,
        batch: jax.Array,
        negatives: jax.Array | None,
        conditions: Any = None,
        *,
        key: jax.Array | None = None,
    ) -> ObjectiveTerms:
        """``energy``: one event (and its condition) -> scalar; ``batch`` ``(B, *event)``;
        ``negatives`` ``(n, *event)`` (ignored when not ``needs_negatives``); ``conditions``
        ``(B, ...)`` or None; ``key``: this step's PRNG key of the objective (projections,
        noise)."""
        raise NotImplementedError


def _energies(energy: Callable, x: jax.Array, conditions) -> jax.Array:
    if conditions is None:
        return jax.vmap(energy)(x)
    return jax.vmap(energy)(x, conditions)


@dataclass(frozen=True)
class LikelihoodObjective(Objective):
    """Maximum likelihood: per event ``E(x_i) − mean_j E(x̃_j)`` with the negatives ``x̃``
    held fixed (no gradient flows into them).

    With negatives drawn from the model, the gradient of the mean is an unbiased estimate of
    the NLL gradient ``E_data[∇E] − E_model[∇E]`` (its VALUE is not the NLL: ``−mean E(x̃)``
    stands in for ``log Z``). For a conditional energy, negative ``j`` is paired with event
    ``j``'s condition. The penalty is ``mean E(data)² + mean E(neg)²``.
    """

    name = "ml"

    def terms(self, energy, batch, negatives, conditions=None, *, key=None) -> ObjectiveTerms:
        e_data = _energies(energy, batch, conditions)
        e_neg = _energies(energy, jax.lax.stop_gradient(negatives), conditions)
        mean_data, mean_neg = jnp.mean(e_data), jnp.mean(e_neg)
        metrics = {
            "energy_gap": mean_data - mean_neg,
            "energy_data": mean_data,
            "energy_negatives": mean_neg,
        }
        penalty = jnp.mean(e_data**2) + jnp.mean(e_neg**2)
        return ObjectiveTerms(e_data - mean_neg, penalty, metrics)


def _at(energy: Callable, condition) -> Callable:
    """One event -> scalar: ``energy`` at ``condition`` (unconditional when None)."""
    return energy if condition is None else (lambda x: energy(x, condition))


def _per_event(fn: Callable, batch: jax.Array, conditions, *more) -> Any:
    """``fn(x, condition, *more_i)`` for every event (``condition`` None without conditions)."""
    if conditions is None:
        return jax.vmap(lambda x, *m: fn(x, None, *m))(batch, *more)
    return jax.vmap(fn)(batch, conditions, *more)


def _score_terms(energy, batch, conditions, per_event, metrics) -> ObjectiveTerms:
    """Terms of a score-matching objective: its per-event losses, the penalty
    ``mean E(data)²`` (the score is blind to the energy's free constant; the penalty pins it
    and, absorbed by that constant, moves nothing else) and the mean data energy."""
    e_data = _energies(energy, batch, conditions)
    metrics = {**metrics, "energy_data": jnp.mean(e_data)}
    return ObjectiveTerms(per_event, jnp.mean(e_data**2), metrics)


def _need_key(key, name: str) -> jax.Array:
    if key is None:
        raise ValueError(f"the {name} objective draws random numbers: pass key=")
    return key


@dataclass(frozen=True)
class ScoreMatching(Objective):
    """Score matching (Hyvärinen 2005): per event ``½ ‖∇ₓE(x)‖² − tr ∇ₓ²E(x)``.

    Its mean is, up to a constant of the data, ``½ E_data ‖∇ₓ log p_data − ∇ₓ log p_θ‖²``
    (Fisher divergence), so no negatives and no ``log Z`` are needed. The Hessian's trace is
    exact (``jax.jacfwd`` of the gradient: ``D`` forward passes per event), for low
    dimension; ``SlicedScoreMatching`` estimates it with random projections instead.

    Example:
        >>> import jax.numpy as jnp
        >>> from numpyro_ebm.energies import GaussianEnergy
        >>> terms = ScoreMatching().terms(GaussianEnergy(jnp.zeros(2)), jnp.ones((3, 2)), None)
        >>> terms.per_event   # ½‖x‖² − tr I = 1 − 2
        Array([-1., -1., -1.], dtype=float32)
    """

    name = "sm"
    needs_negatives = False

    def terms(self, energy, batch, negatives=None, conditions=None, *, key=None):
        def one(x, condition):
            def gradient(z):  # flat in, flat out: the Hessian is (D, D) whatever the event
                return jnp.ravel(jax.grad(_at(energy, condition))(jnp.reshape(z, x.shape)))

            z = jnp.ravel(x)
            g = gradient(z)
            trace = jnp.trace(jax.jacfwd(gradient)(z))
            return 0.5 * jnp.sum(g**2) - trace

        per_event = _per_event(one, batch, conditions)
        metrics = {"score_matching_loss": jnp.mean(per_event)}
        return _score_terms(energy, batch, conditions, per_event, metrics)


PROJECTIONS = ("rademacher", "gaussian")


@dataclass(frozen=True)
class SlicedScoreMatching(Objective):
    """Sliced score matching (Song, Garg, Shi & Ermon 2019): the trace of score matching
    replaced by projections ``vᵀ ∇ₓ²E v`` on random directions ``v`` (``E[v vᵀ] = I``), one
    Hessian-vector product each. Per event, with ``g = ∇ₓE(x)``,

    * ``variance_reduction=True`` (SSM-VR): ``½ ‖g‖² − mean_v vᵀ ∇ₓ²E v``;
    * ``variance_reduction=False`` (SSM): ``mean_v [½ (vᵀ g)² − vᵀ ∇ₓ²E v]``.

    Both equal ``ScoreMatching``'s per-event loss in expectation over ``v``.

    Args:
        num_projections: directions per event.
        variance_reduction: use ``‖g‖²`` for its projection (exact, lower variance).
        projection: ``"rademacher"`` (default: entries ±1, the lower-variance trace
            estimator) or ``"gaussian"`` (the paper's).
    """

    name = "ssm"
    needs_negatives = False
    num_projections: int = 1
    variance_reduction: bool = True
    projection: str = "rademacher"

    def __post_init__(self):
        check_count("num_projections", self.num_projections)
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")

    def terms(self, energy, batch, negatives=None, conditions=None, *, key=None):
        key = _need_key(key, "sliced score-matching")
        shape = (batch.shape[0], self.num_projections, *batch.shape[1:])
        if self.projection == "rademacher":
            directions = jax.random.rademacher(key, shape, batch.dtype)
        else:
            directions = jax.random.normal(key, shape, batch.dtype)

        def one(x, condition, vs):
            gradient = jax.grad(_at(energy, condition))

            def along(v):
                g, hv = jax.jvp(gradient, (x,), (v,))
                return g, jnp.sum(v * hv), jnp.sum(v * g)

            g, curvature, slope = jax.vmap(along)(vs)
            if self.variance_reduction:
                quadratic = 0.5 * jnp.sum(g[0] ** 2)
            else:
                quadratic = 0.5 * jnp.mean(slope**2)
            return quadratic - jnp.mean(curvature)

        per_event = _per_event(one, batch, conditions, directions)
        metrics = {"score_matching_loss": jnp.mean(per_event)}
        return _score_terms(energy, batch, conditions, per_event, metrics)


@dataclass(frozen=True)
class DenoisingScoreMatching(Objective):
    """Denoising score matching (Vincent 2011): per event, with ``ε ∼ N(0, I)`` and
    ``x̃ = x + σ ε``, ``½ ‖σ ∇ₓE(x̃) − ε‖²`` (the σ²-weighted ``½ ‖∇ₓ log p(x̃) − (−ε/σ)‖²``).

    Its minimiser is the score of the data blurred by ``N(0, σ² I)``: the trained density is
    the data's convolved with that noise (Gaussian data ``N(μ, Σ)`` give ``N(μ, Σ + σ² I)``).
    Small σ: close to the data's density, but a noisy loss; large σ: a smooth, wider one.

    With several ``noise_scales`` (annealed / multi-noise DSM, Song & Ermon 2019) each event
    draws one of them and the energy must be noise-conditional (``at_noise(x, σ)``, as
    ``energies.NoiseConditionalEnergy``): the σ² weighting gives every level a loss of the same
    scale. The energy called plainly is then the one at its own (smallest) noise level.

    Args:
        noise_scales: σ in the data's units, or a tuple of several σ.
    """

    name = "dsm"
    needs_negatives = False
    noise_scales: Any = 0.1

    def __post_init__(self):
        scales = self.noise_scales
        scales = tuple(scales) if isinstance(scales, tuple | list) else (scales,)
        if not scales:
            raise ValueError("noise_scales must name at least one noise scale")
        scales = tuple(check_positive("noise scales", sigma) for sigma in scales)
        value = scales[0] if len(scales) == 1 else scales
        object.__setattr__(self, "noise_scales", value)

    @property
    def scales(self) -> tuple[float, ...]:
        scales = self.noise_scales
        return scales if isinstance(scales, tuple) else (float(scales),)

    def terms(self, energy, batch, negatives=None, conditions=None, *, key=None):
        key = _need_key(key, "denoising score-matching")
        k_level, k_noise = jax.random.split(key)
        noise = jax.random.normal(k_noise, batch.shape, batch.dtype)
        scales = jnp.asarray(self.scales, batch.dtype)
        if len(self.scales) == 1:
            sigma = jnp.broadcast_to(scales[0], batch.shape[:1])

            def energy_at(x, condition, _):
                return _at(energy, condition)(x)

        else:
            if not hasattr(energy, "at_noise") or conditions is not None:
                raise ValueError(
                    "denoising score matching over several noise scales needs an unconditional "
                    "noise-conditional energy (one with at_noise(x, sigma), e.g. "
                    "numpyro_ebm.energies.NoiseConditionalEnergy)"
                )
            plain = getattr(energy, "noise_scale", None)
            if plain is not None and not any(abs(plain - s) < 1e-6 * s for s in self.scales):
                raise ValueError(
                    f"the energy's noise_scale {plain} (the level of the density fit returns) "
                    f"is not one of the trained noise scales {self.scales}; set it to "
                    f"min(noise_scales) = {min(self.scales)}"
                )
            level = jax.random.randint(k_level, batch.shape[:1], 0, len(self.scales))
            sigma = scales[level]

            def energy_at(x, _, s):
                return energy.at_noise(x, s)

        def one(x, condition, eps, s):
            g = jax.grad(energy_at)(x + s * eps, condition, s)
            return 0.5 * jnp.sum((s * g - eps) ** 2)

        per_event = _per_event(one, batch, conditions, noise, sigma)
        metrics = {"denoising_loss": jnp.mean(per_event)}
        return _score_terms(energy, batch, conditions, per_event, metrics)


OBJECTIVES = {
    cls.name: cls
    for cls in (LikelihoodObjective, ScoreMatching, SlicedScoreMatching, DenoisingScoreMatching)
}


def describe_objective(objective: Objective) -> str | dict:
    """JSON-able settings of an objective (a resumed run's are compared with its checkpoint's):
    its name alone when it has no settings (``"ml"``), else ``{"name": ..., setting: ...}``."""
    fields = {f.name: getattr(objective, f.name) for f in dataclasses.fields(objective) if f.init}
    if not fields:
        return objective.name
    return {
        "name": objective.name,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()},
    }


def objective_from_description(described: str | dict) -> Objective:
    """The objective ``describe_objective`` described (``ValueError`` for an unknown one)."""
    if isinstance(described, str):
        return build_objective(described)
    settings = dict(described)
    name = settings.pop("name", None)
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}")
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
    return OBJECTIVES[name](**settings)


def build_objective(objective: str | Objective) -> Objective:
    """``"ml"``, ``"sm"``, ``"ssm"`` or ``"dsm"`` (or an ``Objective``) -> the objective
    object, default-configured."""
    if isinstance(objective, Objective):
        return objective
    if not isinstance(objective, str) or objective not in OBJECTIVES:
        raise ValueError(
            f"unknown objective {objective!r}; choose one of {tuple(OBJECTIVES)} or pass a "
            "numpyro_ebm.training.Objective"
        )
    return OBJECTIVES[objective]()
