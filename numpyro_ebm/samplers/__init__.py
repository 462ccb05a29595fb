"""One small interface over BlackJAX kernels, at temperature 1.

Every sampler here targets ``p(x) ∝ exp(logdensity(x))`` exactly (MALA, HMC, Barker: Metropolis
corrected) or up to a step-size bias (ULA). There is no temperature knob on purpose: an EBM whose
negatives come from a colder chain is not the density it reports (see the training guide).

A ``Sampler`` is a frozen, hashable configuration. It knows how to

* build the BlackJAX state of one chain (``sampler.init(position, logdensity_fn)``),
* take one step of one chain (``sampler.step(key, state, logdensity_fn, step_size)``), where
  ``logdensity_fn`` is a call-time argument, so energies with traced parameters compile once,
* say which acceptance rate its step size should be tuned to (``sampler.target_acceptance``).

On top of that, ``run_chains`` runs many chains for a fixed number of steps (``vmap`` over
chains, ``lax.scan`` over steps), ``warmup`` tunes one shared step size by dual averaging
(BlackJAX's ``dual_averaging_adaptation``) on the mean acceptance rate across chains and then
holds it fixed for the rest of the warm-up, and ``sample_chains`` does both and returns
``Draws`` (positions and per-draw ``ChainInfo`` in ArviZ's chain-major order) for
``numpyro_ebm.diagnostics``.

Chains always move on flat vectors of size ``prod(event_shape)``: ``flat_logdensity`` wraps an
energy for one event of any shape, so that HMC's mass matrix and the noise are plain vectors.

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

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import blackjax
import jax
import jax.numpy as jnp
from blackjax.mcmc import diffusions

__all__ = [
    "KERNELS",
    "STEP_SIZE_BOUNDS",
    "ChainInfo",
    "Draws",
    "Sampler",
    "barker",
    "flat_logdensity",
    "get_sampler",
    "hmc",
    "mala",
    "run_chains",
    "sample_chains",
    "summarize",
    "ula",
    "warmup",
]

KERNELS = ("mala", "hmc", "ula", "barker")

# Where every adapted step size stays (training, warm-up, AIS): a chain that wanders into a flat
# or exploding region must not drive the step size to 0 or infinity.
STEP_SIZE_BOUNDS = (1e-6, 10.0)

# Acceptance rates that are optimal in high dimension for each kernel: MALA 0.574 (Roberts &
# Rosenthal 1998), HMC 0.65 (Beskos et al. 2013), Barker ~0.4 (Livingstone & Zanella 2022).
_DEFAULT_TARGET = {"mala": 0.574, "hmc": 0.65, "barker": 0.4, "ula": None}


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


@dataclass(frozen=True)
class Sampler:
    """How to run BlackJAX chains on an energy (kernel, step size, warm-up, thinning).

    The same object configures the negative phase during training (only ``kernel``,
    ``step_size``, ``target_acceptance``, ``adapt_step_size`` and ``num_integration_steps``
    matter there) and ``numpyro_ebm.EnergyDistribution.sample``, which also uses the draw
    settings ``num_warmup``, ``thinning``, ``num_chains`` and ``init_scale``.

    Attributes:
        kernel: one of ``"mala"``, ``"hmc"``, ``"ula"``, ``"barker"``.
        step_size: initial step size ``h`` (BlackJAX convention: the Langevin proposal is
            ``x + h ∇log p(x) + sqrt(2h) ξ``; for HMC the leapfrog step).
        target_acceptance: acceptance rate the step size is tuned toward; ``None`` picks the
            kernel's default (MALA 0.574, HMC 0.65, Barker 0.4). ULA has no acceptance step and
            keeps its step size fixed.
        adapt_step_size: tune the step size (dual averaging during warm-up; during training a
            Robbins-Monro update each step).
        num_integration_steps: leapfrog steps per HMC transition (fixed, so thousands of vmapped
            chains stay in lock-step).
        step_size_jitter: HMC only: each transition uses ``step_size · U(1 − j, 1 + j)``. A fixed
            trajectory length resonates with the target's scales (acceptance then is not
            monotone in the step size and tuning fails); jitter breaks it (Neal 2011, §5.4.2.3).
        num_warmup: warm-up (burn-in) steps before the first draw in ``sample``: the first
            half tunes the step size, the second half runs with the tuned step size fixed (see
            ``warmup``), so every draw comes from a kernel that leaves the target invariant.
        thinning: steps between two recorded draws of the same chain in ``sample``.
        num_chains: chains used by ``sample`` (per condition for a conditional
            distribution); ``None`` runs one chain per requested draw.
        init_scale: chains in ``sample`` start from ``Normal(0, init_scale²)`` in every coordinate.
    """

    kernel: str = "mala"
    step_size: float = 0.05
    target_acceptance: float | None = None
    adapt_step_size: bool = True
    num_integration_steps: int = 5
    step_size_jitter: float = 0.2
    num_warmup: int = 1000
    thinning: int = 1
    num_chains: int | None = None
    init_scale: float = 1.0
    _target: float | None = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown sampler kernel {self.kernel!r}; choose one of {KERNELS}")
        if not (isinstance(self.step_size, int | float) and self.step_size > 0):
            raise ValueError(f"step_size must be a positive number, got {self.step_size!r}")
        target = self.target_acceptance
        if target is None:
            target = _DEFAULT_TARGET[self.kernel]
        elif self.kernel == "ula":
            raise ValueError("ULA has no accept/reject step: leave target_acceptance=None")
        elif not 0.0 < target < 1.0:
            raise ValueError(f"target_acceptance must be in (0, 1), got {target!r}")
        object.__setattr__(self, "_target", target)
        for name in ("num_integration_steps", "thinning"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.num_warmup, int) and self.num_warmup >= 0):
            raise ValueError(f"num_warmup must be an integer >= 0, got {self.num_warmup!r}")
        if self.num_chains is not None and not (
            isinstance(self.num_chains, int) and self.num_chains >= 1
        ):
            raise ValueError(f"num_chains must be None or an integer >= 1, got {self.num_chains}")
        if not 0.0 <= self.step_size_jitter < 1.0:
            raise ValueError(f"step_size_jitter must be in [0, 1), got {self.step_size_jitter!r}")
        if not self.init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {self.init_scale!r}")

    @property
    def target(self) -> float | None:
        """The acceptance rate the step size is tuned toward (None: no tuning possible)."""
        return self._target

    @property
    def adapts(self) -> bool:
        """Whether the step size is tuned (never for ULA)."""
        return self.adapt_step_size and self._target is not None

    def replace(self, **changes) -> Sampler:
        """A copy with some fields changed, e.g. ``sampler.replace(num_warmup=200)``."""
        return replace(self, **changes)

    # -- one chain -------------------------------------------------------------------------
    def init(self, position: jax.Array, logdensity_fn: Callable) -> Any:
        """BlackJAX state of one chain at ``position`` (flat vector) under ``logdensity_fn``.

        Always call this again after the energy's parameters change: MALA/HMC/Barker states
        cache the log-density and its gradient, and a stale cache biases the Metropolis ratio.
        """
        if self.kernel == "hmc":
            return blackjax.hmc.init(position, logdensity_fn)
        if self.kernel == "barker":
            return blackjax.barker.init(position, logdensity_fn)
        return blackjax.mala.init(position, logdensity_fn)  # MALA and ULA share the state

    def step(self, key: jax.Array, state: Any, logdensity_fn: Callable, step_size) -> tuple:
        """One transition of one chain: ``(new_state, ChainInfo)``."""
        step_size = jnp.asarray(step_size, state.position.dtype)
        nan = jnp.full((), jnp.nan, state.position.dtype)
        one = jnp.ones((), jnp.int32)
        no = jnp.zeros((), bool)
        if self.kernel == "mala":
            state, info = blackjax.mala.build_kernel()(key, state, logdensity_fn, step_size)
            return state, ChainInfo(info.acceptance_rate, no, state.logdensity, nan, step_size, one)
        if self.kernel == "hmc":
            key, key_jitter = jax.random.split(key)
            jitter = self.step_size_jitter
            step_size = step_size * jax.random.uniform(
                key_jitter, (), step_size.dtype, minval=1 - jitter, maxval=1 + jitter
            )
            inverse_mass = jnp.ones_like(state.position)
            start = state
            state, info = blackjax.hmc.build_kernel()(
                key, state, logdensity_fn, step_size, inverse_mass, self.num_integration_steps
            )
            # BlackJAX reports the Hamiltonian at the END of the trajectory; ArviZ's BFMI wants
            # the kept state's, which is the start's when the proposal was rejected
            start_hamiltonian = -start.logdensity + 0.5 * jnp.sum(info.momentum**2)
            hamiltonian = jnp.where(info.is_accepted, info.energy, start_hamiltonian)
            steps = jnp.asarray(self.num_integration_steps, jnp.int32)
            return state, ChainInfo(
                info.acceptance_rate, info.is_divergent, state.logdensity, hamiltonian,
                step_size, steps,
            )  # fmt: skip
        if self.kernel == "barker":
            state, info = blackjax.barker.build_kernel()(key, state, logdensity_fn, step_size)
            return state, ChainInfo(info.acceptance_rate, no, state.logdensity, nan, step_size, one)
        # ULA is the MALA proposal without the accept/reject step; BlackJAX's overdamped
        # Langevin integrator is exactly that and keeps (logdensity, grad) cached for reuse.
        integrator = diffusions.overdamped_langevin(jax.value_and_grad(logdensity_fn))
        state = type(state)(*integrator(key, state, step_size))
        return state, ChainInfo(jnp.ones_like(nan), no, state.logdensity, nan, step_size, one)

    # -- many chains -----------------------------------------------------------------------
    def init_chains(self, positions: jax.Array, logdensity_fn: Callable) -> Any:
        """Vmapped ``init`` for positions of shape ``(num_chains, dim)``."""
        return jax.vmap(self.init, in_axes=(0, None))(positions, logdensity_fn)


def mala(**kwargs) -> Sampler:
    """Metropolis-adjusted Langevin (``blackjax.mala``); the default sampler."""
    return Sampler(kernel="mala", **kwargs)


def hmc(num_integration_steps: int = 5, **kwargs) -> Sampler:
    """Hamiltonian Monte Carlo with a fixed number of leapfrog steps (``blackjax.hmc``)."""
    kwargs.setdefault("step_size", 0.1)
    return Sampler(kernel="hmc", num_integration_steps=num_integration_steps, **kwargs)


def ula(**kwargs) -> Sampler:
    """Unadjusted Langevin at temperature 1: ``x + h ∇log p + sqrt(2h) ξ``, no Metropolis step.

    Biased by O(h): prefer ``mala`` when a density is reported. Step size is not tuned.
    """
    kwargs.setdefault("step_size", 0.01)
    return Sampler(kernel="ula", **kwargs)


def barker(**kwargs) -> Sampler:
    """Barker's proposal (``blackjax.barker``): gradient-based, robust to badly tuned steps."""
    return Sampler(kernel="barker", **kwargs)


