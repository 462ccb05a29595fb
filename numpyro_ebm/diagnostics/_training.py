"""Checks of a training history (``FitResult.history``), one function per check. The rules
are in ``numpyro_ebm.diagnostics.checks``."""

from __future__ import annotations

import numpy as np

from numpyro_ebm import samplers
from numpyro_ebm.diagnostics._chains import acceptance_check
from numpyro_ebm.diagnostics._shared import THRESHOLDS, Check, graded, step_row, window

__all__ = ["ais_convergence_check", "log_z_tracking_check", "training_checks"]


def training_checks(history: dict, attrs: dict, data_entropy: float | None) -> list[Check]:
    """The checks of ``history`` (columns of per-step metrics) that it has the columns for.

    Args:
        history: ``FitResult.history`` or the ``training`` group of its DataTree.
        attrs: the run's settings (``fit_attrs``): which kernel, its target acceptance.
        data_entropy: the data's entropy (nats per point) for ``entropy_bound``, or None.
    """
    checks = [
        _nonfinite_check(history),
        _step_size_check(history, attrs),
        _train_acceptance_check(history, attrs),
        _energy_gap_check(history, attrs),
        _energy_drift_check(history),
        _langevin_grad_check(history),
        _log_z_check(history),
        _log_z_bound_check(history, attrs),
        _heldout_nll_check(history),
    ]
    if data_entropy is not None:
        nll = np.asarray(history.get("heldout_nll", []), float)
        checks.append(_entropy_check(nll, data_entropy))
    return [check for check in checks if check is not None]


def _nonfinite_check(history: dict) -> Check | None:
    finite = np.asarray(history.get("is_finite", []), bool)
    if not finite.size:
        return None
    bad = int((~finite).sum())
    return Check(
        "nonfinite_steps",
        "ok" if bad == 0 else "warn",
        str(bad),
        "0 ok",
        "every step was finite"
        if bad == 0
        else "steps were rejected as non-finite: lower the learning rate or step size",
    )


def _step_size_check(history: dict, attrs: dict) -> Check | None:
    step_size = np.asarray(history.get("step_size", []), float)
    if attrs.get("kernel") in (None, "generator") or not step_size.size:
        return None
    final = float(step_size[-1])
    lo, hi = samplers.STEP_SIZE_BOUNDS  # the run's, widened by its data's scale, if known
    lo, hi = attrs.get("step_size_low", lo), attrs.get("step_size_high", hi)
    at_bound = final <= lo * 1.01 or final >= hi * 0.99
    return Check(
        "step_size",
        "fail" if at_bound else "ok",
        f"{final:.3g}",
        f"inside ({lo:g}, {hi:g})",
        "the step size hit its clip range: the sampler cannot be tuned on this energy"
        if at_bound
        else "final sampler step size",
    )


def _train_acceptance_check(history: dict, attrs: dict) -> Check | None:
    acceptance = np.asarray(history.get("acceptance_rate", []), float)
    if not (acceptance.size and np.isfinite(acceptance).any()):
        return None
    recent = window(acceptance, 0.9, 1.0)
    check = acceptance_check(float(recent.mean()), attrs, "negative-phase chains")
    return Check("train_acceptance", *list(vars(check).values())[1:])


def _energy_gap_check(history: dict, attrs: dict) -> Check | None:
    gap = np.asarray(history.get("energy_gap", []), float)
    if not gap.size:
        return None
    recent = float(window(gap, 0.9, 1.0).mean())
    where = (
        "(negatives sit in deeper wells than the data: chains stuck or model too sharp)"
        if recent > 0
        else "(negatives sit where the model puts little mass: chains not at equilibrium)"
    )
    returned = attrs.get("best_step")
    if returned is not None and returned < 0.9 * gap.size:
        where += (
            f"; the last tenth of training judged here comes after the returned step "
            f"({returned}, the best held-out NLL): it judges iterates the run does not return"
        )
    return graded(
        "energy_gap",
        abs(recent),
        f"{recent:+.3f} nats",
        "|gap| ≤ {ok} ok, ≤ {fail} warn",
        "data and negatives have the same mean energy",
        "the negatives do not look like the data to the model " + where + "; "
        "diagnostics.chain_lag tells lagging chains from a model still moving",
    )


def _energy_drift_check(history: dict) -> Check | None:
    drift = []
    for column in ("energy_data", "energy_negatives"):
        values = np.asarray(history.get(column, []), float)
        if values.size >= 10:
            drift.append(abs(window(values, 0.9, 1.0).mean() - window(values, 0.5, 0.6).mean()))
    if not drift:
        return None
    value = float(max(drift))
    return graded(
        "energy_drift",
        value,
        f"{value:.3f} nats",
        "≤ {ok} ok, ≤ {fail} warn",
        "energy levels are stable over the second half",
        "energies are still drifting: training has not converged or is becoming "
        "unstable (raise energy_l2, lower the learning rate)",
    )


