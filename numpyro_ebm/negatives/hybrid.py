"""Hybrid negatives: a generator proposes, MCMC refines, and the refined samples train both.

Each step the generator's samples are importance-resampled towards the model (which fixes how
mass is shared between modes that short chains cannot cross), then ``num_mcmc_steps`` of the
kernel refine them. The refined samples are the negatives; they also pull the generator
(amortization) while its own KL objective keeps it on the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from numpyro_ebm import generator as _generator
from numpyro_ebm.negatives._chains import ChainSettings
from numpyro_ebm.negatives.base import NegativeInfo, Target
from numpyro_ebm.negatives.generator import GeneratorNegatives, GeneratorState, generator_metrics
from numpyro_ebm.validation import check_non_negative

__all__ = ["Hybrid"]


@dataclass(frozen=True)
class Hybrid(GeneratorNegatives, ChainSettings):
    """Generator samples, resampled towards the model, refined by MCMC
    (``fit(negatives="hybrid")``).

    Attributes (besides ``GeneratorNegatives``' and ``ChainSettings``'):
        amortization_weight: weight of the generator's pull towards the refined negatives: the
            energy distance (``generator.energy_distance``) divided by the data's RMS standard
            deviation (``generator.data_scale``), so it does not depend on the data's units.
        resample: importance-resample a noisy generator's samples towards the model before
            the chains start (``generator.resample_towards_model``).
        restart_fraction: the share of chains that start from the generator each step (each
            chain independently with this probability); the others continue from their last
            negative, as persistent chains do. 1: every chain restarts (the default).
    """

    name = "hybrid"
    amortization_weight: float = 40.0
    resample: bool = True
    restart_fraction: float = 1.0

    def __post_init__(self):
        GeneratorNegatives.__post_init__(self)
        ChainSettings.__post_init__(self)
        check_non_negative("amortization_weight", self.amortization_weight)
        if not 0.0 < self.restart_fraction <= 1.0:
            raise ValueError(f"restart_fraction must be in (0, 1], got {self.restart_fraction}")

    @property
    def needs_noise(self) -> bool:
        return True  # the default generator is noisy: the resampling needs its density

    def starting_generator(self, event_shape, key) -> _generator.Generator:
        if self.generator is None:
            return super().starting_generator(event_shape, key)
        return _generator.check_generator(
            self.generator, event_shape, GeneratorNegatives.needs_noise.fget(self)
        )

    def initial_step_size(self) -> jax.Array:
        return ChainSettings.initial_step_size(self)

    def sample(self, key, state: GeneratorState, target: Target):
        k_start, k_chains = jax.random.split(key)
        generator = state.generator
        z, eps = generator.sample_inputs(k_start, self.num_chains)
        # one forward pass: the noise enters after the network, x = G(z) + σ ⊙ ε
        means, _ = generator.generate(z, jnp.zeros_like(eps), train=True)
        samples = means + jnp.exp(generator.log_noise_scale) * eps if generator.noisy else means
        ess = jnp.full((), jnp.nan)
        sources = jnp.arange(self.num_chains)  # the sample each chain starts from
        if self.resample and generator.noisy:
            resampled = _generator.resample_towards_model(
                jax.random.fold_in(k_start, 3),
                target.energy,
                means,
                generator.log_noise_scale,
                samples,
            )
            samples, ess, sources = resampled.samples, resampled.ess, resampled.rows
        if self.restart_fraction < 1.0:
            restart = jax.random.bernoulli(
                jax.random.fold_in(k_start, 4), self.restart_fraction, (self.num_chains,)
            )
            samples = jnp.where(restart[:, None], samples, state.bank)
            sources = jnp.where(restart, sources, -1)
        run = self.run(k_chains, samples, target, state.step_size)
        new_generator, opt_state, terms = self.train_generator(
            state, target, z, eps, run.finals, self.amortization_weight, sources
        )
        new = GeneratorState(
            run.finals,
            self.adapted(state.step_size, run.acceptance_rate, target),
            new_generator,
            opt_state,
        )
        info = NegativeInfo(
            run.acceptance_rate,
            state.step_size,
            run.langevin_grad_norm,
            generator_metrics(terms, ess),
            run.record,
        )
        return new, run.finals, info