def get_sampler(sampler: str | Sampler | None) -> Sampler:
    """Turn ``"mala" | "hmc" | "ula" | "barker"`` or a ``Sampler`` into a ``Sampler``."""
    if sampler is None:
        return mala()
    if isinstance(sampler, Sampler):
        return sampler
    if isinstance(sampler, str):
        factories = {"mala": mala, "hmc": hmc, "ula": ula, "barker": barker}
        if sampler not in factories:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {KERNELS}")
        return factories[sampler]()
    raise TypeError(
        f"sampler must be a name {KERNELS} or a numpyro_ebm.samplers.Sampler, got {sampler!r}"
    )


def flat_logdensity(energy: Callable, event_shape: tuple[int, ...]) -> Callable:
    """``z -> -energy(z.reshape(event_shape))`` for flat ``z`` of size ``prod(event_shape)``."""

    def logdensity(z):
        return -energy(jnp.reshape(z, event_shape))

    return logdensity


def run_chains(
    key: jax.Array,
    sampler: Sampler,
    logdensity_fn: Callable,
    states: Any,
    step_size,
    num_steps: int,
    *,
    thinning: int = 1,
    keep_positions: bool = False,
) -> tuple[Any, ChainInfo, jax.Array | None]:
    """Advance ``num_chains`` chains by ``num_steps`` steps with a fixed step size.

    Args:
        key: PRNG key, used once.
        sampler: the kernel configuration.
        logdensity_fn: log-density of ONE chain's flat position.
        states: vmapped BlackJAX states (leading axis: chains), e.g. from
            ``Sampler.init_chains``.
        step_size: scalar step size shared by all chains.
        num_steps: number of transitions (static).
        thinning: record every ``thinning``-th step (static); ``num_steps`` must be a multiple.
        keep_positions: also return the recorded positions.

    Returns:
        ``(final_states, trace, positions)``: ``trace`` is a ``ChainInfo`` of arrays of
        shape ``(num_steps // thinning, num_chains)`` (with thinning, one record per
        ``thinning`` steps: mean acceptance and step size, any divergence, total gradient
        evaluations, log-density and Hamiltonian at the recorded position); ``positions`` has shape
        ``(num_steps // thinning, num_chains, dim)``, or is ``None`` without ``keep_positions``.
    """
    if num_steps % thinning:
        raise ValueError(f"num_steps={num_steps} must be a multiple of thinning={thinning}")
    vstep = _vmapped_step(sampler, logdensity_fn, states)

    def one_step(carry, step_key):
        return vstep(step_key, carry, step_size)

    def one_record(carry, record_key):
        carry, infos = jax.lax.scan(one_step, carry, jax.random.split(record_key, thinning))
        return carry, (summarize(infos), carry.position if keep_positions else None)

    keys = jax.random.split(key, num_steps // thinning)
    final, (trace, positions) = jax.lax.scan(one_record, states, keys)
    return final, trace, positions


def summarize(infos: ChainInfo) -> ChainInfo:
    """One record for several steps (leading axis of ``infos``): mean acceptance and step size,
    any divergence, total gradient evaluations, the last log-density and Hamiltonian. Thinned
    records built this way hide nothing the diagnostics need."""
    return ChainInfo(
        acceptance_rate=jnp.mean(infos.acceptance_rate, axis=0),
        is_divergent=jnp.any(infos.is_divergent, axis=0),
        logdensity=infos.logdensity[-1],
        hamiltonian=infos.hamiltonian[-1],
        step_size=jnp.mean(infos.step_size, axis=0),
        num_integration_steps=jnp.sum(infos.num_integration_steps, axis=0),
    )


def _vmapped_step(sampler: Sampler, logdensity_fn: Callable, states: Any) -> Callable:
    """``(key, states, step_size) -> (states, infos)`` stepping every chain with its own key."""
    num_chains = jax.tree.leaves(states)[0].shape[0]
    step = jax.vmap(lambda k, s, h: sampler.step(k, s, logdensity_fn, h), in_axes=(0, 0, None))
    return lambda key, s, h: step(jax.random.split(key, num_chains), s, h)


class WarmupInfo(NamedTuple):
    """Per-step record of ``warmup``: mean acceptance across chains and the step size used."""

    acceptance_rate: jax.Array
    step_size: jax.Array


def warmup(
    key: jax.Array,
    sampler: Sampler,
    logdensity_fn: Callable,
    states: Any,
    num_steps: int,
    step_size=None,
) -> tuple[Any, jax.Array, WarmupInfo]:
    """Burn in ``num_chains`` chains: tune one shared step size, then hold it fixed.

    The first ``num_steps // 2`` steps tune the step size by BlackJAX's dual averaging
    (Hoffman & Gelman 2014) on the mean acceptance rate across chains. The remaining steps run
    with the tuned (averaged) step size held fixed: while it adapts, the step size depends on
    where the chains are, so the chains' state is not a draw from the target (adaptive MCMC's
    last iterate is biased; a single chain comes out under-dispersed). After the switch every
    step is a Metropolis kernel that leaves the target invariant, and the chains forget the
    adaptation before the first draw. Kernels that do not adapt (ULA, or
    ``adapt_step_size=False``) run all ``num_steps`` steps with ``step_size``.

    Args:
        key: PRNG key, used once.
        sampler: the kernel configuration.
        logdensity_fn: log-density of one flat position.
        states: vmapped BlackJAX states, leading axis chains.
        num_steps: warm-up steps (static), tuning and fixed together.
        step_size: initial step size (default ``sampler.step_size``).

    Returns:
        ``(states, step_size, WarmupInfo)``: the chains after all ``num_steps`` steps, the
        step size they ended with (the one to sample with), and per-step records of shape
        ``(num_steps,)``.
    """
    step_size = jnp.asarray(sampler.step_size if step_size is None else step_size, jnp.float32)
    if num_steps == 0:
        empty = jnp.zeros((0,), jnp.float32)
        return states, step_size, WarmupInfo(empty, empty)
    num_tuning = num_steps // 2 if sampler.adapts else 0
    key_tune, key_fixed = jax.random.split(key)
    tuning = WarmupInfo(jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.float32))
    if num_tuning:
        states, step_size, tuning = _tune_step_size(
            key_tune, sampler, logdensity_fn, states, num_tuning, step_size
        )
    states, infos, _ = run_chains(
        key_fixed, sampler, logdensity_fn, states, step_size, num_steps - num_tuning
    )
    acc = jnp.mean(infos.acceptance_rate, axis=1)
    fixed = WarmupInfo(acc, jnp.full_like(acc, step_size))
    return states, step_size, jax.tree.map(lambda a, b: jnp.concatenate([a, b]), tuning, fixed)


