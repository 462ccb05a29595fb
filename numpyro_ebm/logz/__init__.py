"""Partition-function estimators: every one returns a ``LogZEstimate``.

``log Z = log ∫ exp(−E(x)) dx`` (or ``log Σ exp(−E(x))`` over a finite support).

* ``grid``: dims ≤ 3, all mass inside the box; error: discretisation and truncation (the
  reported error bar is the difference to the half-resolution rule).
* ``enumerate``: a finite support you can list; exact.
* ``importance``: a proposal covering the density's mass; ``E[log Ẑ] ≤ log Z`` (Jensen);
  delta-method standard error and effective sample size.
* ``ais``: a normalised base and enough temperatures; ``E[log Ẑ] ≤ log Z``; standard error
  from independent runs.

Importance sampling and AIS produce an UNBIASED estimate of Z, hence a downward-biased (on
average) log Z, hence optimistic log-likelihoods ``−E(x) − log Ẑ``. Report their standard errors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from numpyro_ebm.gaussian import fit_base
from numpyro_ebm.samplers import STEP_SIZE_BOUNDS
from numpyro_ebm.validation import validate_data

__all__ = [
    "LogZEstimate",
    "ais",
    "enumerate",
    "grid",
    "grid_covering",
    "grid_log_density",
    "grid_traced",
    "importance",
    "reverse_ais",
]


class LogZEstimate(NamedTuple):
    """An estimate of ``log Z`` with its uncertainty.

    Attributes:
        value: the estimate (float).
        stderr: standard error for stochastic estimators; for ``grid``, an estimate of the
            discretisation error (difference to the half-resolution rule).
        method: name of the estimator.
        ess: effective sample size (importance sampling; for AIS the mean final ESS per run).
        info: estimator-specific diagnostics (dict), e.g. AIS per-temperature ESS/acceptance.
    """

    value: float
    stderr: float
    method: str
    ess: float | None = None
    info: dict | None = None


def _axes(bounds, num_points: int) -> list[np.ndarray]:
    """Midpoints of ``num_points`` equal cells per dimension."""
    bounds = np.asarray(bounds, dtype=np.float64)
    if bounds.ndim != 2 or bounds.shape[1] != 2 or not np.all(bounds[:, 1] > bounds[:, 0]):
        raise ValueError(f"bounds must have shape (dims, 2) with lo < hi, got {bounds.tolist()}")
    if not 1 <= bounds.shape[0] <= 3:
        raise ValueError(f"grid quadrature supports 1 to 3 dimensions, got {bounds.shape[0]}")
    if not (isinstance(num_points, int) and num_points >= 2):
        raise ValueError(f"num_points must be an integer >= 2, got {num_points!r}")
    out = []
    for lo, hi in bounds:
        edges = np.linspace(lo, hi, num_points + 1)
        out.append(0.5 * (edges[1:] + edges[:-1]))
    return out


def grid_log_density(
    energy: Callable, bounds, num_points: int, *, chunk_size: int = 65_536
) -> tuple[np.ndarray, list[np.ndarray], float]:
    """``−energy`` on the midpoint grid, evaluated in chunks so 1e6+ points fit in memory.

    Returns:
        ``(neg_energy, axes, cell_volume)`` with ``neg_energy`` of shape
        ``(num_points,) * dims`` (float64 numpy) and ``axes`` the per-dimension midpoints.
    """
    axes = _axes(bounds, num_points)
    mesh = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(axes))
    fn = jax.jit(jax.vmap(lambda x: -energy(x)))
    dtype = jnp.result_type(float)
    values = []
    for start in range(0, mesh.shape[0], chunk_size):
        values.append(np.asarray(fn(jnp.asarray(mesh[start : start + chunk_size], dtype))))
    neg_energy = np.concatenate(values).astype(np.float64).reshape((num_points,) * len(axes))
    cell = math.prod(float(a[1] - a[0]) for a in axes)
    return neg_energy, axes, cell


def _log_integral(neg_energy: np.ndarray, cell: float) -> float:
    finite = neg_energy[np.isfinite(neg_energy)]
    if finite.size == 0:
        raise ValueError("the energy is not finite anywhere on the grid")
    peak = finite.max()
    return float(np.log(np.sum(np.exp(neg_energy - peak)) * cell) + peak)


def grid(energy: Callable, bounds, num_points: int = 512) -> LogZEstimate:
    """``log Z`` by the midpoint rule on a box (dims ≤ 3).

    Exact up to discretisation and to the mass outside ``bounds``: choose a box that holds all
    the density's mass (the model's, not only the data's). The reported ``stderr`` is the
    difference to the same rule with half the points per dimension, a conservative estimate
    of the discretisation error for smooth energies.

    Args:
        energy: one event ``(dims,)`` -> scalar.
        bounds: ``(dims, 2)`` array of ``[lo, hi]`` per dimension.
        num_points: grid points per dimension (even).

    Example:
        >>> import jax.numpy as jnp
        >>> from numpyro_ebm.energies import GaussianEnergy
        >>> est = grid(GaussianEnergy(jnp.zeros(2)), [[-8, 8], [-8, 8]], 256)
        >>> round(est.value, 3)   # log 2π
        1.838
    """
    neg_energy, _, cell = grid_log_density(energy, bounds, num_points)
    if np.any(np.isnan(neg_energy)):
        raise ValueError(f"energy is NaN at {int(np.isnan(neg_energy).sum())} grid points")
    value = _log_integral(neg_energy, cell)
    coarse_neg_energy, _, coarse_cell = grid_log_density(energy, bounds, num_points // 2)
    coarse = _log_integral(coarse_neg_energy, coarse_cell)
    return LogZEstimate(value, abs(value - coarse), "grid")


def _outer_shell_mass(neg_energy: np.ndarray, axes: list, center, half) -> float:
    """Share of the grid's mass farther than half the box's half-width from its centre."""
    mesh = np.meshgrid(*axes, indexing="ij")
    outer = np.zeros(neg_energy.shape, bool)
    for coords, c, h in zip(mesh, center, half, strict=True):
        outer |= np.abs(coords - c) > 0.5 * h
    weights = np.exp(neg_energy - np.max(neg_energy[np.isfinite(neg_energy)]))
    weights = np.where(np.isfinite(weights), weights, 0.0)
    return float(weights[outer].sum() / weights.sum())


def grid_covering(
    energy: Callable,
    bounds,
    num_points: int = 512,
    *,
    edge_mass: float = 1e-3,
    max_doublings: int = 6,
) -> LogZEstimate:
    """``grid`` on a box grown until it holds the density's mass (dims ≤ 3).

    Starts from ``bounds`` (e.g. the data's box) widened by half its width on each side, and
    doubles the box about its centre while more than ``edge_mass`` of the mass on the grid lies
    in the box's outer shell (farther than half the half-width from the centre): a model can put
    mass well outside the data, and ``grid`` silently misses what is outside its box.

    Args:
        energy: one event ``(dims,)`` -> scalar.
        bounds: ``(dims, 2)`` starting box ``[lo, hi]`` per dimension.
        num_points: grid points per dimension (even).
        edge_mass: largest share of the mass allowed in the outer shell.
        max_doublings: stop growing after this many doublings (``info`` then shows the shell's
            mass, above ``edge_mass``).

    Returns:
        ``LogZEstimate`` of ``grid``, with ``info = {"bounds": box, "outer_shell_mass": m}``.
    """
    bounds = np.asarray(bounds, np.float64)
    if bounds.ndim != 2 or bounds.shape[1] != 2 or not np.all(np.isfinite(bounds)):
        raise ValueError(f"bounds must be a finite (dims, 2) array, got {bounds.tolist()!r}")
    center = bounds.mean(axis=1)
    half = np.maximum(bounds[:, 1] - bounds[:, 0], 1e-3)
    for _ in range(max_doublings + 1):
        box = np.stack([center - half, center + half], axis=1)
        neg_energy, axes, _ = grid_log_density(energy, box, num_points)
        edge = _outer_shell_mass(neg_energy, axes, center, half)
        if edge <= edge_mass:
            break
        half = 2 * half
    estimate = grid(energy, box, num_points)
    return estimate._replace(info={"bounds": box.tolist(), "outer_shell_mass": edge})


def grid_traced(energy: Callable, bounds, num_points: int = 256) -> jax.Array:
    """``log Z`` by the midpoint rule as a JAX expression: differentiable and traceable.

    The same rule as ``grid`` (dims ≤ 3) but computed with ``jnp`` in one pass (no chunks,
    no error bar), so it can sit inside a jitted function or a NumPyro model: use it for
    Bayesian inference over the parameters of a low-dimensional energy, where the likelihood
    ``exp(−E_θ(x)) / Z(θ)`` needs ``log Z(θ)`` at every ``θ`` the sampler visits (see the
    docs' "Bayesian energy parameters"). ``num_points ** dims`` energies per call.

    Args:
        energy: one event ``(dims,)`` -> scalar; its parameters may be traced.
        bounds: ``(dims, 2)`` box holding all the mass, for every ``θ`` of interest.
        num_points: grid points per dimension.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from numpyro_ebm.logz import grid_traced
        >>> def log_z(log_sigma):  # E(x) = ½ x² / σ²: log Z = log σ + ½ log 2π
        ...     energy = lambda x: 0.5 * jnp.sum(x**2) * jnp.exp(-2 * log_sigma)
        ...     return grid_traced(energy, [[-10.0, 10.0]], 512)
        >>> round(float(jax.grad(log_z)(0.3)), 4)  # d log Z / d log σ = 1
        1.0
    """
    axes = _axes(bounds, num_points)
    mesh = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(axes))
    cell = math.prod(float(a[1] - a[0]) for a in axes)
    neg_energy = -jax.vmap(energy)(jnp.asarray(mesh, jnp.result_type(float)))
    return jax.nn.logsumexp(neg_energy) + math.log(cell)


def enumerate(energy: Callable, support) -> LogZEstimate:
    """Exact ``log Σ_x exp(−E(x))`` over a finite support ``(num_states, *event_shape)``."""
    support = jnp.asarray(support)
    if support.ndim < 1 or support.shape[0] == 0:
        raise ValueError("support must be a non-empty array of states (num_states, *event_shape)")
    neg = np.asarray(jax.jit(jax.vmap(lambda x: -energy(x)))(support), np.float64)
    if np.any(np.isnan(neg)):
        raise ValueError(f"energy is NaN at {int(np.isnan(neg).sum())} of the support's states")
    return LogZEstimate(_log_integral(neg, 1.0), 0.0, "enumerate")


def _log_mean_exp_with_stderr(log_w: np.ndarray) -> tuple[float, float, float]:
    """``log mean exp(log_w)``, its delta-method standard error and the effective sample size."""
    log_w = np.asarray(log_w, np.float64)
    peak = log_w.max()
    w = np.exp(log_w - peak)
    n = w.size
    mean = w.mean()
    value = float(np.log(mean) + peak)
    stderr = float(w.std(ddof=1) / (np.sqrt(n) * mean)) if n > 1 else float("inf")
    ess = float(w.sum() ** 2 / np.sum(w**2))
    return value, stderr, ess


def importance(
    energy: Callable, proposal, *, key: jax.Array, num_samples: int = 100_000
) -> LogZEstimate:
    """``log Z`` by importance sampling: ``Ẑ = mean exp(−E(xᵢ) − log q(xᵢ))``, ``xᵢ ~ q``.

    Args:
        energy: one event -> scalar.
        proposal: any NumPyro distribution with the energy's event shape (and no batch shape);
            it must cover the density's mass, or the estimate silently misses it (check ``ess``).
        key: PRNG key.
        num_samples: proposal draws.

    Returns:
        ``LogZEstimate`` with the delta-method standard error
        ``std(w) / (sqrt(n) mean(w))`` and the effective sample size ``(Σw)² / Σw²``.

    Raises:
        ValueError: non-finite energies at proposal draws (how many are reported).
    """
    if proposal.batch_shape != ():
        raise ValueError(f"proposal must have batch_shape (), got {proposal.batch_shape}")
    x = proposal.sample(key, (num_samples,))
    log_w = jax.jit(lambda x: -jax.vmap(energy)(x) - proposal.log_prob(x))(x)
    log_w = np.asarray(log_w, np.float64)
    bad = ~np.isfinite(log_w)
    if bad.any():
        raise ValueError(
            f"energy or proposal log-density is not finite at {int(bad.sum())} of "
            f"{num_samples} proposal draws"
        )
    value, stderr, ess = _log_mean_exp_with_stderr(log_w)
    return LogZEstimate(value, stderr, "importance", ess)


def _base_distribution(base, data, event_shape):
    dim = math.prod(event_shape)
    if base is not None:
        return base
    if data is None:
        return dist.Normal(jnp.zeros(dim), 1.0).to_event(1)
    data = validate_data(data, event_shape, name="data (for the AIS base)")
    fitted = fit_base(jnp.reshape(data, (data.shape[0], -1)))
    return dist.MultivariateNormal(fitted.mean, scale_tril=fitted.scale_tril)


def ais(
    energy: Callable,
    event_shape,
    *,
    key: jax.Array,
    base=None,
    data=None,
    num_particles: int = 1000,
    num_temperatures: int = 200,
    num_mcmc_steps: int = 5,
    num_runs: int = 8,
    schedule_power: float = 4.0,
    kernel: str = "mala",
    adaptive: bool = False,
    target_ess: float = 0.5,
    initial_step_size: float = 0.1,
) -> LogZEstimate:
    """``log Z`` by annealed importance sampling / tempered SMC on BlackJAX.

    Anneals from a normalised base ``p₀`` to ``exp(−E)`` along ``p₀^{1−β} exp(−βE)`` (BlackJAX
    ``tempered_smc`` with ``logprior = log p₀`` and ``loglikelihood = −E − log p₀``) with MALA
    or HMC moves whose step size is re-tuned at every temperature from the acceptance of the
    previous one. ``Σ log_likelihood_increment`` of one run estimates ``log Z``.
    ``num_runs`` independent runs give the standard error: the returned value is the log of the
    mean of their (unbiased) ``Ẑ``, with a delta-method error bar.

    Args:
        energy: one event -> scalar.
        event_shape: shape of one event.
        key: PRNG key.
        base: NumPyro distribution over FLAT events of size ``prod(event_shape)``; default
            standard normal, or a Gaussian fitted to ``data`` when given.
        data: ``(n, *event_shape)`` samples to fit the Gaussian base to.
        num_particles: particles per run.
        num_temperatures: temperatures of the fixed schedule ``β_t = (t/T)^schedule_power``.
        num_mcmc_steps: MCMC moves per temperature.
        num_runs: independent runs (≥ 2 for an error bar).
        schedule_power: power of the fixed schedule (larger: more temperatures near β = 0).
        kernel: ``"mala"`` or ``"hmc"``.
        adaptive: choose temperatures adaptively (BlackJAX ``adaptive_tempered_smc``, each
            step keeping the ESS at ``target_ess``) instead of the fixed schedule.
        target_ess: see ``adaptive``.
        initial_step_size: step size at ``β = 0`` (then tuned).

    Returns:
        ``LogZEstimate`` with ``info`` holding per-run estimates and, for the fixed schedule,
        per-temperature ESS and acceptance of the first run.

    Raises:
        ValueError: non-finite energies at some particles (reported with the temperature).
    """
    event_shape = tuple(int(n) for n in event_shape)
    base = _base_distribution(base, data, event_shape)
    cfg = _ais_config(
        event_shape,
        num_particles,
        num_temperatures,
        num_mcmc_steps,
        num_runs,
        schedule_power,
        kernel,
        adaptive,
        target_ess,
        initial_step_size,
        reverse=False,
    )
    log_zs, infos = _ais_runs(energy, base, jax.random.split(key, num_runs), cfg)
    log_zs = np.asarray(log_zs, np.float64)
    if "nonfinite" in infos:
        bad = np.asarray(infos["nonfinite"])
        if bad.any():
            run, t = np.argwhere(bad > 0)[0]
            raise ValueError(
                f"AIS: the energy is not finite at {int(bad[run, t])} of {num_particles} "
                f"particles at temperature β = {float(infos['betas'][run, t]):.4g} "
                f"(step {int(t)} of run {int(run)}); {int((bad > 0).any(1).sum())} of "
                f"{num_runs} runs affected"
            )
    elif not np.all(np.isfinite(log_zs)):
        raise ValueError(
            f"AIS: the energy was not finite at some particles in "
            f"{int((~np.isfinite(log_zs)).sum())} of {num_runs} adaptive runs"
        )
    value, stderr, _ = _log_mean_exp_with_stderr(log_zs)
    info = {"log_z_runs": log_zs}
    ess = None
    if "ess" in infos:
        info.update(
            ess=np.asarray(infos["ess"][0]),
            acceptance=np.asarray(infos["acceptance"][0]),
            betas=np.asarray(infos["betas"][0]),
        )
        ess = float(np.mean(np.asarray(infos["ess"])[:, -1]) * num_particles)
    else:
        info["num_temperatures"] = np.asarray(infos["num_temperatures"])
    return LogZEstimate(value, stderr, "ais-adaptive" if adaptive else "ais", ess, info)


def reverse_ais(
    energy: Callable,
    exact_samples,
    *,
    key: jax.Array,
    base=None,
    data=None,
    num_particles: int = 1000,
    num_temperatures: int = 200,
    num_mcmc_steps: int = 5,
    num_runs: int = 8,
    schedule_power: float = 4.0,
    kernel: str = "mala",
    initial_step_size: float = 0.1,
) -> LogZEstimate:
    """Reverse AIS from EXACT samples of ``exp(−E)/Z``: the upper side of a BDMC sandwich.

    Walks the same path as ``ais`` from β = 1 back to β = 0, starting from exact samples of the
    target (available on simulated data, e.g. a model you sampled data from). Its weights
    estimate ``1/Z`` without bias, so ``E[log Ẑ] ≥ log Z``: together with forward ``ais``
    (``E[log Ẑ] ≤ log Z``) it brackets ``log Z`` (Grosse et al. 2015, "Sandwiching the marginal
    likelihood using bidirectional Monte Carlo"). A wide gap means too few temperatures.

    Args:
        energy: one event -> scalar.
        exact_samples: ``(n, *event_shape)`` exact draws from ``exp(−E)/Z``; each run uses
            ``num_particles`` of them chosen at random.
        key: PRNG key.
        base: as for ``ais``.
        data: as for ``ais``.
        num_particles: as for ``ais``.
        num_temperatures: as for ``ais``.
        num_mcmc_steps: as for ``ais``.
        num_runs: as for ``ais``.
        schedule_power: as for ``ais``.
        kernel: as for ``ais``.
        initial_step_size: as for ``ais``.

    Returns:
        ``LogZEstimate`` (method ``"reverse-ais"``): ``−log mean(1/Ẑ)`` over runs, delta-method
        standard error.
    """
    exact_samples = jnp.asarray(exact_samples)
    event_shape = tuple(int(n) for n in exact_samples.shape[1:])
    if exact_samples.ndim < 2 or exact_samples.shape[0] < 2:
        raise ValueError("exact_samples must have shape (n >= 2, *event_shape)")
    if not bool(jnp.all(jnp.isfinite(exact_samples))):
        raise ValueError("exact_samples contain NaN or inf")
    cfg = _ais_config(
        event_shape,
        num_particles,
        num_temperatures,
        num_mcmc_steps,
        num_runs,
        schedule_power,
        kernel,
        False,
        0.5,
        initial_step_size,
        reverse=True,
    )
    base = _base_distribution(base, data, event_shape)
    k_pick, k_runs = jax.random.split(key)
    flat = exact_samples.reshape(exact_samples.shape[0], -1)
    rows = jax.random.randint(k_pick, (num_runs, num_particles), 0, flat.shape[0])
    log_inv_z, infos = _ais_runs(energy, base, jax.random.split(k_runs, num_runs), cfg, flat[rows])
    bad = np.asarray(infos["nonfinite"])
    if bad.any():
        raise ValueError(f"reverse AIS: the energy is not finite at {int(bad.max())} particles")
    value, stderr, _ = _log_mean_exp_with_stderr(np.asarray(log_inv_z, np.float64))
    info = {"log_z_runs": -np.asarray(log_inv_z, np.float64)}
    return LogZEstimate(-value, stderr, "reverse-ais", None, info)


class _AISConfig(NamedTuple):
    event_shape: tuple
    num_particles: int
    num_temperatures: int
    num_mcmc_steps: int
    schedule_power: float
    kernel: str
    adaptive: bool
    target_ess: float
    initial_step_size: float
    reverse: bool = False


def _ais_config(
    event_shape,
    num_particles,
    num_temperatures,
    num_mcmc_steps,
    num_runs,
    schedule_power,
    kernel,
    adaptive,
    target_ess,
    initial_step_size,
    *,
    reverse,
) -> _AISConfig:
    """Checked, hashable AIS settings (shared by ``ais`` and ``reverse_ais``)."""
    if kernel not in ("mala", "hmc"):
        raise ValueError(f"kernel must be 'mala' or 'hmc', got {kernel!r}")
    if num_runs < 1 or num_particles < 2 or num_temperatures < 1 or num_mcmc_steps < 1:
        raise ValueError(
            "num_runs >= 1, num_particles >= 2, num_temperatures >= 1 and num_mcmc_steps >= 1 "
            "required"
        )
    return _AISConfig(
        tuple(event_shape),
        int(num_particles),
        int(num_temperatures),
        int(num_mcmc_steps),
        float(schedule_power),
        kernel,
        bool(adaptive),
        float(target_ess),
        float(initial_step_size),
        reverse,
    )


@eqx.filter_jit
def _ais_runs(energy, base, keys, cfg: _AISConfig, start_particles=None):
    """All runs of ``ais`` in one compiled call (compiled once per configuration: the energy
    and base are traced arguments, so new parameters do not recompile)."""
    import blackjax
    from blackjax.smc import resampling

    (
        event_shape,
        num_particles,
        num_temperatures,
        num_mcmc_steps,
        schedule_power,
        kernel,
        adaptive,
        target_ess,
        initial_step_size,
        reverse,
    ) = cfg
    dim = math.prod(event_shape)
    target_acceptance = 0.574 if kernel == "mala" else 0.65

    def neg_energy(z):
        return -energy(jnp.reshape(z, event_shape))

    def loglikelihood(z):
        return neg_energy(z) - base.log_prob(z)

    if kernel == "mala":
        step_fn, init_fn = blackjax.mala.build_kernel(), blackjax.mala.init

        def params(h):
            return {"step_size": jnp.reshape(h, (1,))}
    else:
        step_fn, init_fn = blackjax.hmc.build_kernel(), blackjax.hmc.init

        def params(h):
            return {
                "step_size": jnp.reshape(h, (1,)),
                "inverse_mass_matrix": jnp.ones((1, dim)),
                "num_integration_steps": jnp.array([5]),
            }

    def tuned(h, info):
        acc = jnp.mean(jnp.nan_to_num(info.update_info.acceptance_rate, nan=0.0))
        return jnp.clip(h * jnp.exp(2.0 * (acc - target_acceptance)), *STEP_SIZE_BOUNDS), acc

    def one_run(run_key, start):
        k_init, k_loop = jax.random.split(run_key)
        if reverse:
            particles = start.reshape(num_particles, dim)
        else:
            particles = base.sample(k_init, (num_particles,)).reshape(num_particles, dim)
        if adaptive:
            smc = blackjax.adaptive_tempered_smc(
                base.log_prob,
                loglikelihood,
                step_fn,
                init_fn,
                params(initial_step_size),
                resampling.systematic,
                target_ess,
                num_mcmc_steps=num_mcmc_steps,
            )

            # adaptive_tempered_smc keeps its MCMC parameters fixed: tune them on the way
            def cond(carry):
                state, *_ = carry
                return (state.tempering_param < 1.0) & (carry[3] < 10 * num_temperatures)

            def body(carry):
                state, log_z, k, count, h = carry
                k, sub = jax.random.split(k)
                kernel_fn = blackjax.adaptive_tempered_smc(
                    base.log_prob,
                    loglikelihood,
                    step_fn,
                    init_fn,
                    params(h),
                    resampling.systematic,
                    target_ess,
                    num_mcmc_steps=num_mcmc_steps,
                ).step
                state, info = kernel_fn(sub, state)
                h, _ = tuned(h, info)
                bad = jnp.sum(~jnp.isfinite(jax.vmap(neg_energy)(state.particles)))
                log_z = log_z + jnp.where(bad > 0, jnp.nan, info.log_likelihood_increment)
                return state, log_z, k, count + 1, h

            init_state = smc.init(particles)
            _, log_z, _, count, _ = jax.lax.while_loop(
                cond, body, (init_state, jnp.zeros(()), k_loop, 0, jnp.asarray(initial_step_size))
            )
            return log_z, {"num_temperatures": count}

        betas = (jnp.arange(1, num_temperatures + 1) / num_temperatures) ** schedule_power
        if reverse:  # the same path walked from β = 1 back to β = 0
            betas = (jnp.arange(num_temperatures - 1, -1, -1) / num_temperatures) ** schedule_power
        smc = blackjax.tempered_smc(
            base.log_prob,
            loglikelihood,
            step_fn,
            init_fn,
            params(initial_step_size),
            resampling.systematic,
            num_mcmc_steps=num_mcmc_steps,
        )
        kernel_fn = blackjax.smc.tempered.build_kernel(
            base.log_prob, loglikelihood, step_fn, init_fn, resampling.systematic
        )

        def body(carry, xs):
            state, h = carry
            beta, k = xs
            state, info = kernel_fn(k, state, num_mcmc_steps, beta, params(h))
            h, acc = tuned(h, info)
            weights = state.weights
            ess = 1.0 / jnp.sum(weights**2) / num_particles
            bad = jnp.sum(~jnp.isfinite(jax.vmap(neg_energy)(state.particles)))
            return (state, h), (info.log_likelihood_increment, ess, acc, bad)

        keys = jax.random.split(k_loop, num_temperatures)
        start_state = smc.init(particles)
        if reverse:
            start_state = start_state._replace(
                tempering_param=jnp.ones_like(start_state.tempering_param)
            )
        _, (increments, ess, acc, bad) = jax.lax.scan(
            body, (start_state, jnp.asarray(initial_step_size)), (betas, keys)
        )
        return jnp.sum(increments), {
            "ess": ess,
            "acceptance": acc,
            "nonfinite": bad,
            "betas": betas,
        }

    if start_particles is None:
        return jax.vmap(lambda k: one_run(k, None))(keys)
    return jax.vmap(one_run)(keys, start_particles)