def _langevin_grad_check(history: dict) -> Check | None:
    norm = np.asarray(history.get("langevin_grad_norm", []), float)
    if not (norm.size >= 10 and np.isfinite(norm).any()):
        return None
    growth = float(window(norm, 0.9, 1.0).mean() / window(norm, 0.5, 0.6).mean())
    return graded(
        "langevin_grad",
        growth,
        f"×{growth:.2f}",
        "≤ ×{ok} ok, ≤ ×{fail} warn",
        "‖∇ₓE‖ at the negatives is stable",
        "the energy is getting steeper where the chains are: the classic runaway of "
        "EBM training (raise energy_l2, lower the learning rate)",
        threshold="langevin_growth",
    )


def _log_z_check(history: dict) -> Check | None:
    log_z = np.asarray(history.get("log_z", []), float)
    if log_z.size < 10:
        return None
    recent = window(log_z, 0.9, 1.0)  # its finite values
    if recent.size < 2:  # the tracker lost the track: log_z_tracking says so
        return None
    change = float(abs(recent[-1] - recent[0]))
    return graded(
        "log_z",
        change,
        f"{log_z[-1]:.3f} (moved {change:.3f})",
        "moved ≤ {ok} ok",
        "the log Z has settled",
        "the log Z is still moving (the energy still changes): train longer",
        threshold="log_z_change",
    )


def log_z_tracking_check(log_z, log_z_ais, history: dict) -> Check | None:
    """The tracked ``log Z`` (``FitResult.log_z``) against the AIS of the same energy
    (``log_z_ais``) when there is one, else against its own error bar and bridges."""
    if log_z is None or log_z.method != "tracked":
        return None
    if not np.isfinite(log_z.value):
        return Check(
            "log_z_tracking",
            "fail",
            "lost",
            "a tracked value at the end",
            "an update was too large for the tracker's bridge and it had not restarted by the "
            "end: estimate log Z with fit(..., calibrate_log_z=True) or logz.ais",
        )
    shown = f"{log_z.value:.3f} ± {log_z.stderr:.2g}"
    if log_z_ais is not None:
        combined = float(np.hypot(log_z.stderr, log_z_ais.stderr))
        gap = abs(log_z.value - log_z_ais.value)
        bound = THRESHOLDS["log_z_agreement"] * combined
        agree = gap <= bound
        return Check(
            "log_z_tracking",
            "ok" if agree else "fail",
            f"{shown} vs AIS {log_z_ais.value:.3f} ± {log_z_ais.stderr:.2g}",
            f"|tracked − AIS| ≤ {THRESHOLDS['log_z_agreement']:g} combined SE ok, else fail",
            "the tracked log Z agrees with AIS"
            if agree
            else f"the tracked log Z and AIS disagree by {gap:.3f} nats, beyond their errors "
            f"({bound:.3f}): trust neither; rerun AIS with more temperatures",
        )
    min_ess = np.asarray(history.get("log_z_min_ess", []), float)
    lowest = float(np.nanmin(min_ess)) if np.isfinite(min_ess).any() else 1.0
    sure = log_z.stderr <= THRESHOLDS["log_z_stderr"]
    bridged = lowest >= THRESHOLDS["log_z_min_ess"]
    if sure and bridged:
        message = "the tracked log Z is sure enough for likelihoods (evaluate uses it)"
    elif not bridged:
        message = (
            f"an update left the tracker's ESS at {lowest:.2g}: its error bar may be too "
            "small; raise log_z_bridge_steps or check with fit(..., calibrate_log_z=True)"
        )
    else:
        message = "the tracked log Z is uncertain: use AIS (fit(..., calibrate_log_z=True))"
    return Check(
        "log_z_tracking",
        "ok" if sure and bridged else "warn",
        f"{shown} (lowest ESS {lowest:.2g})",
        f"SE ≤ {THRESHOLDS['log_z_stderr']:g} and every update's ESS ≥ "
        f"{THRESHOLDS['log_z_min_ess']:g} ok, else warn",
        message,
    )


