"""Generator negatives (Kim & Bengio 2016): a directed generator supplies the model samples.

The network, its entropy estimators and its loss are in ``numpyro_ebm.generator``; this module
is the negative sampler that trains it alongside the energy. In Kim & Bengio's order, each step
takes one generator step against the current energy, then the negatives are the UPDATED
generator's samples for the same latents. No MCMC runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from numpyro_ebm import generator as _generator
from numpyro_ebm import samplers as _samplers
from numpyro_ebm.negatives._chains import check_chain_counts, flat, random_rows, recorded_chains
from numpyro_ebm.negatives.base import ChainRecord, NegativeInfo, NegativeSampler, Target
from numpyro_ebm.validation import check_count

__all__ = ["GeneratorNegatives", "GeneratorState", "default_generator"]


class GeneratorState(NamedTuple):
    """State of a generator-based negative sampler.

    Attributes:
        bank: the last negatives ``(num_chains, D)`` (``FitResult.chains``).
        step_size: the refining chains' step size (``"hybrid"``; unused 0 for ``"generator"``:
            the state must be finite, a rejected step is told by a non-finite state).
        generator: the ``numpyro_ebm.generator.Generator`` being trained.
        opt_state: its optimizer state.
    """

    bank: jax.Array
    step_size: jax.Array
    generator: Any
    opt_state: Any


def default_generator(event_shape, *, key, noisy: bool) -> _generator.Generator:
    """Latent dimension ``max(4, D)``, hidden ``(128, 128)``, batch norm, uniform latents;
    output noise (initial σ = 0.1) when ``noisy``."""
    size = math.prod(event_shape)
    return _generator.Generator(
        tuple(event_shape), max(4, size), key=key, noise_scale=0.1 if noisy else None
    )


@dataclass(frozen=True)
class GeneratorNegatives(NegativeSampler):
    """The negatives are a generator's samples (``fit(negatives="generator")``).

    Attributes:
        optimizer: optax transformation for the generator (required).
        entropy: the entropy estimator (``"nearest_neighbour"``, ``"batch_norm"`` or an
            estimator object; ``generator.get_entropy``).
        num_chains: generator samples per step (the negatives), at least 2 (batch statistics)
            and more than the nearest-neighbour entropy's ``k``.
        generator: the starting network; None builds ``default_generator`` at ``init``
            (noisy when the entropy estimator needs it). Not a setting: two samplers that
            differ only in it compare equal.
        num_recorded_chains: samples per step reported for diagnostics (acceptance NaN), at
            most ``num_chains``; None (default): ``min(8, num_chains)``.
    """

    name = "generator"
    optimizer: optax.GradientTransformation | None = None
    entropy: Any = "nearest_neighbour"
    num_chains: int = 1024
    generator: Any = field(default=None, compare=False, hash=False, repr=False)
    num_recorded_chains: int | None = None

    def __post_init__(self):
        if self.optimizer is None:
            raise ValueError(f"negatives={self.name!r} needs a generator optimizer")
        object.__setattr__(self, "entropy", _generator.get_entropy(self.entropy))
        check_chain_counts(self.num_chains, self._num_recorded)
        check_count("num_chains", self.num_chains, low=2)
        nearest = isinstance(self.entropy, _generator.NearestNeighbourEntropy)
        if nearest and self.num_chains <= self.entropy.k:
            raise ValueError(
                f"num_chains ({self.num_chains}) must exceed the nearest-neighbour entropy's "
                f"k ({self.entropy.k}): the entropy is estimated on each step's samples"
            )

    @property
    def needs_noise(self) -> bool:
        return isinstance(self.entropy, _generator.NearestNeighbourEntropy)

    def starting_generator(self, event_shape, key) -> _generator.Generator:
        """The given generator after checks, or ``default_generator`` (noisy when the entropy
        estimator needs it)."""
        if self.generator is None:
            return default_generator(event_shape, key=key, noisy=self.needs_noise)
        return _generator.check_generator(self.generator, event_shape, self.needs_noise)

    def init(self, key, data, base) -> GeneratorState:
        k_rows, k_generator = jax.random.split(key)
        generator = self.starting_generator(data.shape[1:], k_generator)
        trainable = eqx.filter(generator, _generator.trainable(generator))
        return GeneratorState(
            bank=random_rows(k_rows, flat(data), self.num_chains),
            step_size=self.initial_step_size(),
            generator=generator,
            opt_state=self.optimizer.init(trainable),
        )

    def initial_step_size(self) -> jax.Array:
        return jnp.zeros((), jnp.float32)

    def train_generator(
        self, state: GeneratorState, target: Target, z, eps, refined=None, weight=0.0, sources=None
    ):
        """One optimizer step of the generator's loss against the target's energy (and, with
        ``refined``, its amortization pull of weight ``weight`` towards those samples; refined
        row ``i`` started at sample ``sources[i]``, ``−1`` at none). Returns the updated
        generator, its optimizer state and the loss terms."""
        generator = state.generator
        params, static = eqx.partition(generator, _generator.trainable(generator))
        (_, (terms, updated, _)), grads = jax.value_and_grad(
            _generator.generator_loss, has_aux=True
        )(
            params,
            static,
            lambda x: target.energy(jnp.reshape(x, (-1,))),
            z,
            eps,
            self.entropy,
            target=refined,
            amortization_weight=weight,
            amortization_scale=_generator.data_scale(target.base.scale_tril),
            target_sources=sources,
        )
        updates, opt_state = self.optimizer.update(grads, state.opt_state, params)
        new_params = optax.apply_updates(params, updates)
        new_generator = eqx.combine(
            new_params, eqx.partition(updated, _generator.trainable(updated))[1]
        )
        return new_generator, opt_state, terms

    def sample(self, key, state: GeneratorState, target: Target):
        k_start, _ = jax.random.split(key)
        z, eps = state.generator.sample_inputs(k_start, self.num_chains)
        new_generator, opt_state, terms = self.train_generator(state, target, z, eps)
        samples, _ = new_generator.generate(z, eps, train=True)
        finals = jax.lax.stop_gradient(samples)
        logdensities, grad_x = jax.vmap(jax.value_and_grad(target.logdensity))(finals)
        norm = jnp.mean(jnp.linalg.norm(grad_x, axis=1))
        new = GeneratorState(finals, state.step_size, new_generator, opt_state)
        nan = jnp.full((), jnp.nan)
        info = NegativeInfo(
            nan, nan, norm, generator_metrics(terms), self._record(finals, logdensities)
        )
        return new, finals, info

    @property
    def _num_recorded(self) -> int:
        return recorded_chains(self.num_chains, self.num_recorded_chains)

    def _record(self, finals, logdensities) -> ChainRecord | None:
        n = self._num_recorded
        if not n:
            return None
        ones = jnp.ones((n,), finals.dtype)
        info = _samplers.ChainInfo(
            acceptance_rate=jnp.nan * ones,
            is_divergent=jnp.zeros((n,), bool),
            logdensity=logdensities[:n],
            hamiltonian=jnp.nan * ones,
            step_size=jnp.nan * ones,
            num_integration_steps=jnp.zeros((n,), jnp.int32),
        )
        return ChainRecord(finals[:n], info)


def generator_metrics(terms: _generator.GeneratorLoss, ess=None) -> dict:
    """History columns of a generator sampler: its loss terms (and the hybrid's ESS)."""
    metrics = {
        "generator_energy": terms.energy,
        "generator_entropy": terms.entropy,
        "amortization": terms.amortization,
    }
    if ess is not None:
        metrics["resampling_ess"] = ess
    return metrics
