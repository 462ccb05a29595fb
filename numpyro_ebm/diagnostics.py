"""Diagnostics with ArviZ: chains as DataTrees, a verdict on a run, and reports.

Three questions, answered with the tools NumPyro and BlackJAX users already know:

* Did the chains mix? ``to_datatree`` turns recorded chains into an ArviZ 1.x
  ``xarray.DataTree`` (``posterior`` + ``sample_stats`` with ArviZ's names), ready for
  ``az.summary``, ``az.rhat``, ``az.ess``, ``az.bfmi`` and ``az.plot_*``. It reads the chains
  ``fit`` records during training (``FitResult.recorded_chains``), a
  ``samplers.sample_chains`` run, the trace of ``EnergyDistribution.sample_with_trace``, or a
  raw ``samplers.run_chains(..., keep_positions=True)`` result.
* Is training healthy? ``FitResult.history`` holds per-step metrics; ``to_datatree`` also puts
  them in a ``training`` group (dimension ``step``).
* Can I trust the result? ``diagnose`` checks both against the thresholds below and prints a
  short verdict; ``report`` writes an HTML or Markdown report with figures and tables.

Thresholds (``diagnose``; ok / warn / fail):

================  ====================================================================
check             rule
================  ====================================================================
r_hat             max rank-normalised split R-hat ≤ 1.01 ok, ≤ 1.1 warn, else fail
                  (Vehtari et al. 2021); chains recorded in training: ≤ 1.01 ok, else warn.
                  The message names the coordinates above 1.01 (between-chain disagreement)
ess               min bulk/tail ESS ≥ 100 per chain ok, ≥ 10 per chain warn, else fail;
                  chains recorded in training: ESS/draws ≥ 0.1 ok, else warn (a draw is
                  ``record_every`` updates apart, so few draws are expected)
chain_movement    reach ≥ 1 ok, else fail, for every kind of chain. reach = a chain's
                  summed squared jumps between consecutive draws (mean over chains) over
                  2 × the total variance of all draws: independent draws give draws − 1,
                  and a chain diffusing at random travels the square root of its summed
                  squared jumps, so below 1 the chains have not crossed their own spread
                  once
divergences       HMC divergent transitions: none ok, ≤ 1% warn, else fail
bfmi              HMC energy BFMI ≥ 0.3 ok in every chain, else warn (Betancourt 2016)
acceptance        mean acceptance within 0.1 of the kernel's target ok (during training
                  the step size is tuned to it), else warn; below 0.05 fail; ≥ 0.99 fail
                  (a Metropolis kernel whose steps are too small to explore; an acceptance
                  of exactly 1 without a known kernel is read as ULA's: info)
step_size         training step size inside its clip range (1e-6, 10), else fail
nonfinite_steps   no rejected (non-finite) training steps ok, else warn
energy_gap        |mean E(data) − mean E(negatives)| over the last 10% of steps ≤ 0.25
                  nats ok, ≤ 1 warn, else fail
energy_drift      change of the mean energies between the 6th and the last tenth of
                  training ≤ 0.5 nats ok, ≤ 5 warn, else fail
langevin_grad     growth of mean ‖∇ₓE‖ at the negatives over the same span ≤ ×2 ok,
                  ≤ ×10 warn, else fail
log_z             learned log Z moved ≤ 0.05 nats over the last 10% of steps ok, else warn
heldout_nll       final held-out NLL ≤ best of the second half + 0.05 nats ok, else warn
entropy_bound     with ``data_entropy`` H: final held-out NLL ≥ H − 0.15 nats ok, else
                  fail (no normalised density scores below H in expectation; the margin
                  is 3.4 standard errors of a 500-point held-out mean when log p has a
                  standard deviation of 1 nat, as for a 2-D Gaussian (½χ²₂): further
                  below, the learned log Z is wrong)
================  ====================================================================

Chains recorded during training follow a target that moves with the parameters, so only the
second half of the records (``burn_in=0.5``) is the ``posterior`` group; the first half is
kept as ``warmup_posterior``. Their R-hat and ESS say how fast the negative-phase sampler
moves between the model's modes. Persistent training does not need each chain to mix (it
averages over ``num_chains`` chains, restarted at data now and then), so for them these checks
warn and never fail: the default 8gaussians run (KL 0.003 nats) has R-hat 1.11 over 8 recorded
chains, which cross between all eight modes, slowly. Chains on a fixed target (sampling from a
trained model) get the standard rules. ``chain_movement`` and an acceptance ≥ 0.99 fail for
every kind of chain: negative-phase chains that do not move give training nothing to learn from.

Example:
    >>> import jax, jax.numpy as jnp, arviz as az
    >>> from numpyro_ebm import diagnostics, samplers
    >>> draws, _ = samplers.sample_chains(
    ...     jax.random.key(0), samplers.mala(), lambda x: -0.5 * jnp.sum(x**2),
    ...     jnp.zeros((4, 2)), num_draws=500, draws=samplers.DrawSettings(num_warmup=200))
    >>> dt = diagnostics.to_datatree(draws)
    >>> float(az.rhat(dt)["x"].max()) < 1.01
    True
"""

from __future__ import annotations

import base64
import html
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from numpyro_ebm import samplers as _samplers
from numpyro_ebm.train import FitResult

__all__ = [
    "THRESHOLDS",
    "Check",
    "Diagnosis",
    "diagnose",
    "report",
    "to_datatree",
]

