"""``log Z`` by annealed importance sampling (tempered SMC on BlackJAX), forward and reverse.

Both walk the path ``p₀^{1−β} exp(−βE)`` between a normalised base ``p₀`` (β = 0) and
``exp(−E)`` (β = 1) with the moves of a ``numpyro_ebm.samplers.Sampler`` (the same kernel
objects as training), re-tuning the step size at every temperature toward the sampler's target
acceptance. ``ais`` goes up from base draws (``E[log Ẑ] ≤ log Z``); ``reverse_ais`` comes down
from exact samples (``E[log Ẑ] ≥ log Z``); together they bracket ``log Z``. Without exact
samples, ``ais_convergence`` checks that a path several times longer gives the same value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from numpyro_ebm.gaussian import fit_base
from numpyro_ebm.logz.estimate import LogZEstimate, log_mean_exp
from numpyro_ebm.samplers import Sampler, adapt_step_size_multiplicative, get_sampler
from numpyro_ebm.samplers.adaptation import step_size_bounds
from numpyro_ebm.validation import validate_data

__all__ = [
    "CONVERGENCE_AGREEMENT",
    "CONVERGENCE_FLOOR",
    "CONVERGENCE_MAX_SPREAD",
    "ais",
    "ais_convergence",
    "reverse_ais",
]

CONVERGENCE_AGREEMENT = 3.0
"""``ais_convergence``: the longer and shorter paths agree when their values differ by at most
this many combined standard errors (or by at most ``CONVERGENCE_FLOOR``)."""

CONVERGENCE_FLOOR = 1e-3
"""Nats: float32 round-off of a sum of many increments, for paths whose runs agree exactly
(a base equal to the target)."""

CONVERGENCE_MAX_SPREAD = 1.0
"""Nats: ``ais_convergence`` also needs the longer path's runs to agree, their ``log Ẑ`` within
this standard deviation. Wider, a few runs carry the mean ``Ẑ`` and its delta-method error bar
is not to be trusted (on 30-D breast cancer, 5000 temperatures gave runs from −6.2 to +2.0)."""


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
    sampler: str | Sampler | None = None,
    adaptive: bool = False,
    target_ess: float = 0.5,
    initial_step_size: float = 0.1,
) -> LogZEstimate:
    """``log Z`` by annealed importance sampling / tempered SMC on BlackJAX.

    Anneals from a normalised base ``p₀`` to ``exp(−E)`` along ``p₀^{1−β} exp(−βE)`` (BlackJAX
    ``tempered_smc`` with ``logprior = log p₀`` and ``loglikelihood = −E − log p₀``), moving the
    particles with ``sampler.step``; the step size is re-tuned at every temperature toward
    ``sampler.target`` (inside ``samplers.step_size_bounds`` of the base's variances). One
    run's ``Σ log_likelihood_increment`` estimates ``log Z``; the value is the log of the mean
    of ``num_runs`` independent ``Ẑ`` (unbiased), with a delta-method error bar.

    Args:
        energy: one event -> scalar.
        event_shape: shape of one event.
        key: PRNG key.
        base: NumPyro distribution over FLAT events of size ``prod(event_shape)``; default
            standard normal, or a Gaussian fitted to ``data`` when given.
        data: ``(n, *event_shape)`` samples to fit the Gaussian base to.
        num_particles: particles per run.
        num_temperatures: temperatures of the fixed schedule ``β_t = (t/T)^schedule_power``;
            with ``adaptive=True``, a tenth of the cap on temperatures: a run that has not
            reached β = 1 after ``10 * num_temperatures`` raises ``ValueError`` (raise
            ``num_temperatures`` or lower ``target_ess``).
        num_mcmc_steps: MCMC moves per temperature.
        num_runs: independent runs (≥ 2 for an error bar).
        schedule_power: power of the fixed schedule (larger: more temperatures near β = 0).
        sampler: the kernel that moves the particles: a ``numpyro_ebm.samplers.Sampler`` (e.g.
            ``samplers.hmc(num_integration_steps=10)``) or a name (``"mala"``, ``"hmc"``,
            ``"barker"``); default MALA. Its kernel, ``target`` acceptance and kernel settings
            (HMC's integration steps and step-size jitter) are used; its ``step_size``,
            ``adapt_step_size`` and draw settings are not. It needs a Metropolis step
            (``"ula"`` is refused): the tempered path's weights assume each move leaves its
            temperature's density invariant.
        adaptive: choose temperatures adaptively (BlackJAX ``adaptive_tempered_smc``, each
            step keeping the ESS at ``target_ess``) instead of the fixed schedule.
        target_ess: see ``adaptive``.
        initial_step_size: step size at ``β = 0``, then tuned (not ``sampler.step_size``).

    Returns:
        ``LogZEstimate`` with ``info`` holding per-run estimates and, for the fixed schedule,
        per-temperature ESS and acceptance of the first run.

    Raises:
        ValueError: a kernel without a Metropolis step, a ``base`` not over flat events of
            size ``prod(event_shape)``, non-finite energies at some particles (reported with
            the temperature), or adaptive runs stopped at the cap before β = 1.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from numpyro_ebm import samplers
        >>> from numpyro_ebm.energies import GaussianEnergy
        >>> est = ais(GaussianEnergy(jnp.zeros(2)), (2,), key=jax.random.key(0),
        ...           num_temperatures=50, sampler=samplers.hmc())
        >>> abs(est.value - 1.8379) < 4 * est.stderr + 0.01   # log 2π
        True
    """
    event_shape = tuple(int(n) for n in event_shape)
    _check_energy(energy, event_shape)
    base = _base_distribution(base, data, event_shape)
    cfg = _ais_config(
        event_shape,
        num_particles,
        num_temperatures,
        num_mcmc_steps,
        num_runs,
        schedule_power,
        sampler,
        adaptive,
        target_ess,
        initial_step_size,
        reverse=False,
    )
    log_zs, infos = _ais_runs(energy, base, jax.random.split(key, num_runs), cfg)
    log_zs = np.asarray(log_zs, np.float64)
    _raise_if_failed(log_zs, infos, cfg, num_runs)
    return _forward_estimate(log_zs, infos, num_particles, adaptive)


def _raise_if_failed(log_zs: np.ndarray, infos: dict, cfg: _AISConfig, num_runs: int):
    """Name the first temperature where some particle's energy was not finite, or the adaptive
    runs that stopped at the cap before β = 1."""
    if "nonfinite" in infos:
        bad = np.asarray(infos["nonfinite"])
        if bad.any():
            run, t = np.argwhere(bad > 0)[0]
            raise ValueError(
                f"AIS: the energy is not finite at {int(bad[run, t])} of {cfg.num_particles} "
                f"particles at temperature β = {float(infos['betas'][run, t]):.4g} "
                f"(step {int(t)} of run {int(run)}); {int((bad > 0).any(1).sum())} of "
                f"{num_runs} runs affected"
            )
    elif not np.all(np.isfinite(log_zs)):
        raise ValueError(
            f"AIS: the energy was not finite at some particles in "
            f"{int((~np.isfinite(log_zs)).sum())} of {num_runs} adaptive runs"
        )
    stopped = np.asarray(infos.get("final_beta", 1.0)) < 1.0
    if np.any(stopped):
        raise ValueError(
            f"adaptive AIS: {int(stopped.sum())} of {num_runs} runs stopped at the cap of "
            f"10 * num_temperatures = {10 * cfg.num_temperatures} temperatures before β = 1 "
            f"(at β = {float(np.min(infos['final_beta'])):.3g}): a partial path does not "
            "estimate log Z; raise num_temperatures or lower target_ess"
        )


def _forward_estimate(
    log_zs: np.ndarray, infos: dict, num_particles: int, adaptive: bool
) -> LogZEstimate:
    """``LogZEstimate`` of ``ais`` from the per-run ``log Ẑ`` and the runs' records."""
    value, stderr, _ = log_mean_exp(log_zs)
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


def check_convergence_settings(num_temperatures, factor, adaptive: bool = False) -> None:
    """``ValueError`` for settings ``ais_convergence`` cannot run (``fit`` checks its
    ``calibrate_log_z`` with this before training)."""
    if adaptive:
        raise ValueError("ais_convergence lengthens a fixed schedule: adaptive=True has none")
    for name, value, least in (("factor", factor, 2), ("num_temperatures", num_temperatures, 1)):
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def ais_convergence(
    energy: Callable,
    event_shape,
    *,
    key: jax.Array,
    num_temperatures: int = 200,
    factor: int = 4,
    **ais_options,
) -> LogZEstimate:
    """``ais`` with ``num_temperatures`` and with ``factor`` times as many, on independent keys:
    the longer path's estimate, and whether the shorter one had already reached it.

    AIS's ``log Ẑ`` is low on average (Jensen), the more so the shorter the path. Without
    exact samples for ``reverse_ais`` there is no upper side, but a value that still rises on
    a path ``factor`` times longer shows that neither had converged. They agree when within
    ``CONVERGENCE_AGREEMENT`` combined standard errors (at least ``CONVERGENCE_FLOOR``), and
    the longer path's runs agree with each other (their ``log Ẑ`` spread at most
    ``CONVERGENCE_MAX_SPREAD``: wider, its error bar is not reliable). Agreement is necessary,
    not sufficient: a mode that neither path reaches is missed by both
    (``data_bound`` looks around the training rows). On an energy trained on 30-D breast
    cancer data, 200, 1000 and 5000 temperatures gave 0.8, 6.3 and 8.2 nats
    (docs/benchmarks.md, session 27).

    Args:
        energy: as for ``ais``.
        event_shape: as for ``ais``.
        key: as for ``ais``.
        num_temperatures: temperatures of the shorter path.
        factor: how many times longer the longer path is (an integer ≥ 2).
        **ais_options: any other keyword argument of ``ais`` except ``adaptive`` (an
            adaptive schedule has no length to multiply), for both paths.

    Returns:
        The longer path's ``LogZEstimate``; its ``info["convergence"]`` holds ``shorter``
        and ``shorter_stderr`` (the shorter path's estimate), ``num_temperatures`` (both
        lengths), ``rise`` (longer − shorter), ``bound`` (the agreement bound in nats),
        ``spread`` (standard deviation of the longer path's per-run ``log Ẑ``) and
        ``converged`` (``|rise| ≤ bound`` and ``spread ≤ CONVERGENCE_MAX_SPREAD``).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from numpyro_ebm.energies import GaussianEnergy
        >>> energy = GaussianEnergy(jnp.array([1.0, -1.0]), jnp.array([[0.5, 0.2], [0.2, 0.3]]))
        >>> est = ais_convergence(energy, (2,), key=jax.random.key(0), num_temperatures=25,
        ...                       num_particles=200)
        >>> check = est.info["convergence"]
        >>> check["converged"], check["num_temperatures"]
        (True, (25, 100))
        >>> abs(est.value - float(energy.log_z)) < 3 * est.stderr
        True
    """
    check_convergence_settings(num_temperatures, factor, ais_options.get("adaptive", False))
    lengths = (int(num_temperatures), int(factor) * int(num_temperatures))
    k_short, k_long = jax.random.split(key)
    short, long = (
        ais(energy, event_shape, key=k, num_temperatures=t, **ais_options)
        for k, t in zip((k_short, k_long), lengths, strict=True)
    )
    rise = long.value - short.value
    bound = max(CONVERGENCE_AGREEMENT * math.hypot(short.stderr, long.stderr), CONVERGENCE_FLOOR)
    runs = long.info["log_z_runs"]
    spread = float(np.std(runs, ddof=1)) if len(runs) > 1 else 0.0
    convergence = {
        "shorter": short.value,
        "shorter_stderr": short.stderr,
        "num_temperatures": lengths,
        "rise": rise,
        "bound": bound,
        "spread": spread,
        "converged": bool(abs(rise) <= bound and spread <= CONVERGENCE_MAX_SPREAD),
    }
    return long._replace(info={**long.info, "convergence": convergence})


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
    sampler: str | Sampler | None = None,
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
        exact_samples: ``(n ≥ num_runs, *event_shape)`` exact draws from ``exp(−E)/Z``,
            shuffled and split into one disjoint block per run (runs sharing samples are not
            independent: their error bar would be too small); a run takes ``num_particles``
            rows of its block, with replacement when it has fewer. ``n = num_runs ×
            num_particles`` starts every particle from its own sample.
        key: PRNG key.
        base: as for ``ais``.
        data: as for ``ais``.
        num_particles: as for ``ais``.
        num_temperatures: as for ``ais``.
        num_mcmc_steps: as for ``ais``.
        num_runs: as for ``ais``.
        schedule_power: as for ``ais``.
        sampler: as for ``ais`` (default MALA).
        initial_step_size: step size at ``β = 1``, then tuned at every temperature.

    Returns:
        ``LogZEstimate`` (method ``"reverse-ais"``): ``−log mean(1/Ẑ)`` over runs, delta-method
        standard error.

    Raises:
        ValueError: ``exact_samples`` not finite, fewer than ``num_runs`` (or 2), or of an
            event shape the energy (or ``base``) does not take.
    """
    exact_samples = jnp.asarray(exact_samples)
    event_shape = tuple(int(n) for n in exact_samples.shape[1:])
    if exact_samples.ndim < 2 or exact_samples.shape[0] < max(2, num_runs):
        raise ValueError(
            f"exact_samples must be (n, *event_shape) with n >= max(2, num_runs) (each run "
            f"starts from its own samples), got {exact_samples.shape}"
        )
    if not bool(jnp.all(jnp.isfinite(exact_samples))):
        raise ValueError("exact_samples contain NaN or inf")
    _check_energy(energy, event_shape)
    cfg = _ais_config(
        event_shape,
        num_particles,
        num_temperatures,
        num_mcmc_steps,
        num_runs,
        schedule_power,
        sampler,
        False,
        0.5,
        initial_step_size,
        reverse=True,
    )
    base = _base_distribution(base, data, event_shape)
    k_pick, k_runs = jax.random.split(key)
    flat = exact_samples.reshape(exact_samples.shape[0], -1)
    rows = _start_rows(k_pick, flat.shape[0], num_runs, num_particles)
    log_inv_z, infos = _ais_runs(energy, base, jax.random.split(k_runs, num_runs), cfg, flat[rows])
    bad = np.asarray(infos["nonfinite"])
    if bad.any():
        raise ValueError(f"reverse AIS: the energy is not finite at {int(bad.max())} particles")
    value, stderr, _ = log_mean_exp(np.asarray(log_inv_z, np.float64))
    info = {"log_z_runs": -np.asarray(log_inv_z, np.float64)}
    return LogZEstimate(-value, stderr, "reverse-ais", None, info)


def _start_rows(key, num_samples: int, num_runs: int, num_particles: int) -> jax.Array:
    """``(num_runs, num_particles)`` rows of the exact samples: disjoint blocks of a shuffled
    pool, one per run, drawn from with replacement when a block has fewer rows than particles."""
    k_perm, k_pick = jax.random.split(key)
    block = num_samples // num_runs
    blocks = jax.random.permutation(k_perm, num_samples)[: block * num_runs].reshape(num_runs, -1)
    if block >= num_particles:
        return blocks[:, :num_particles]
    picks = jax.random.randint(k_pick, (num_runs, num_particles), 0, block)
    return jnp.take_along_axis(blocks, picks, axis=1)


def _check_energy(energy, event_shape) -> None:
    """``ValueError`` unless ``energy`` maps one event of ``event_shape`` to a scalar."""
    try:
        out = jax.eval_shape(energy, jax.ShapeDtypeStruct(event_shape, jnp.result_type(float)))
    except (TypeError, ValueError) as err:
        raise ValueError(f"the energy fails on one event of shape {event_shape}: {err}") from err
    if getattr(out, "shape", None) != ():
        raise ValueError(f"the energy must map one event {event_shape} to a scalar, got {out}")


def _base_distribution(base, data, event_shape):
    dim = math.prod(event_shape)
    if base is not None:
        if tuple(base.event_shape) != (dim,) or tuple(base.batch_shape) != ():
            raise ValueError(
                f"base must be over flat events of size {dim} (event_shape ({dim},), batch_shape"
                f" ()), got event_shape {base.event_shape} and batch_shape {base.batch_shape}"
            )
        return base
    if data is None:
        return dist.Normal(jnp.zeros(dim), 1.0).to_event(1)
    data = validate_data(data, event_shape, name="data (for the AIS base)")
    fitted = fit_base(jnp.reshape(data, (data.shape[0], -1)))
    return dist.MultivariateNormal(fitted.mean, scale_tril=fitted.scale_tril)


class _AISConfig(NamedTuple):
    event_shape: tuple
    num_particles: int
    num_temperatures: int
    num_mcmc_steps: int
    schedule_power: float
    sampler: Sampler
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
    sampler,
    adaptive,
    target_ess,
    initial_step_size,
    *,
    reverse,
) -> _AISConfig:
    """Checked, hashable AIS settings (shared by ``ais`` and ``reverse_ais``)."""
    sampler = get_sampler(sampler)
    if sampler.target is None:
        raise ValueError(
            f"AIS needs a kernel with a Metropolis step, got {sampler.kernel!r}: its moves "
            "must leave every tempered density invariant (use 'mala', 'hmc' or 'barker')"
        )
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
        sampler,
        bool(adaptive),
        float(target_ess),
        float(initial_step_size),
        reverse,
    )


def retuned_step_size(step_size, acceptance_rate, target: float, bounds):
    """AIS's rule between two temperatures: ``(h · exp(2 (acc − target))`` clipped to
    ``bounds``, ``acc``)``, ``acc`` the particles' mean acceptance (a NaN counts as 0)."""
    acc = jnp.mean(jnp.nan_to_num(acceptance_rate, nan=0.0))
    return adapt_step_size_multiplicative(step_size, acc, target, 2.0, bounds), acc


class _Path(NamedTuple):
    """The tempered path ``p₀^{1−β} exp(−βE)`` as BlackJAX's tempered SMC wants it."""

    logprior: Callable
    loglikelihood: Callable
    neg_energy: Callable
    sampler: Sampler
    bounds: tuple  # the step size's, ``samplers.step_size_bounds`` of the base's variances

    def params(self, step_size) -> dict:
        """MCMC parameters shared by all particles (BlackJAX: a leading axis of length 1)."""
        return {"step_size": jnp.reshape(step_size, (1,))}

    def num_nonfinite(self, particles) -> jax.Array:
        return jnp.sum(~jnp.isfinite(jax.vmap(self.neg_energy)(particles)))


def _path(energy, base, cfg: _AISConfig) -> _Path:
    def neg_energy(z):
        return -energy(jnp.reshape(z, cfg.event_shape))

    def loglikelihood(z):
        return neg_energy(z) - base.log_prob(z)

    try:
        bounds = step_size_bounds(base.variance)
    except NotImplementedError:  # a base of the user's without a variance: unit scale
        bounds = step_size_bounds()
    return _Path(base.log_prob, loglikelihood, neg_energy, cfg.sampler, bounds)


@eqx.filter_jit
def _ais_runs(energy, base, keys, cfg: _AISConfig, start_particles=None):
    """All runs of ``ais`` in one compiled call (compiled once per configuration: the energy
    and base are traced arguments, so new parameters do not recompile)."""
    path = _path(energy, base, cfg)
    num_particles, dim = cfg.num_particles, math.prod(cfg.event_shape)

    def one_run(run_key, start):
        k_init, k_loop = jax.random.split(run_key)
        if cfg.reverse:
            particles = start.reshape(num_particles, dim)
        else:
            particles = base.sample(k_init, (num_particles,)).reshape(num_particles, dim)
        if cfg.adaptive:
            return _adaptive_run(path, cfg, particles, k_loop)
        return _fixed_schedule_run(path, cfg, particles, k_loop)

    if start_particles is None:
        return jax.vmap(lambda k: one_run(k, None))(keys)
    return jax.vmap(one_run)(keys, start_particles)


def _schedule(cfg: _AISConfig) -> jax.Array:
    """``β_t = (t/T)^power`` for t = 1..T, or for reverse runs T−1..0 (the same path, down)."""
    t = jnp.arange(1, cfg.num_temperatures + 1)
    if cfg.reverse:
        t = jnp.arange(cfg.num_temperatures - 1, -1, -1)
    return (t / cfg.num_temperatures) ** cfg.schedule_power


def _fixed_schedule_run(path: _Path, cfg: _AISConfig, particles, key) -> tuple[Any, dict]:
    """One run along the fixed schedule: ``(log Ẑ, per-temperature records)``."""
    import blackjax
    from blackjax.smc import resampling

    sampler = path.sampler
    smc = blackjax.tempered_smc(
        path.logprior,
        path.loglikelihood,
        sampler.step,
        sampler.init,
        path.params(cfg.initial_step_size),
        resampling.systematic,
        num_mcmc_steps=cfg.num_mcmc_steps,
    )
    kernel_fn = blackjax.smc.tempered.build_kernel(
        path.logprior, path.loglikelihood, sampler.step, sampler.init, resampling.systematic
    )

    def body(carry, xs):
        state, h = carry
        beta, k = xs
        state, info = kernel_fn(k, state, cfg.num_mcmc_steps, beta, path.params(h))
        h, acc = retuned_step_size(h, info.update_info.acceptance_rate, sampler.target, path.bounds)
        ess = 1.0 / jnp.sum(state.weights**2) / cfg.num_particles
        bad = path.num_nonfinite(state.particles)
        return (state, h), (info.log_likelihood_increment, ess, acc, bad)

    betas = _schedule(cfg)
    keys = jax.random.split(key, cfg.num_temperatures)
    start_state = smc.init(particles)
    if cfg.reverse:
        start_state = start_state._replace(
            tempering_param=jnp.ones_like(start_state.tempering_param)
        )
    _, (increments, ess, acc, bad) = jax.lax.scan(
        body, (start_state, jnp.asarray(cfg.initial_step_size)), (betas, keys)
    )
    return jnp.sum(increments), {"ess": ess, "acceptance": acc, "nonfinite": bad, "betas": betas}


def _adaptive_run(path: _Path, cfg: _AISConfig, particles, key) -> tuple[Any, dict]:
    """One run with temperatures chosen to keep the ESS at ``cfg.target_ess``.

    BlackJAX's ``adaptive_tempered_smc`` keeps its MCMC parameters fixed, so the kernel is
    rebuilt at every temperature with the re-tuned step size."""
    import blackjax
    from blackjax.smc import resampling

    sampler = path.sampler

    def smc(h):
        return blackjax.adaptive_tempered_smc(
            path.logprior,
            path.loglikelihood,
            sampler.step,
            sampler.init,
            path.params(h),
            resampling.systematic,
            cfg.target_ess,
            num_mcmc_steps=cfg.num_mcmc_steps,
        )

    def cond(carry):
        state, _, _, count, _ = carry
        return (state.tempering_param < 1.0) & (count < 10 * cfg.num_temperatures)

    def body(carry):
        state, log_z, k, count, h = carry
        k, sub = jax.random.split(k)
        state, info = smc(h).step(sub, state)
        h, _ = retuned_step_size(h, info.update_info.acceptance_rate, sampler.target, path.bounds)
        bad = path.num_nonfinite(state.particles)
        log_z = log_z + jnp.where(bad > 0, jnp.nan, info.log_likelihood_increment)
        return state, log_z, k, count + 1, h

    h0 = jnp.asarray(cfg.initial_step_size)
    init_state = smc(cfg.initial_step_size).init(particles)
    carry = (init_state, jnp.zeros(()), key, 0, h0)
    end, log_z, _, count, _ = jax.lax.while_loop(cond, body, carry)
    return log_z, {"num_temperatures": count, "final_beta": end.tempering_param}
