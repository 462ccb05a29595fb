"""One small interface over BlackJAX kernels, at temperature 1.

Every sampler here targets ``p(x) ∝ exp(logdensity(x))`` exactly (MALA, HMC, Barker: Metropolis
corrected) or up to a step-size bias (ULA). There is no temperature knob on purpose: an EBM whose
negatives come from a colder chain is not the density it reports (see the training guide).

The package has four modules, each one concept:

* ``kernels``: the one registry of kernels (``REGISTRY``, ``KERNELS``, ``TARGET_ACCEPTANCE``)
  and ``Sampler``, a kernel with its settings (``init`` / ``step`` / ``init_chains`` of one or
  many chains), with the factories ``mala``, ``hmc``, ``ula``, ``barker`` and ``get_sampler``.
* ``chains``: ``run_chains`` (``vmap`` over chains, ``lax.scan`` over steps, fixed step size),
  ``summarize``, ``flat_logdensity`` and the ``Draws`` record (ArviZ's chain-major order, read
  by ``numpyro_ebm.diagnostics``).
* ``adaptation``: the step-size rules: ``STEP_SIZE_BOUNDS`` (``step_size_bounds`` widens them
  by the target's variances), the dual-averaging ``warmup``, and the per-step updates
  ``adapt_step_size`` (training) and ``adapt_step_size_multiplicative`` (AIS, the tracker).
* ``draws``: ``DrawSettings`` (warm-up, thinning, chains, initial scale) and ``sample_chains``,
  what ``EnergyDistribution.sample`` runs.

Every public name of the modules is available here, e.g. ``numpyro_ebm.samplers.run_chains``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from numpyro_ebm import samplers
    >>> sampler = samplers.mala()
    >>> logdensity = lambda x: -0.5 * jnp.sum(x**2)
    >>> states = sampler.init_chains(jnp.zeros((16, 2)), logdensity)
    >>> states, step_size, info = samplers.warmup(
    ...     jax.random.key(0), sampler, logdensity, states, num_steps=200)
    >>> states, trace, _ = samplers.run_chains(
    ...     jax.random.key(1), sampler, logdensity, states, step_size, num_steps=100)
    >>> states.position.shape
    (16, 2)
"""

from numpyro_ebm.samplers import tempering
from numpyro_ebm.samplers.adaptation import (
    STEP_SIZE_BOUNDS,
    WarmupInfo,
    adapt_step_size,
    adapt_step_size_multiplicative,
    step_size_bounds,
    warmup,
)
from numpyro_ebm.samplers.chains import Draws, flat_logdensity, run_chains, summarize
from numpyro_ebm.samplers.draws import DrawSettings, sample_chains
from numpyro_ebm.samplers.kernels import (
    KERNELS,
    REGISTRY,
    TARGET_ACCEPTANCE,
    ChainInfo,
    Kernel,
    Sampler,
    barker,
    get_sampler,
    hmc,
    mala,
    ula,
)
from numpyro_ebm.samplers.tempering import (
    Ladder,
    ReplicaState,
    RoundInfo,
    TemperingSummary,
    adapt_ladder,
    barrier,
    init_replicas,
    initial_ladder,
    run_rounds,
    suggested_replicas,
    warmup_ladder,
)

__all__ = [
    "KERNELS",
    "REGISTRY",
    "STEP_SIZE_BOUNDS",
    "TARGET_ACCEPTANCE",
    "ChainInfo",
    "DrawSettings",
    "Draws",
    "Kernel",
    "Ladder",
    "ReplicaState",
    "RoundInfo",
    "Sampler",
    "TemperingSummary",
    "WarmupInfo",
    "adapt_ladder",
    "adapt_step_size",
    "adapt_step_size_multiplicative",
    "barker",
    "barrier",
    "flat_logdensity",
    "get_sampler",
    "hmc",
    "init_replicas",
    "initial_ladder",
    "mala",
    "run_chains",
    "run_rounds",
    "sample_chains",
    "step_size_bounds",
    "suggested_replicas",
    "summarize",
    "tempering",
    "ula",
    "warmup",
    "warmup_ladder",
]