THRESHOLDS = {
    "r_hat": (1.01, 1.1),
    "ess_per_chain": (100.0, 10.0),
    "ess_fraction_training": (0.1, 0.01),
    "divergent_fraction": (0.0, 0.01),
    "bfmi": 0.3,
    "acceptance_distance": 0.1,
    "acceptance_min": 0.05,
    "acceptance_max": 0.99,
    "chain_reach": 1.0,
    "energy_gap": (0.25, 1.0),
    "energy_drift": (0.5, 5.0),
    "langevin_growth": (2.0, 10.0),
    "log_z_change": 0.05,
    "heldout_rise": 0.05,
    "entropy_margin": 0.15,
}
"""The numbers ``diagnose`` compares against (see the module docstring for the rules)."""

_STATUS_ORDER = {"ok": 0, "info": 0, "warn": 1, "fail": 2}


# -- DataTree conversion ---------------------------------------------------------------------


def to_datatree(
    obj,
    *,
    var_name: str = "x",
    event_dims: tuple[str, ...] | None = None,
    coords: dict | None = None,
    burn_in: float = 0.5,
):
    """ArviZ ``xarray.DataTree`` of chains (and of training, for a ``FitResult``).

    Args:
        obj: one of

            * ``FitResult``: its recorded negative-phase chains (``fit(...,
              num_recorded_chains=, record_every=)``) and its history;
            * ``samplers.Draws``, e.g. from ``samplers.sample_chains`` or the second element of
              ``EnergyDistribution.sample_with_trace``;
            * ``(samples, draws)`` as returned by ``sample_with_trace``;
            * ``(states, trace, positions)`` from ``samplers.run_chains(...,
              keep_positions=True)`` (draw-major, flat positions).
        var_name: name of the variable in ``posterior``.
        event_dims: names of the event dimensions (default ``{var_name}_dim_0``, ...).
        coords: coordinate values for ``event_dims`` (default integers).
        burn_in: ``FitResult`` only: the fraction of recorded draws put in
            ``warmup_posterior`` / ``warmup_sample_stats`` instead (the target moves most
            early in training).

    Returns:
        ``DataTree`` with groups ``posterior`` (``var_name`` with dims ``(chain, draw,
        *event_dims)``) and ``sample_stats`` (``lp`` = log-density, ``acceptance_rate``,
        ``diverging``, ``step_size``, ``n_steps`` = gradient evaluations since the previous
        draw, and ``energy`` = the Hamiltonian for HMC), plus for a ``FitResult`` the groups
        ``warmup_posterior``, ``warmup_sample_stats`` and ``training`` (every history column
        that is not all NaN, dimension ``step``) and run settings in the root's ``attrs``.
        Statistics that a sampler does not have (acceptance of generator negatives, the
        Hamiltonian of MALA) are left out.

    Raises:
        ValueError: a ``FitResult`` without recorded chains, or an object it cannot read.
    """
    import arviz as az
    import xarray as xr

    attrs: dict[str, Any] = {}
    if isinstance(obj, FitResult):
        if obj.recorded_chains is None:
            raise ValueError(
                "this FitResult has no recorded chains: train with fit(..., "
                "num_recorded_chains=8) (the default) to diagnose the negative phase"
            )
        draws = obj.recorded_chains
        attrs = _fit_attrs(obj)
    else:
        draws = _as_draws(obj)
    if not 0.0 <= burn_in < 1.0:
        raise ValueError(f"burn_in must be in [0, 1), got {burn_in}")
    positions = np.asarray(draws.positions)
    num_chains, num_draws = positions.shape[:2]
    event_ndim = positions.ndim - 2
    if event_dims is None:
        event_dims = tuple(f"{var_name}_dim_{i}" for i in range(event_ndim))
    if len(event_dims) != event_ndim:
        raise ValueError(
            f"event_dims {event_dims} do not match the event shape {positions.shape[2:]}"
        )
    all_coords = {"chain": np.arange(num_chains), **(coords or {})}
    groups = {"posterior": {var_name: positions}, "sample_stats": _sample_stats(draws.info)}
    draw_coords = np.asarray(draws.step)
    if isinstance(obj, FitResult):
        start = math.floor(burn_in * num_draws)
        if start >= num_draws:
            start = num_draws - 1
        groups = {
            "posterior": {var_name: positions[:, start:]},
            "sample_stats": {k: v[:, start:] for k, v in groups["sample_stats"].items()},
            "warmup_posterior": {var_name: positions[:, :start]},
            "warmup_sample_stats": {k: v[:, :start] for k, v in groups["sample_stats"].items()},
        }
        if start == 0:
            del groups["warmup_posterior"], groups["warmup_sample_stats"]
    dt = az.from_dict(
        groups,
        dims={var_name: list(event_dims)},
        coords=all_coords,
        save_warmup=True,
        check_conventions=False,
    )
    # the draw coordinate is the training or sampler step the draw was taken at
    for name in ("posterior", "sample_stats"):
        n = dt[name].sizes["draw"]
        dt[name] = dt[name].to_dataset().assign_coords(draw=draw_coords[-n:])
    for name in ("warmup_posterior", "warmup_sample_stats"):
        if name in dt.children:
            n = dt[name].sizes["draw"]
            dt[name] = dt[name].to_dataset().assign_coords(draw=draw_coords[:n])
    if isinstance(obj, FitResult):
        dt["training"] = xr.DataTree(_training_dataset(obj.history))
    dt.attrs.update(attrs)
    return dt


