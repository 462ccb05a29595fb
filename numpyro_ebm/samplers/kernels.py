"""The kernels: one registry ``name -> Kernel`` and ``Sampler``, the kernel settings.

Every kernel targets ``p(x) ∝ exp(logdensity(x))`` exactly (MALA, HMC, Barker: Metropolis
corrected) or up to a step-size bias (ULA), at temperature 1. A ``Sampler`` is a frozen,
hashable configuration that knows how to

* build the BlackJAX state of one chain (``sampler.init(position, logdensity_fn)``),
* take one step of one chain (``sampler.step(key, state, logdensity_fn, step_size)``), where
  ``logdensity_fn`` is a call-time argument, so energies with traced parameters compile once,
* say which acceptance rate its step size should be tuned to (``sampler.target``).

Chains run in at least JAX's default float dtype (float32; float64 under ``jax_enable_x64``):
``init`` promotes a narrower position (float16, bfloat16; float32 under x64) to it, because
BlackJAX's Gaussian noise comes out in that dtype and a narrower chain would not keep its own.
``chain_dtype`` says which dtype a position's chain runs in.

Adding a kernel is one entry of ``REGISTRY`` (its init, its step, its default target
acceptance, whether it adapts, its default step size) and, optionally, a factory.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from numpyro_ebm import samplers
    >>> sampler = samplers.hmc(num_integration_steps=10)
    >>> logdensity = lambda x: -0.5 * jnp.sum(x**2)
    >>> state = sampler.init(jnp.zeros(2), logdensity)
    >>> state, info = sampler.step(jax.random.key(0), state, logdensity, 0.1)
    >>> sampler.target, int(info.num_integration_steps)
    (0.65, 10)
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import blackjax
import jax
import jax.numpy as jnp
from blackjax.mcmc import diffusions

from numpyro_ebm.validation import check_positive

__all__ = [
    "KERNELS",
    "REGISTRY",
    "TARGET_ACCEPTANCE",
    "ChainInfo",
    "Kernel",
    "Sampler",
    "barker",
    "chain_dtype",
    "get_sampler",
    "hmc",
    "mala",
    "ula",
]


class ChainInfo(NamedTuple):
    """What one step of one chain reports, the same fields for every kernel.

    Attributes:
        acceptance_rate: Metropolis acceptance probability of the step (1.0 for ULA).
        is_divergent: HMC energy-error divergence flag (always False for the other kernels).
        logdensity: log-density (= −energy) at the chain's position after the step.
        hamiltonian: HMC only: the Hamiltonian ``−log p(x) + ½‖p‖²`` of the state the step
            kept (what ArviZ calls ``energy`` and reads for the BFMI); NaN for other kernels.
        step_size: the step size this step used (HMC: after jitter).
        num_integration_steps: gradient evaluations of the step (HMC: leapfrog steps, else 1).
    """

    acceptance_rate: jax.Array
    is_divergent: jax.Array
    logdensity: jax.Array
    hamiltonian: jax.Array
    step_size: jax.Array
    num_integration_steps: jax.Array


class Kernel(NamedTuple):
    """One entry of ``REGISTRY``: a BlackJAX kernel behind the ``Sampler`` interface.

    Attributes:
        init: ``(position, logdensity_fn) -> state`` for one chain at a flat position.
        step: ``(key, state, logdensity_fn, step_size, sampler) -> (state, ChainInfo)``, one
            transition of one chain; ``step_size`` is a scalar array of the position's dtype
            and ``sampler`` carries the kernel's other settings.
        target_acceptance: the acceptance rate its step size is tuned toward by default;
            ``None`` for a kernel without an accept/reject step.
        adapts: whether its step size can be tuned (needs an acceptance rate).
        step_size: the initial step size its factory (and ``get_sampler(name)``) uses.
    """

    init: Callable
    step: Callable
    target_acceptance: float | None
    adapts: bool
    step_size: float


def chain_dtype(dtype) -> jnp.dtype:
    """The dtype a chain started at a position of floating ``dtype`` runs in: ``dtype``, or
    JAX's default float dtype (float32; float64 under ``jax_enable_x64``) if that is wider.

    Example:
        >>> import jax.numpy as jnp
        >>> from numpyro_ebm import samplers
        >>> samplers.kernels.chain_dtype(jnp.float16)  # float64 under jax_enable_x64
        dtype('float32')
    """
    return jnp.promote_types(dtype, jax.dtypes.canonicalize_dtype(jnp.float64))


def _no_hamiltonian(state, step_size):
    """The ``ChainInfo`` fields a one-gradient kernel without a Hamiltonian reports."""
    nan = jnp.full((), jnp.nan, state.position.dtype)
    return nan, jnp.zeros((), bool), jnp.ones((), jnp.int32)


def _mala_step(key, state, logdensity_fn, step_size, sampler):
    state, info = blackjax.mala.build_kernel()(key, state, logdensity_fn, step_size)
    nan, no, one = _no_hamiltonian(state, step_size)
    return state, ChainInfo(info.acceptance_rate, no, state.logdensity, nan, step_size, one)


def _barker_step(key, state, logdensity_fn, step_size, sampler):
    state, info = blackjax.barker.build_kernel()(key, state, logdensity_fn, step_size)
    nan, no, one = _no_hamiltonian(state, step_size)
    return state, ChainInfo(info.acceptance_rate, no, state.logdensity, nan, step_size, one)


def _ula_step(key, state, logdensity_fn, step_size, sampler):
    # ULA is the MALA proposal without the accept/reject step; BlackJAX's overdamped
    # Langevin integrator is exactly that and keeps (logdensity, grad) cached for reuse.
    integrator = diffusions.overdamped_langevin(jax.value_and_grad(logdensity_fn))
    state = type(state)(*integrator(key, state, step_size))
    nan, no, one = _no_hamiltonian(state, step_size)
    return state, ChainInfo(jnp.ones_like(nan), no, state.logdensity, nan, step_size, one)


def _hmc_step(key, state, logdensity_fn, step_size, sampler):
    key, key_jitter = jax.random.split(key)
    jitter = sampler.step_size_jitter
    step_size = step_size * jax.random.uniform(
        key_jitter, (), step_size.dtype, minval=1 - jitter, maxval=1 + jitter
    )
    inverse_mass = jnp.ones_like(state.position)
    start = state
    state, info = blackjax.hmc.build_kernel()(
        key, state, logdensity_fn, step_size, inverse_mass, sampler.num_integration_steps
    )
    # BlackJAX reports the Hamiltonian at the END of the trajectory; ArviZ's BFMI wants
    # the kept state's, which is the start's when the proposal was rejected
    start_hamiltonian = -start.logdensity + 0.5 * jnp.sum(info.momentum**2)
    hamiltonian = jnp.where(info.is_accepted, info.energy, start_hamiltonian)
    steps = jnp.asarray(sampler.num_integration_steps, jnp.int32)
    return state, ChainInfo(
        info.acceptance_rate, info.is_divergent, state.logdensity, hamiltonian, step_size, steps
    )


# The one place the kernels and their default target acceptance rates live. The rates are
# optimal in high dimension: MALA 0.574 (Roberts & Rosenthal 1998), HMC 0.65 (Beskos et al.
# 2013), Barker ~0.4 (Livingstone & Zanella 2022). MALA and ULA share BlackJAX's MALA state.
REGISTRY: types.MappingProxyType[str, Kernel] = types.MappingProxyType(
    {
        "mala": Kernel(blackjax.mala.init, _mala_step, 0.574, True, 0.05),
        "hmc": Kernel(blackjax.hmc.init, _hmc_step, 0.65, True, 0.1),
        "ula": Kernel(blackjax.mala.init, _ula_step, None, False, 0.01),
        "barker": Kernel(blackjax.barker.init, _barker_step, 0.4, True, 0.05),
    }
)
KERNELS = tuple(REGISTRY)
# kernel name -> default target acceptance (None: the kernel does not adapt), read from REGISTRY
TARGET_ACCEPTANCE = types.MappingProxyType(
    {name: kernel.target_acceptance for name, kernel in REGISTRY.items()}
)


@dataclass(frozen=True)
class Sampler:
    """A kernel and its settings: how to move BlackJAX chains on an energy.

    The negative phase during training, ``numpyro_ebm.logz``'s AIS and
    ``numpyro_ebm.EnergyDistribution.sample`` use it; how many draws, warm-up steps, chains
    and thinning ``sample`` uses are ``numpyro_ebm.samplers.DrawSettings``.

    Attributes:
        kernel: one of ``KERNELS``: ``"mala"``, ``"hmc"``, ``"ula"``, ``"barker"``.
        step_size: initial step size ``h`` (BlackJAX convention: the Langevin proposal is
            ``x + h ∇log p(x) + sqrt(2h) ξ``; for HMC the leapfrog step).
        target_acceptance: acceptance rate the step size is tuned toward; ``None`` picks the
            kernel's default (``TARGET_ACCEPTANCE``: MALA 0.574, HMC 0.65, Barker 0.4). ULA
            has no acceptance step and keeps its step size fixed.
        adapt_step_size: tune the step size (dual averaging during warm-up; during training a
            Robbins-Monro update each step, see ``numpyro_ebm.samplers.adaptation``).
        num_integration_steps: leapfrog steps per HMC transition (fixed, so thousands of vmapped
            chains stay in lock-step).
        step_size_jitter: HMC only: each transition uses ``step_size · U(1 − j, 1 + j)``. A fixed
            trajectory length resonates with the target's scales (acceptance then is not
            monotone in the step size and tuning fails); jitter breaks it (Neal 2011, §5.4.2.3).

    Example:
        >>> from numpyro_ebm import samplers
        >>> samplers.Sampler("hmc", step_size=0.2).replace(num_integration_steps=10).target
        0.65
    """

    kernel: str = "mala"
    step_size: float = 0.05
    target_acceptance: float | None = None
    adapt_step_size: bool = True
    num_integration_steps: int = 5
    step_size_jitter: float = 0.2
    _target: float | None = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.kernel not in REGISTRY:
            raise ValueError(f"unknown sampler kernel {self.kernel!r}; choose one of {KERNELS}")
        check_positive("step_size", self.step_size)
        target = self.target_acceptance
        if target is None:
            target = REGISTRY[self.kernel].target_acceptance
        elif not REGISTRY[self.kernel].adapts:
            raise ValueError(
                f"{self.kernel.upper()} has no accept/reject step: leave target_acceptance=None"
            )
        elif not 0.0 < target < 1.0:
            raise ValueError(f"target_acceptance must be in (0, 1), got {target!r}")
        object.__setattr__(self, "_target", target)
        steps = self.num_integration_steps
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"num_integration_steps must be an integer >= 1, got {steps!r}")
        if not 0.0 <= self.step_size_jitter < 1.0:
            raise ValueError(f"step_size_jitter must be in [0, 1), got {self.step_size_jitter!r}")

    @property
    def target(self) -> float | None:
        """The acceptance rate the step size is tuned toward (None: no tuning possible)."""
        return self._target

    @property
    def adapts(self) -> bool:
        """Whether the step size is tuned (never for ULA)."""
        return self.adapt_step_size and REGISTRY[self.kernel].adapts

    def replace(self, **changes) -> Sampler:
        """A copy with some fields changed, e.g. ``sampler.replace(step_size=0.1)``."""
        return replace(self, **changes)

    def init(self, position: jax.Array, logdensity_fn: Callable) -> Any:
        """BlackJAX state of one chain at ``position`` (flat vector) under ``logdensity_fn``,
        in ``chain_dtype(position.dtype)`` (a narrower position is promoted to JAX's default
        float dtype).

        Always call this again after the energy's parameters change: MALA/HMC/Barker states
        cache the log-density and its gradient, and a stale cache biases the Metropolis ratio.
        """
        position = jnp.asarray(position)
        position = position.astype(chain_dtype(position.dtype))
        return REGISTRY[self.kernel].init(position, logdensity_fn)

    def step(self, key: jax.Array, state: Any, logdensity_fn: Callable, step_size) -> tuple:
        """One transition of one chain: ``(new_state, ChainInfo)``. The state must be in
        its ``chain_dtype`` (``init`` builds it so): MALA, ULA and Barker refuse a narrower
        one with a ``TypeError``."""
        dtype = state.position.dtype
        if self.kernel != "hmc" and chain_dtype(dtype) != dtype:
            raise TypeError(
                f"{self.kernel.upper()} chains must run in at least JAX's default float dtype "
                f"({chain_dtype(dtype)}), got a {dtype} state: build the states with "
                "Sampler.init / init_chains, which promote the positions"
            )
        step_size = jnp.asarray(step_size, dtype)
        return REGISTRY[self.kernel].step(key, state, logdensity_fn, step_size, self)

    def init_chains(self, positions: jax.Array, logdensity_fn: Callable) -> Any:
        """Vmapped ``init`` for positions of shape ``(num_chains, dim)``."""
        return jax.vmap(self.init, in_axes=(0, None))(positions, logdensity_fn)

    def chains_from(self, positions: jax.Array, logdensity: jax.Array, grad: jax.Array) -> Any:
        """The states ``init_chains`` builds, from the log-density ``(num_chains,)`` and its
        gradient ``(num_chains, dim)`` at ``positions`` already evaluated by the caller: one
        gradient evaluation per chain fewer. They must be those of the log-density the chains
        then move under (a stale cache biases the Metropolis ratio). All three are cast to
        ``chain_dtype(positions.dtype)``, as ``init`` casts the positions."""
        if jnp.shape(logdensity) != positions.shape[:1] or jnp.shape(grad) != positions.shape:
            raise ValueError(
                f"chains_from needs a log-density of shape {positions.shape[:1]} and a gradient "
                f"of shape {positions.shape}, got {jnp.shape(logdensity)} and {jnp.shape(grad)}"
            )
        state = jax.eval_shape(lambda x: self.init(x, jnp.sum), positions[0])  # its type
        if state._fields != ("position", "logdensity", "logdensity_grad"):
            raise NotImplementedError(f"{self.kernel} states are not built from cached values")
        dtype = chain_dtype(positions.dtype)
        return type(state)(*(jnp.asarray(a).astype(dtype) for a in (positions, logdensity, grad)))


def _factory(kernel: str, kwargs: dict) -> Sampler:
    kwargs.setdefault("step_size", REGISTRY[kernel].step_size)
    return Sampler(kernel=kernel, **kwargs)


def mala(**kwargs) -> Sampler:
    """Metropolis-adjusted Langevin (``blackjax.mala``); the default sampler."""
    return _factory("mala", kwargs)


def hmc(num_integration_steps: int = 5, **kwargs) -> Sampler:
    """Hamiltonian Monte Carlo with a fixed number of leapfrog steps (``blackjax.hmc``)."""
    return _factory("hmc", {"num_integration_steps": num_integration_steps, **kwargs})


def ula(**kwargs) -> Sampler:
    """Unadjusted Langevin at temperature 1: ``x + h ∇log p + sqrt(2h) ξ``, no Metropolis step.

    Biased by O(h): prefer ``mala`` when a density is reported. Step size is not tuned.
    """
    return _factory("ula", kwargs)


def barker(**kwargs) -> Sampler:
    """Barker's proposal (``blackjax.barker``): gradient-based, robust to badly tuned steps."""
    return _factory("barker", kwargs)


def get_sampler(sampler: str | Sampler | None) -> Sampler:
    """Turn a kernel name (one of ``KERNELS``), a ``Sampler`` or ``None`` (MALA) into a
    ``Sampler``; a name gets its kernel's default settings.

    Example:
        >>> from numpyro_ebm import samplers
        >>> samplers.get_sampler("ula").step_size
        0.01
    """
    if sampler is None:
        return mala()
    if isinstance(sampler, Sampler):
        return sampler
    if isinstance(sampler, str):
        if sampler not in REGISTRY:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {KERNELS}")
        return _factory(sampler, {})
    raise TypeError(
        f"sampler must be a name {KERNELS} or a numpyro_ebm.samplers.Sampler, got {sampler!r}"
    )