def _tune_step_size(key, sampler, logdensity_fn, states, num_steps, step_size):
    """Dual averaging for ``num_steps`` steps: ``(states, averaged step size, WarmupInfo)``."""
    da_init, da_update, da_final = blackjax.adaptation.step_size.dual_averaging_adaptation(
        sampler.target
    )
    vstep = _vmapped_step(sampler, logdensity_fn, states)

    def one_step(carry, step_key):
        chain_states, da_state = carry
        h = jnp.exp(da_state.log_step_size)
        new, info = vstep(step_key, chain_states, h)
        # A NaN acceptance (e.g. a proposal into an inf-energy region) counts as a rejection.
        acc = jnp.mean(jnp.nan_to_num(info.acceptance_rate, nan=0.0))
        return (new, da_update(da_state, acc)), WarmupInfo(acc, h)

    (states, da_state), infos = jax.lax.scan(
        one_step, (states, da_init(step_size)), jax.random.split(key, num_steps)
    )
    return states, da_final(da_state).astype(jnp.float32), infos


class Draws(NamedTuple):
    """Recorded draws of several chains in ArviZ's ``(chain, draw)`` order, with what the
    sampler reported for each (``numpyro_ebm.diagnostics.to_datatree`` turns it into a DataTree).

    Attributes:
        positions: ``(num_chains, num_draws, *event_shape)``.
        info: ``ChainInfo`` whose fields are ``(num_chains, num_draws)``; with thinning one record
            covers the steps since the previous draw (see ``run_chains``).
        step: ``(num_draws,)`` the step each draw was recorded at (sampler steps after
            warm-up; training steps for the chains ``fit`` records).
    """

    positions: Any
    info: ChainInfo
    step: Any


