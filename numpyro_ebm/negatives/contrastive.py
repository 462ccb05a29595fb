"""Contrastive divergence (Hinton 2002): one short chain from each data point of the batch.

Each step starts one chain at every batch row and runs ``num_mcmc_steps`` of the kernel. It is
the negative sampler for conditional energies ``E(x | c)``: each chain runs under its own row's
condition, so the negatives are paired with the batch's conditions. The result is biased (the
chains do not reach the model from the data in a few steps) but it needs no bank of chains per
condition.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from numpyro_ebm import samplers as _samplers
from numpyro_ebm.negatives._chains import ChainSettings
from numpyro_ebm.negatives.base import NegativeInfo, Target
from numpyro_ebm.validation import check_count

__all__ = ["ContrastiveDivergence"]


@dataclass(frozen=True)
class ContrastiveDivergence(ChainSettings):
    """One chain per batch row, started there (under its condition for a conditional energy).

    ``num_chains`` is unused (the batch size sets the number of negatives; it is not checked
    against ``num_recorded_chains``) and no chains are recorded; the state is the step size
    alone.
    """

    name = "contrastive_divergence"
    supports_conditions = True
    num_recorded_chains: int | None = 0

    def check_counts(self) -> None:
        check_count("num_recorded_chains", self.num_recorded_chains, low=0)

    def init(self, key, data, base) -> jax.Array:
        return self.initial_step_size()

    def sample(self, key, step_size, target: Target):
        _, k_chains = jax.random.split(key)
        starts = target.batch
        if target.conditions is None:
            run = self.run(k_chains, starts, target, step_size)
            finals, acceptance, norm = run.finals, run.acceptance_rate, run.langevin_grad_norm
        else:
            finals, acceptance, norm = self._conditional(k_chains, starts, target, step_size)
        new_step_size = self.adapted(step_size, acceptance, target)
        return new_step_size, finals, NegativeInfo(acceptance, step_size, norm, {})

    def _conditional(self, key, starts, target: Target, step_size):
        sampler = self.sampler

        def one(k, start, condition):
            def logdensity(z):
                return -target.energy(z, condition)

            chain = sampler.init_chains(start[None], logdensity)
            chain, trace, _ = _samplers.run_chains(
                k, sampler, logdensity, chain, step_size, self.num_mcmc_steps
            )
            grad_norm = jnp.linalg.norm(chain.logdensity_grad[0])
            return chain.position[0], jnp.mean(trace.acceptance_rate), grad_norm

        keys = jax.random.split(key, starts.shape[0])
        finals, acceptance, norm = jax.vmap(one)(keys, starts, target.conditions)
        return jax.lax.stop_gradient(finals), jnp.mean(acceptance), jnp.mean(norm)
