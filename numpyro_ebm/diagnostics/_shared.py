"""What the diagnostics modules share: the thresholds, one check's record, grading, and a run's
settings.

The rules behind every threshold are documented in ``numpyro_ebm.diagnostics.checks``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from numpyro_ebm.samplers import step_size_bounds
from numpyro_ebm.training.fit import FitResult  # the one place diagnostics/ imports it from
from numpyro_ebm.training.loop import step_row

__all__ = [
    "STATUS_ORDER",
    "THRESHOLDS",
    "Check",
    "FitResult",
    "fit_attrs",
    "grade",
    "graded",
    "step_row",
    "window",
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
    "round_trips": (5.0, 1.0),
    "swap_acceptance": 0.2,
    "log_z_stderr": 0.1,
    "log_z_agreement": 3.0,
    "log_z_min_ess": 0.5,
    "log_z_raise": 0.1,
}
"""The numbers ``diagnose`` compares against (see ``numpyro_ebm.diagnostics.checks`` for the
rules)."""

STATUS_ORDER = {"ok": 0, "info": 0, "warn": 1, "fail": 2}
"""How bad each status is: a ``Diagnosis`` takes the worst of its checks."""


@dataclass(frozen=True)
class Check:
    """One line of a ``Diagnosis``.

    Attributes:
        name: which check (see ``numpyro_ebm.diagnostics.checks``).
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


def fit_attrs(res: FitResult) -> dict:
    """The run's settings as DataTree ``attrs`` (numbers and strings only, as netCDF wants)."""
    cfg = res.config
    negatives = cfg.negatives  # the resolved negative sampler: its settings are the run's
    sampler = getattr(negatives, "sampler", None)  # None: no chains (generator negatives)
    attrs = {
        "negatives": cfg.negatives_name,
        "kernel": "generator" if sampler is None else sampler.kernel,
        "num_chains": getattr(negatives, "num_chains", cfg.num_chains),
        "num_mcmc_steps": getattr(negatives, "num_mcmc_steps", 0) if sampler else 0,
        "record_every": cfg.record_every,
        "num_steps": len(res.history.get("loss", ())),
        "log_z_learned": float(getattr(res.log_z, "value", np.nan)),
    }
    if sampler is not None:
        attrs["adapt_step_size"] = int(sampler.adapts)  # an int: netCDF has no bool
        bases = getattr(res.state, "bases", None)
        if bases:  # where training kept the step size: the bounds of the data's scale
            low, high = step_size_bounds(next(iter(bases.values())).variance)
            attrs["step_size_low"], attrs["step_size_high"] = float(low), float(high)
        if sampler.target is not None:
            attrs["target_acceptance"] = sampler.target
    if getattr(res, "best_step", None) is not None:
        attrs["best_step"] = int(res.best_step)
    if res.log_z_ais is not None:
        attrs["log_z_ais"] = float(res.log_z_ais.value)
        attrs["log_z_ais_stderr"] = float(res.log_z_ais.stderr)
    return attrs


def grade(value: float, ok: float, fail: float, *, higher_is_better: bool = False) -> str:
    """``"ok"``, ``"warn"`` or ``"fail"`` for ``value`` against the ``ok`` and ``fail`` bounds
    (lower is better unless ``higher_is_better``); NaN fails."""
    if not np.isfinite(value):
        return "fail"
    if higher_is_better:
        return "ok" if value >= ok else ("warn" if value >= fail else "fail")
    return "ok" if value <= ok else ("warn" if value <= fail else "fail")


def window(values: np.ndarray, start: float, stop: float) -> np.ndarray:
    """The finite values between the fractions ``start`` and ``stop`` of a history column
    (at least one entry, e.g. ``window(loss, 0.9, 1.0)`` is the last tenth)."""
    n = values.size
    lo, hi = int(start * n), max(int(stop * n), int(start * n) + 1)
    part = values[lo:hi]
    return part[np.isfinite(part)]


def graded(name, value, shown, rule, ok_message, bad_message, *, threshold=None) -> Check:
    """A check against ``THRESHOLDS[threshold or name]`` (lower is better): ``(ok, fail)``
    bounds grade ok / warn / fail, a single number ok / warn. ``rule`` is formatted with
    ``ok`` and ``fail``."""
    bounds = THRESHOLDS[threshold or name]
    if isinstance(bounds, tuple):
        ok, fail = bounds
        status = grade(value, ok, fail)
    else:
        ok = fail = bounds
        status = "ok" if value <= ok else "warn"
    message = ok_message if status == "ok" else bad_message
    return Check(name, status, shown, rule.format(ok=ok, fail=fail), message)