def sample_chains(
    key: jax.Array,
    sampler: Sampler,
    logdensity_fn: Callable,
    positions: jax.Array,
    num_draws: int,
    *,
    event_shape: tuple[int, ...] | None = None,
) -> tuple[Draws, jax.Array]:
    """Warm up chains (``sampler.num_warmup`` steps, see ``warmup``) and record draws.

    Every recorded draw comes after the tuned step size has been held fixed for the second
    half of the warm-up, so with enough warm-up each chain's draws follow the target, even for
    one chain and one draw.

    Args:
        key: PRNG key, used once (split into warm-up and sampling keys).
        sampler: kernel and draw settings (``num_warmup``, ``thinning``).
        logdensity_fn: log-density of one flat position.
        positions: ``(num_chains, dim)`` flat starting points.
        num_draws: draws per chain, one every ``sampler.thinning`` steps (static).
        event_shape: shape to give each draw (default: flat).

    Returns:
        ``(Draws, step_size)``: the draws (chain-major) and the tuned step size.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from numpyro_ebm import samplers
        >>> logdensity = lambda x: -0.5 * jnp.sum(x**2)
        >>> draws, h = samplers.sample_chains(
        ...     jax.random.key(0), samplers.mala(num_warmup=100), logdensity,
        ...     jnp.zeros((4, 2)), num_draws=50)
        >>> draws.positions.shape, draws.info.acceptance_rate.shape
        ((4, 50, 2), (4, 50))
    """
    positions = jnp.asarray(positions)
    if positions.ndim != 2:
        raise ValueError(
            f"positions must be flat starting points (num_chains, dim), got {positions.shape}"
        )
    if not (isinstance(num_draws, int) and num_draws >= 1):
        raise ValueError(f"num_draws must be an integer >= 1, got {num_draws!r}")
    num_chains, dim = positions.shape
    event_shape = (dim,) if event_shape is None else tuple(event_shape)
    key_warmup, key_draws = jax.random.split(key)
    states = sampler.init_chains(positions, logdensity_fn)
    states, step_size, _ = warmup(key_warmup, sampler, logdensity_fn, states, sampler.num_warmup)
    _, trace, recorded = run_chains(
        key_draws,
        sampler,
        logdensity_fn,
        states,
        step_size,
        num_draws * sampler.thinning,
        thinning=sampler.thinning,
        keep_positions=True,
    )
    chain_major = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), trace)
    recorded = jnp.swapaxes(recorded, 0, 1).reshape(num_chains, num_draws, *event_shape)
    step = sampler.thinning * (1 + jnp.arange(num_draws))
    return Draws(recorded, chain_major, step), step_size