def _as_draws(obj) -> _samplers.Draws:
    if isinstance(obj, _samplers.Draws):
        return obj
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[1], _samplers.Draws):
        return obj[1]
    if (
        isinstance(obj, tuple)
        and len(obj) == 3
        and isinstance(obj[1], _samplers.ChainInfo)
        and obj[2] is not None
    ):
        _, trace, positions = obj
        positions = np.swapaxes(np.asarray(positions), 0, 1)
        info = _samplers.ChainInfo(*(np.swapaxes(np.asarray(a), 0, 1) for a in trace))
        return _samplers.Draws(positions, info, 1 + np.arange(positions.shape[1]))
    if isinstance(obj, tuple) and len(obj) == 2 and obj[1] is None:
        raise ValueError(
            'these samples come from sampler="initializer", which runs no chains: nothing to '
            "diagnose"
        )
    raise ValueError(
        "to_datatree reads a FitResult, a samplers.Draws, the (samples, draws) pair of "
        "EnergyDistribution.sample_with_trace, or the (states, trace, positions) of "
        f"samplers.run_chains(..., keep_positions=True); got {type(obj).__name__}"
    )


def _sample_stats(info: _samplers.ChainInfo) -> dict[str, np.ndarray]:
    stats = {
        "lp": np.asarray(info.logdensity),
        "acceptance_rate": np.asarray(info.acceptance_rate),
        "diverging": np.asarray(info.is_divergent, bool),
        "step_size": np.asarray(info.step_size),
        "n_steps": np.asarray(info.num_integration_steps),
        "energy": np.asarray(info.hamiltonian),
    }
    # leave out what this sampler does not have (all NaN), rather than NaN columns
    return {
        k: v
        for k, v in stats.items()
        if not (np.issubdtype(v.dtype, np.floating) and np.isnan(v).all())
    }


def _training_dataset(history: dict):
    import xarray as xr

    columns = {
        k: ("step", np.asarray(v, bool) if k == "is_finite" else np.asarray(v))
        for k, v in history.items()
        if not (np.issubdtype(np.asarray(v).dtype, np.floating) and np.isnan(v).all())
    }
    num_steps = len(next(iter(history.values()))) if history else 0
    return xr.Dataset(columns, coords={"step": np.arange(1, num_steps + 1)})


def _fit_attrs(res: FitResult) -> dict:
    cfg = res.config
    attrs = {
        "negatives": cfg.negatives,
        "kernel": "generator" if not cfg.runs_chains else cfg.sampler.kernel,
        "num_chains": cfg.num_chains,
        "num_mcmc_steps": cfg.num_mcmc_steps,
        "record_every": cfg.record_every,
        "num_steps": len(res.history.get("loss", ())),
        "log_z_learned": float(getattr(res.log_z, "value", np.nan)),
    }
    if cfg.runs_chains:
        attrs["adapt_step_size"] = int(cfg.sampler.adapts)  # an int: netCDF has no bool
        if cfg.sampler.target is not None:
            attrs["target_acceptance"] = cfg.sampler.target
    if res.log_z_ais is not None:
        attrs["log_z_ais"] = float(res.log_z_ais.value)
        attrs["log_z_ais_stderr"] = float(res.log_z_ais.stderr)
    return attrs