def _log_z_bound_check(history: dict, attrs: dict) -> Check | None:
    """Whether the tracker's floor (``logz.tracking.floor``) raised the tracked ``log Z``: the
    energy had mass (wells at the training rows) that no particle reached. It fails when the
    returned step's ``log Z`` still holds more than ``THRESHOLDS['log_z_raise']`` nats of a raise
    (``log_z_raised``; in histories written before raises were released, when the floor fired
    within a tenth of the run before the returned step)."""
    missed = np.asarray(history.get("log_z_missed", []), float)
    bound = np.asarray(history.get("log_z_bound", []), float)
    if not (missed.size and np.isfinite(bound).any()):
        return None
    returned = int(attrs.get("best_step", missed.size))
    # rejected attempts have rows too: a row's step is the number of accepted rows up to it
    finite = np.asarray(history.get("is_finite", np.ones(missed.size)), bool)
    steps = np.cumsum(finite)[(missed > 0) & finite]
    row = step_row(history, returned)
    raised = history.get("log_z_raised")
    if raised is not None and row is not None and np.isfinite(raised[row]):
        held = float(raised[row])
        rule = (
            "the bound never above the tracked log Z ok; the returned step's log Z raised by "
            f"more than {THRESHOLDS['log_z_raise']:g} nats fail, else warn"
        )
        failed = held > THRESHOLDS["log_z_raise"]
        where = f"at the returned step ({returned}) its log Z still held {held:.3g} nats of it"
    else:  # written before the floor released its raises
        window = max(1, missed.size // 10)
        rule = (
            f"the bound never above the tracked log Z ok; above it within {window} steps "
            "before the returned one fail, else warn"
        )
        near = (steps <= returned) & (steps > returned - window)
        failed = bool(near.any())
        where = f"at step {steps[near][-1] if failed else 0}, near the returned step ({returned})"
    if not steps.size:
        return Check(
            "log_z_bound", "ok", "never above the tracked log Z", rule,
            "no mass near the training rows beyond the tracker's reach",
        )  # fmt: skip
    value = (
        f"above the tracked log Z at {steps.size} steps ({', '.join(map(str, steps[:5]))}"
        f"{', ...' if steps.size > 5 else ''}; up to {np.nanmax(bound[missed > 0]):.3g})"
    )
    if failed:
        return Check(
            "log_z_bound", "fail", value, rule,
            f"the bound raised the tracked log Z: {where}. The energy had wells at the "
            "training rows that the tracker missed (it memorises them): its log Z is a 95% "
            "lower bound and held-out likelihoods are upper bounds. Select on validation "
            "data, train fewer steps, raise energy_l2 or use more data",
        )  # fmt: skip
    return Check(
        "log_z_bound", "warn", value, rule,
        f"the bound raised the tracked log Z away from the returned step ({returned}), "
        "whose log Z holds no raise: before it, the tracker lagged the energy or the energy "
        "had wells at the training rows that it lost again; after it, the energy grew wells "
        "(memorisation), which the selection avoided",
    )  # fmt: skip


def _heldout_nll_check(history: dict) -> Check | None:
    nll = np.asarray(history.get("heldout_nll", []), float)
    if not (nll.size and np.isfinite(nll).any()):
        return None
    second = window(nll, 0.5, 1.0)
    finite = nll[np.isfinite(nll)]
    rise = float(finite[-1] - second.min()) if second.size else 0.0
    shown = f"{finite[-1]:.3f}" + (f" (best {second.min():.3f})" if second.size else "")
    return graded(
        "heldout_nll",
        rise,
        shown,
        "final ≤ best + {ok} ok",
        "held-out NLL (nats per point, with the learned log Z)",
        "held-out NLL rose late in training: over-fitting or instability",
        threshold="heldout_rise",
    )


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


def ais_convergence_check(log_z_ais) -> Check | None:
    """Whether the AIS of ``log_z_ais`` (a ``logz.ais_convergence`` estimate, as from
    ``fit(..., calibrate_log_z={...})``) had stopped rising when its path got longer; None for
    an estimate without that information."""
    convergence = (getattr(log_z_ais, "info", None) or {}).get("convergence")
    if convergence is None:
        return None
    short, long = convergence["num_temperatures"]
    rise, bound, spread = convergence["rise"], convergence["bound"], convergence["spread"]
    shown = (
        f"{convergence['shorter']:.3f} ± {convergence['shorter_stderr']:.2g} ({short} "
        f"temperatures) → {log_z_ais.value:.3f} ± {log_z_ais.stderr:.2g} ({long}; runs' "
        f"spread {spread:.2g})"
    )
    if convergence["converged"]:
        message = "the AIS log Z did not move with a longer path, and its runs agree"
    elif abs(rise) > bound:
        message = (
            f"the AIS log Z moved by {rise:+.3f} nats (bound {bound:.3f}) with a path "
            f"{long // short} times longer: it had not converged, and log-likelihoods scored "
            "with it are too high; rerun with more temperatures (num_temperatures) until it stops"
        )
    else:
        message = (
            f"the longer AIS path's runs disagree (their log Ẑ spread {spread:.2f} nats): a "
            "few runs carry the estimate and its error bar is not reliable; rerun with more "
            "temperatures or particles"
        )
    return Check(
        "ais_convergence",
        "ok" if convergence["converged"] else "fail",
        shown,
        "|longer − shorter| ≤ 3 combined SE and runs' spread ≤ 1 nat ok, else fail",
        message,
    )
