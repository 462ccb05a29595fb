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
from numpyro_ebm.negatives._chains import ChainSettings, ChainState, flat, random_rows
from numpyro_ebm.negatives.base import NegativeInfo, Target

__all__ = ["ContrastiveDivergence"]


@dataclass(frozen=True)
class ContrastiveDivergence(ChainSettings):
    """One chain per batch row, started there (under its condition for a conditional energy).

    ``num_chains`` is unused (the batch size sets the number of negatives) and no chains are
    recorded; the state keeps the step size and the last negatives.
    """

    name = "contrastive_divergence"
    supports_conditions = True
    num_recorded_chains: int = 0

    def init(self, key, data, base) -> ChainState:
        return ChainState(random_rows(key, flat(data), 1), self.initial_step_size())

    def sample(self, key, state: ChainState, target: Target):
        _, k_chains = jax.random.split(key)
        starts = target.batch
        if target.conditions is None:
            run = self.run(k_chains, starts, target, state.step_size)
            finals, acceptance, norm = run.finals, run.acceptance_rate, run.langevin_grad_norm
        else:
            finals, acceptance, norm = self._conditional(k_chains, starts, target, state)
        new = ChainState(finals, self.adapted(state.step_size, acceptance))
        return new, finals, NegativeInfo(acceptance, state.step_size, norm, {})

    def _conditional(self, key, starts, target: Target, state: ChainState):
        sampler, step_size = self.sampler, state.step_size

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