# -- the verdict -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One line of a ``Diagnosis``.

    Attributes:
        name: which check (see the module docstring).
        status: ``"ok"``, ``"warn"``, ``"fail"`` or ``"info"`` (a number without a rule).
        value: the measured number, formatted.
        rule: the threshold it was compared against.
        message: what it means, and what to do when it is not ok.
    """

    name: str
    status: str
    value: str
    rule: str
    message: str


@dataclass
class Diagnosis:
    """What ``diagnose`` found: a list of ``Check`` and a one-line verdict.

    ``str(diagnosis)`` is the printed table; ``diagnosis.ok`` is False when any check failed.
    """

    checks: list[Check] = field(default_factory=list)

    @property
    def status(self) -> str:
        """The worst status: ``"ok"``, ``"warn"`` or ``"fail"``."""
        worst = max((_STATUS_ORDER[c.status] for c in self.checks), default=0)
        return ("ok", "warn", "fail")[worst]

    @property
    def ok(self) -> bool:
        return self.status != "fail"

    def __getitem__(self, name: str) -> Check:
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(name)

    @property
    def verdict(self) -> str:
        counts = {s: sum(c.status == s for c in self.checks) for s in ("warn", "fail")}
        if self.status == "ok":
            return "verdict: OK, every check passed"
        if self.status == "warn":
            return f"verdict: usable, {counts['warn']} warning(s)"
        return f"verdict: NOT OK, {counts['fail']} failed check(s), {counts['warn']} warning(s)"

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        return [(c.status.upper(), c.name, c.value, c.rule, c.message) for c in self.checks]

    def __str__(self) -> str:
        rows = [(s, n, v, r) for s, n, v, r, _ in self.rows()]
        widths = [
            max(len(row[i]) for row in [("", "check", "value", "rule"), *rows]) for i in range(4)
        ]
        lines = [self.verdict]
        for (s, n, v, r), c in zip(rows, self.checks, strict=True):
            cells = [x.ljust(w) for x, w in zip((s, n, v, r), widths, strict=True)]
            lines.append(
                "  ".join(cells) + ("  " + c.message if c.status not in ("ok", "info") else "")
            )
        return "\n".join(lines)


def _grade(value: float, ok: float, fail: float, *, higher_is_better: bool = False) -> str:
    if not np.isfinite(value):
        return "fail"
    if higher_is_better:
        return "ok" if value >= ok else ("warn" if value >= fail else "fail")
    return "ok" if value <= ok else ("warn" if value <= fail else "fail")


def diagnose(
    obj,
    *,
    burn_in: float = 0.5,
    data_entropy: float | None = None,
    verbose: bool = True,
) -> Diagnosis:
    """Check chains and training against documented thresholds and print a short verdict.

    Args:
        obj: a ``FitResult`` (its recorded chains and history), anything ``to_datatree`` reads,
            or a ``DataTree`` made by it.
        burn_in: fraction of a ``FitResult``'s recorded draws left out of the chain checks.
        data_entropy: the differential entropy (nats per point) of the distribution the data
            come from, where it is known (``datasets.toy(name).entropy()``): no normalised
            density has a held-out NLL below it, so a lower ``heldout_nll`` fails the
            ``entropy_bound`` check (its log Z is wrong).
        verbose: print the table.

    Returns:
        ``Diagnosis``; see the module docstring for every check and threshold.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from numpyro_ebm import diagnostics, samplers
        >>> draws, _ = samplers.sample_chains(
        ...     jax.random.key(0), samplers.mala(), lambda x: -0.5 * jnp.sum(x**2),
        ...     jnp.zeros((4, 2)), num_draws=500, draws=samplers.DrawSettings(num_warmup=200))
        >>> diagnostics.diagnose(draws, verbose=False).status
        'ok'
    """
    import xarray as xr

    if data_entropy is not None and not (
        isinstance(data_entropy, int | float) and math.isfinite(data_entropy)
    ):
        raise ValueError(f"data_entropy must be a finite number (nats), got {data_entropy!r}")
    history = None
    if isinstance(obj, FitResult):
        history = obj.history
        dt = to_datatree(obj, burn_in=burn_in) if obj.recorded_chains is not None else None
    elif isinstance(obj, xr.DataTree):
        dt = obj
        if "training" in dt.children:
            history = {k: dt["training"][k].values for k in dt["training"].data_vars}
    else:
        dt = to_datatree(obj)
    diagnosis = Diagnosis()
    if dt is not None and "posterior" in dt.children:
        diagnosis.checks.extend(_chain_checks(dt, training=history is not None))
    if history is not None:
        attrs = dict(dt.attrs) if dt is not None else _fit_attrs(obj)
        diagnosis.checks.extend(_training_checks(history, attrs, data_entropy))
    if not diagnosis.checks:
        raise ValueError("nothing to diagnose: no chains and no training history")
    if verbose:
        print(diagnosis)
    return diagnosis


def _chain_checks(dt, *, training: bool) -> list[Check]:
    import arviz as az

    checks = []
    post = dt["posterior"].to_dataset()
    num_chains, num_draws = post.sizes["chain"], post.sizes["draw"]
    what = "recorded negative-phase chains" if training else "chains"
    if num_chains >= 2 and num_draws >= 4:
        checks.append(_rhat_check(az.rhat(post), what, training=training))
    else:
        checks.append(
            Check("r_hat", "info", "n/a", "needs ≥ 2 chains", "record more chains to get R-hat")
        )
    checks.append(_movement_check(post, what, training=training))
    bulk = az.ess(post, method="bulk")
    tail = az.ess(post, method="tail")
    values = np.concatenate(
        [np.ravel(v.values) for ds in (bulk, tail) for v in ds.data_vars.values()]
    )
    ess = float(np.min(values[np.isfinite(values)])) if np.isfinite(values).any() else math.nan
    if not math.isfinite(ess):
        checks.append(
            Check("ess", "info", "n/a", "needs more draws", "too few draws to estimate the ESS")
        )
    elif training:
        ok, fail = THRESHOLDS["ess_fraction_training"]
        status = _grade(ess / (num_chains * num_draws), ok, fail, higher_is_better=True)
        status = "warn" if status == "fail" else status  # information, as for r_hat
        rule = f"ESS/draws ≥ {ok} ok, else warn"
    else:
        ok, fail = THRESHOLDS["ess_per_chain"]
        status = _grade(ess / num_chains, ok, fail, higher_is_better=True)
        rule = f"≥ {ok:.0f}/chain ok, ≥ {fail:.0f}/chain warn"
    if math.isfinite(ess):
        checks.append(
            Check(
                "ess",
                status,
                f"{ess:.0f} of {num_chains * num_draws} draws",
                rule,
                "effective sample size (min over coordinates of bulk and tail ESS)"
                if status == "ok"
                else f"the {what} are strongly autocorrelated: few independent draws",
            )
        )
    stats = dt["sample_stats"].to_dataset()
    if "diverging" in stats and "energy" in stats:  # only HMC can diverge
        frac = float(stats["diverging"].values.mean())
        ok, fail = THRESHOLDS["divergent_fraction"]
        status = _grade(frac, ok, fail)
        checks.append(
            Check(
                "divergences",
                status,
                f"{frac:.2%}",
                "none ok, ≤ 1% warn",
                "no divergent transitions"
                if status == "ok"
                else "HMC trajectories diverged: lower the step size (the draws may be biased)",
            )
        )
    if "energy" in stats and num_draws >= 2:
        bfmi = np.atleast_1d(az.bfmi(dt)["energy"].values)
        low = float(np.min(bfmi))
        threshold = THRESHOLDS["bfmi"]
        status = "ok" if low >= threshold else "warn"
        checks.append(
            Check(
                "bfmi",
                status,
                f"{low:.2f} (min over chains)",
                f"≥ {threshold} ok",
                "momentum resampling explores the energy levels"
                if status == "ok"
                else "HMC explores energy levels poorly (heavy tails or bad scaling)",
            )
        )
    if "acceptance_rate" in stats:
        acceptance = float(np.nanmean(stats["acceptance_rate"].values))
        checks.append(_acceptance_check(acceptance, dt.attrs, what))
    return checks


def _coordinate_labels(ds) -> list[tuple[str, float]]:
    """``(label, value)`` for every coordinate of every variable of a per-coordinate result
    such as ``az.rhat``, labelled as ``az.summary`` does (``x[0]``, ``x[0, 1]``)."""
    labelled = []
    for name, da in ds.data_vars.items():
        values = np.asarray(da.values, np.float64)
        for index in np.ndindex(values.shape):
            coords = [str(da[dim].values[i]) for dim, i in zip(da.dims, index, strict=True)]
            label = f"{name}[{', '.join(coords)}]" if coords else str(name)
            labelled.append((label, float(values[index])))
    return labelled


def _rhat_check(rhat_ds, what: str, *, training: bool) -> Check:
    ok, fail = THRESHOLDS["r_hat"]
    labelled = _coordinate_labels(rhat_ds)
    values = np.array([v for _, v in labelled])
    rhat = float(np.nanmax(values)) if np.isfinite(values).any() else math.nan
    status = _grade(rhat, ok, fail)
    rule = f"≤ {ok} ok, else warn" if training else f"≤ {ok} ok, ≤ {fail} warn"
    if status == "ok":
        return Check("r_hat", status, f"{rhat:.3f}", rule, f"the {what} agree")
    worst = sorted(
        ((v, label) for label, v in labelled if not v <= ok),
        key=lambda pair: -pair[0] if math.isfinite(pair[0]) else -math.inf,
    )
    names = ", ".join(label for _, label in worst[:3])
    if len(worst) > 3:
        names += f" and {len(worst) - 3} more"
    measured = f"between-chain disagreement on {names} (R-hat up to {rhat:.3f})"
    if training:
        # recorded training chains are information: the gradient averages over all chains
        status = "warn"
        message = (
            f"{measured} among the {what}: the sampler moves slowly across the model; training "
            "averages over all chains and their restarts at data, so judge the model by "
            "held-out NLL; to sample from it, check long chains "
            "(EnergyDistribution.sample_with_trace)"
        )
    else:
        message = (
            f"{measured}: the {what} have not mixed (run longer, start them overdispersed, "
            "or use a better-tuned kernel)"
        )
    return Check("r_hat", status, f"{rhat:.3f}", rule, message)


def _movement_check(post, what: str, *, training: bool) -> Check:
    """How far the chains travel, against the spread of their own draws.

    ``reach`` = (sum over a chain's consecutive draws of ‖x_{t+1} − x_t‖², averaged over
    chains) / (2 × the total variance of all draws). Independent draws give ``2 × variance``
    per jump, so ``reach`` ≈ draws − 1; a chain diffusing at random has an expected squared
    displacement equal to the sum of its squared jumps. ``reach < 1`` means the chains did not,
    even added up, travel the width of their own spread once.
    """
    num_chains, num_draws = post.sizes["chain"], post.sizes["draw"]
    if num_draws < 2:
        return Check("chain_movement", "info", "n/a", "needs ≥ 2 draws", "record more draws")
    x = np.concatenate(
        [
            np.asarray(v.values, np.float64).reshape(num_chains, num_draws, -1)
            for v in post.data_vars.values()
        ],
        axis=-1,
    )
    spread = 2.0 * float(x.reshape(-1, x.shape[-1]).var(axis=0).sum())
    travelled = float(np.mean(np.sum(np.diff(x, axis=1) ** 2, axis=(1, 2))))
    if spread > 0:
        reach = travelled / spread
    else:  # all draws at one point
        reach = 0.0 if travelled == 0 else math.inf
    threshold = THRESHOLDS["chain_reach"]
    status = "ok" if reach >= threshold else "fail"  # NaN fails too
    if status == "ok":
        message = f"the {what} travel their spread (summed squared jumps / 2·variance)"
    else:
        fix = (
            "raise the step size (Sampler(step_size=...), or adapt_step_size=True) or "
            "num_mcmc_steps"
            if training
            else "raise the sampler's step size or let it adapt (Sampler(step_size=...), "
            "adapt_step_size=True)"
        )
        message = (
            f"the {what} do not move: over {num_draws} draws their squared jumps add up to "
            f"{reach:.2g} of their spread (2·variance): {fix}"
        )
    rule = f"≥ {threshold:g} ok, else fail"
    return Check("chain_movement", status, f"{reach:.3g}", rule, message)


def _acceptance_check(acceptance: float, attrs: dict, what: str) -> Check:
    """``attrs``: the run's ``kernel``, ``target_acceptance`` and ``adapt_step_size`` where
    known (a ``FitResult``'s DataTree); without them an acceptance of exactly 1 is read as
    ULA's, which has no accept/reject step."""
    kernel = attrs.get("kernel")
    target = attrs.get("target_acceptance")
    if kernel == "ula" or (kernel is None and acceptance == 1.0):
        return Check(
            "acceptance",
            "info",
            f"{acceptance:.2f}",
            "n/a",
            "no accept/reject step (ULA)"
            if kernel == "ula"
            else "acceptance exactly 1: no accept/reject step (ULA), or steps far too small "
            "(see chain_movement)",
        )
    low, high = THRESHOLDS["acceptance_min"], THRESHOLDS["acceptance_max"]
    if acceptance >= high:
        adapts = attrs.get("adapt_step_size")
        if adapts is None:
            fix = "raise the sampler's step_size or let it adapt (adapt_step_size=True)"
        elif adapts:
            fix = (
                "the step-size adaptation could not raise it: start from a larger "
                "Sampler(step_size=...) and check the step_size curve"
            )
        else:
            fix = "raise Sampler(step_size=...) or set adapt_step_size=True"
        return Check(
            "acceptance",
            "fail",
            f"{acceptance:.3f}",
            f"< {high}",
            f"the {what} accept {acceptance:.1%} of proposals: the steps are too small to "
            f"explore; {fix}",
        )
    if target is None:
        status = "ok" if low <= acceptance else "fail"
        rule = f"≥ {low}"
    else:
        distance = THRESHOLDS["acceptance_distance"]
        status = "ok" if abs(acceptance - target) <= distance else "warn"
        if acceptance < low:
            status = "fail"
        rule = f"{target:.2f} ± {distance}"
    message = {
        "ok": f"mean acceptance of the {what}",
        "warn": "acceptance far from its target: the step size could not be tuned to it "
        "(check the step_size curve)",
        "fail": f"the {what} almost never move: lower the step size",
    }[status]
    return Check("acceptance", status, f"{acceptance:.2f}", rule, message)


def _window(values: np.ndarray, start: float, stop: float) -> np.ndarray:
    n = values.size
    lo, hi = int(start * n), max(int(stop * n), int(start * n) + 1)
    window = values[lo:hi]
    return window[np.isfinite(window)]


def _graded(name, value, shown, rule, ok_message, bad_message, *, threshold=None) -> Check:
    """A check against ``THRESHOLDS[threshold or name]`` (lower is better): ``(ok, fail)``
    bounds grade ok / warn / fail, a single number ok / warn. ``rule`` is formatted with
    ``ok`` and ``fail``."""
    bounds = THRESHOLDS[threshold or name]
    if isinstance(bounds, tuple):
        ok, fail = bounds
        status = _grade(value, ok, fail)
    else:
        ok = fail = bounds
        status = "ok" if value <= ok else "warn"
    message = ok_message if status == "ok" else bad_message
    return Check(name, status, shown, rule.format(ok=ok, fail=fail), message)


def _training_checks(history: dict, attrs: dict, data_entropy: float | None) -> list[Check]:
    checks = []
    finite = np.asarray(history.get("is_finite", []), bool)
    if finite.size:
        bad = int((~finite).sum())
        checks.append(
            Check(
                "nonfinite_steps",
                "ok" if bad == 0 else "warn",
                str(bad),
                "0 ok",
                "every step was finite"
                if bad == 0
                else "steps were rejected as non-finite: lower the learning rate or step size",
            )
        )
    step_size = np.asarray(history.get("step_size", []), float)
    if attrs.get("kernel") not in (None, "generator") and step_size.size:
        final = float(step_size[-1])
        lo, hi = _samplers.STEP_SIZE_BOUNDS
        at_bound = final <= lo * 1.01 or final >= hi * 0.99
        checks.append(
            Check(
                "step_size",
                "fail" if at_bound else "ok",
                f"{final:.3g}",
                f"inside ({lo:g}, {hi:g})",
                "the step size hit its clip range: the sampler cannot be tuned on this energy"
                if at_bound
                else "final sampler step size",
            )
        )
    acceptance = np.asarray(history.get("acceptance_rate", []), float)
    if acceptance.size and np.isfinite(acceptance).any():
        recent = _window(acceptance, 0.9, 1.0)
        check = _acceptance_check(float(recent.mean()), attrs, "negative-phase chains")
        checks.append(Check("train_acceptance", *list(vars(check).values())[1:]))
    gap = np.asarray(history.get("energy_gap", []), float)
    if gap.size:
        recent = float(_window(gap, 0.9, 1.0).mean())
        where = (
            "(negatives sit in deeper wells than the data: chains stuck or model too sharp)"
            if recent > 0
            else "(negatives sit where the model puts little mass: chains not at equilibrium)"
        )
        checks.append(
            _graded(
                "energy_gap",
                abs(recent),
                f"{recent:+.3f} nats",
                "|gap| ≤ {ok} ok, ≤ {fail} warn",
                "data and negatives have the same mean energy",
                "the negatives do not look like the data to the model " + where,
            )
        )
    drift = []
    for column in ("energy_data", "energy_negatives"):
        values = np.asarray(history.get(column, []), float)
        if values.size >= 10:
            drift.append(abs(_window(values, 0.9, 1.0).mean() - _window(values, 0.5, 0.6).mean()))
    if drift:
        value = float(max(drift))
        checks.append(
            _graded(
                "energy_drift",
                value,
                f"{value:.3f} nats",
                "≤ {ok} ok, ≤ {fail} warn",
                "energy levels are stable over the second half",
                "energies are still drifting: training has not converged or is becoming "
                "unstable (raise energy_l2, lower the learning rate)",
            )
        )
    norm = np.asarray(history.get("langevin_grad_norm", []), float)
    if norm.size >= 10 and np.isfinite(norm).any():
        growth = float(_window(norm, 0.9, 1.0).mean() / _window(norm, 0.5, 0.6).mean())
        checks.append(
            _graded(
                "langevin_grad",
                growth,
                f"×{growth:.2f}",
                "≤ ×{ok} ok, ≤ ×{fail} warn",
                "‖∇ₓE‖ at the negatives is stable",
                "the energy is getting steeper where the chains are: the classic runaway of "
                "EBM training (raise energy_l2, lower the learning rate)",
                threshold="langevin_growth",
            )
        )
    log_z = np.asarray(history.get("log_z", []), float)
    if log_z.size >= 10:
        recent = _window(log_z, 0.9, 1.0)
        change = float(abs(recent[-1] - recent[0]))
        checks.append(
            _graded(
                "log_z",
                change,
                f"{log_z[-1]:.3f} (moved {change:.3f})",
                "moved ≤ {ok} ok",
                "the learned log Z has settled",
                "the learned log Z is still moving: train longer, or calibrate it with "
                "fit(..., calibrate_log_z=True)",
                threshold="log_z_change",
            )
        )
    nll = np.asarray(history.get("heldout_nll", []), float)
    if nll.size and np.isfinite(nll).any():
        second = _window(nll, 0.5, 1.0)
        finite = nll[np.isfinite(nll)]
        rise = float(finite[-1] - second.min()) if second.size else 0.0
        shown = f"{finite[-1]:.3f}" + (f" (best {second.min():.3f})" if second.size else "")
        checks.append(
            _graded(
                "heldout_nll",
                rise,
                shown,
                "final ≤ best + {ok} ok",
                "held-out NLL (nats per point, with the learned log Z)",
                "held-out NLL rose late in training: over-fitting or instability",
                threshold="heldout_rise",
            )
        )
    if data_entropy is not None:
        checks.append(_entropy_check(nll, data_entropy))
    return checks


def _entropy_check(nll: np.ndarray, entropy: float) -> Check:
    """The final held-out NLL against the data's entropy ``H``: ``E[−log q(x)] ≥ H`` for every
    normalised density ``q`` (Gibbs' inequality), so only sampling noise of the held-out mean
    can put it below."""
    finite = nll[np.isfinite(nll)]
    margin = THRESHOLDS["entropy_margin"]
    rule = f"NLL ≥ H − {margin} ok, else fail"
    if not finite.size:
        return Check(
            "entropy_bound",
            "info",
            "n/a",
            rule,
            "no held-out NLL recorded: train with fit(..., validation_data=...)",
        )
    final = float(finite[-1])
    excess = final - entropy
    if excess >= -margin:
        return Check(
            "entropy_bound",
            "ok",
            f"{excess:+.3f} nats",
            rule,
            f"held-out NLL − data entropy {entropy:.3f}: estimates KL(data ‖ model) if the "
            "learned log Z is right",
        )
    return Check(
        "entropy_bound",
        "fail",
        f"{excess:+.3f} nats",
        rule,
        f"held-out NLL {final:.3f} is {-excess:.3f} nats below the data's entropy "
        f"{entropy:.3f}, impossible for a normalised density: the learned log Z is wrong (too "
        "low); compute log Z with logz.grid (2-D), logz.ais or fit(..., calibrate_log_z=True) "
        "and score with that",
    )


# -- report ----------------------------------------------------------------------------------


def report(
    res: FitResult,
    path: str | os.PathLike,
    *,
    data=None,
    toy=None,
    key=None,
    title: str | None = None,
    max_coordinates: int = 4,
) -> str:
    """Write a report of a training run: verdict, settings, curves, density, chains.

    ``.html``: one self-contained file (figures embedded). ``.md``: Markdown with the figures
    as PNG files in a folder ``<name>_files`` next to it. Everything is written to temporary
    names and renamed, so an interrupted report leaves no half-written file.

    Args:
        res: the ``FitResult``.
        path: output file, ending in ``.html`` or ``.md``.
        data: the training data (for the density-vs-data figure of 2-D events).
        toy: a ``datasets.ToyDensity``: show its exact density (2-D events), and check the
            held-out NLL against its entropy (``diagnose(..., data_entropy=)``).
        key: with ``toy``, a PRNG key for fresh test points: the report then gives
            ``KL(toy ‖ model)`` with grid-exact log Z (``evaluate.kl_to_toy``).
        title: heading (default: from the settings).
        max_coordinates: chain plots and the summary table show the first this many event
            coordinates.

    Returns:
        ``path`` as a string.
    """
    import arviz as az

    from numpyro_ebm import plots

    path = os.fspath(path)
    kind = os.path.splitext(path)[1].lower()
    if kind not in (".html", ".md"):
        raise ValueError(f"report path must end in .html or .md, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    stem = os.path.splitext(os.path.basename(path))[0]
    figures_name = f"{stem}_files"
    attrs = _fit_attrs(res)
    title = title or f"numpyro_ebm training report: {attrs['negatives']} negatives"
    diagnosis = diagnose(res, data_entropy=None if toy is None else toy.entropy(), verbose=False)
    dt = to_datatree(res) if res.recorded_chains is not None else None
    event_shape = tuple(res.event_shape)
    size = math.prod(event_shape)

    work = tempfile.mkdtemp(dir=folder, prefix=".tmp-report-")
    try:
        figures = []  # (file name, caption)

        def add(fig_or_pc, name, caption):
            target = os.path.join(work, name)
            if hasattr(fig_or_pc, "savefig") and not hasattr(fig_or_pc, "canvas"):
                fig_or_pc.savefig(target)  # an ArviZ PlotCollection
            else:
                plots.save_figure(fig_or_pc, target)
            figures.append((name, caption))

        add(plots.training_curves(res.history), "training.png", "Training curves.")
        if event_shape == (2,):
            add(
                plots.density_figure(
                    res.energy,
                    data,
                    samples=res.chains,
                    toy=toy,
                    log_z=None,
                ),
                "density.png",
                "Data (or the true density), the learned density normalised on the plotted box "
                "by quadrature, and the final negative-phase chains.",
            )
        elif size >= 16 and (len(event_shape) == 2 or math.isqrt(size) ** 2 == size):
            add(
                plots.sample_grid(res.chains, num=64),
                "samples.png",
                "Final negative-phase chains as images.",
            )
        summary_rows = []
        if dt is not None:
            var = next(iter(dt["posterior"].data_vars))
            sel = {}
            for dim in dt["posterior"][var].dims[2:]:
                sel[dim] = dt["posterior"][dim].values[:max_coordinates]
            if len(dt["posterior"][var].dims) > 3:  # images: pick coordinates of the flat index
                sel = {d: v[:2] for d, v in sel.items()}
            add(
                az.plot_trace_dist(dt, coords=sel, compact=False),
                "trace.png",
                "Recorded negative-phase chains (second half of training): trace and marginals.",
            )
            add(az.plot_rank(dt, coords=sel), "rank.png", "Rank plots: uniform when chains mix.")
            if "energy" in dt["sample_stats"].data_vars:
                add(az.plot_energy(dt), "energy.png", "HMC energy transition vs marginal energy.")
            table = az.summary(dt, coords=sel)
            summary_rows = [
                [str(i), *(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row)]
                for i, row in zip(table.index, table.to_numpy(), strict=True)
            ]
            summary_header = ["", *map(str, table.columns)]
        settings = [
            ("negatives", attrs["negatives"]),
            ("sampler", attrs["kernel"]),
            (
                "chains × MCMC steps per update",
                f"{attrs['num_chains']} × {attrs['num_mcmc_steps']}",
            ),
            ("training steps", str(attrs["num_steps"])),
            ("event shape", str(event_shape)),
            ("learned log Z (NCE)", f"{attrs['log_z_learned']:.4f}"),
        ]
        if "log_z_ais" in attrs:
            settings.append(
                ("log Z (AIS)", f"{attrs['log_z_ais']:.4f} ± {attrs['log_z_ais_stderr']:.4f}")
            )
        settings.extend(_log_z_rows(res, data, toy, key))
        sections = {
            "title": title,
            "verdict": diagnosis.verdict,
            "checks": (["status", "check", "value", "rule", "meaning"], diagnosis.rows()),
            "settings": (["setting", "value"], settings),
            "summary": (summary_header, summary_rows) if summary_rows else None,
            "figures": figures,
        }
        if kind == ".html":
            text = _html(sections, work)
        else:
            text = _markdown(sections, figures_name)
            final_figures = os.path.join(folder, figures_name)
            staged = os.path.join(work, figures_name)
            os.makedirs(staged)
            for name, _ in figures:
                os.replace(os.path.join(work, name), os.path.join(staged, name))
            if os.path.exists(final_figures):
                old = os.path.join(work, "old")
                os.replace(final_figures, old)
            os.replace(staged, final_figures)
        staged_text = os.path.join(work, "report" + kind)
        with open(staged_text, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(staged_text, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


def _log_z_rows(res: FitResult, data, toy, key) -> list[tuple[str, str]]:
    """2-D events: log Z by quadrature (and the exact KL to a toy, given a key)."""
    from numpyro_ebm import evaluate, logz

    if tuple(res.event_shape) != (2,):
        return []
    if toy is not None and key is not None:
        kl = evaluate.kl_to_toy(res.energy, toy, key=key)
        return [
            ("log Z (grid quadrature)", f"{kl.log_z.value:.4f}"),
            ("KL(toy ‖ model), grid log Z", f"{kl.kl:.4f} ± {kl.kl_stderr:.4f} nats"),
            ("test NLL (toy entropy)", f"{kl.test_nll:.4f} ({kl.entropy:.4f})"),
        ]
    if toy is not None:
        box = np.asarray(toy.bounds, np.float64)
    elif data is not None:
        points = np.asarray(data)
        box = np.stack([points.min(axis=0), points.max(axis=0)], axis=1)
    else:
        return []
    width = box[:, 1] - box[:, 0]
    box = np.stack([box[:, 0] - 0.5 * width, box[:, 1] + 0.5 * width], axis=1)
    return [("log Z (grid quadrature, data box + 50%)", f"{logz.grid(res.energy, box).value:.4f}")]


def _sections(sections: dict, *, heading, bold, table, figure) -> list[str]:
    """The report's parts in order, drawn with one format's ``heading``/``bold``/``table``/
    ``figure``."""
    parts = [
        heading(1, sections["title"]),
        bold(sections["verdict"]),
        heading(2, "Checks"),
        table(*sections["checks"]),
        heading(2, "Settings"),
        table(*sections["settings"]),
    ]
    if sections["summary"]:
        parts += [heading(2, "Recorded chains: az.summary"), table(*sections["summary"])]
    parts.append(heading(2, "Figures"))
    parts += [figure(name, caption) for name, caption in sections["figures"]]
    return parts


def _html(sections: dict, work: str) -> str:
    esc = html.escape

    def table(header, rows):
        head = "".join(f"<th>{esc(h)}</th>" for h in header)
        body = "".join(
            "<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def figure(name, caption):
        with open(os.path.join(work, name), "rb") as f:
            encoded = base64.b64encode(f.read()).decode("ascii")
        return (
            f"<figure><img src='data:image/png;base64,{encoded}' alt='{esc(name)}'>"
            f"<figcaption>{esc(caption)}</figcaption></figure>"
        )

    head = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{esc(sections['title'])}</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;}"
        "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        "img{max-width:100%}</style></head><body>"
    )
    body = _sections(
        sections,
        heading=lambda level, text: f"<h{level}>{esc(text)}</h{level}>",
        bold=lambda text: f"<p><b>{esc(text)}</b></p>",
        table=table,
        figure=figure,
    )
    return "\n".join([head, *body, "</body></html>"])


def _markdown(sections: dict, figures_name: str) -> str:
    def cell(x):
        return str(x).replace("|", "\\|")

    def table(header, rows):
        lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
        return "\n".join(lines)

    parts = _sections(
        sections,
        heading=lambda level, text: "#" * level + " " + text,
        bold=lambda text: f"**{text}**",
        table=table,
        figure=lambda name, caption: f"![{caption}]({figures_name}/{name})\n\n*{caption}*",
    )
    return "\n\n".join(parts) + "\n"
