"""Checks of chains, given their ArviZ DataTree: R-hat, movement, ESS, divergences, BFMI and
acceptance. The rules are in ``numpyro_ebm.diagnostics.checks``."""

from __future__ import annotations

import math

import numpy as np

from numpyro_ebm.diagnostics._shared import THRESHOLDS, Check, grade
from numpyro_ebm.diagnostics._tempering import tempering_checks

__all__ = ["acceptance_check", "chain_checks"]


def chain_checks(dt, *, training: bool) -> list[Check]:
    """The checks of ``dt``'s ``posterior`` and ``sample_stats`` groups; ``training``: the
    chains were recorded during training (their R-hat and ESS only warn)."""
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
    checks.append(_ess_check(post, what, training=training))
    stats = dt["sample_stats"].to_dataset()
    if "diverging" in stats and "energy" in stats:  # only HMC can diverge
        checks.append(_divergence_check(stats))
    if "energy" in stats and num_draws >= 2:
        checks.append(_bfmi_check(dt))
    if "acceptance_rate" in stats:
        acceptance = float(np.nanmean(stats["acceptance_rate"].values))
        checks.append(acceptance_check(acceptance, dt.attrs, what))
    if "tempering" in dt.children:
        checks.extend(tempering_checks(dt["tempering"].to_dataset()))
    return checks


def _ess_check(post, what: str, *, training: bool) -> Check:
    """The smallest bulk or tail ESS over all coordinates."""
    import arviz as az

    num_chains, num_draws = post.sizes["chain"], post.sizes["draw"]
    bulk = az.ess(post, method="bulk")
    tail = az.ess(post, method="tail")
    values = np.concatenate(
        [np.ravel(v.values) for ds in (bulk, tail) for v in ds.data_vars.values()]
    )
    ess = float(np.min(values[np.isfinite(values)])) if np.isfinite(values).any() else math.nan
    if not math.isfinite(ess):
        return Check("ess", "info", "n/a", "needs more draws", "too few draws to estimate the ESS")
    if training:
        ok, fail = THRESHOLDS["ess_fraction_training"]
        status = grade(ess / (num_chains * num_draws), ok, fail, higher_is_better=True)
        status = "warn" if status == "fail" else status  # information, as for r_hat
        rule = f"ESS/draws ≥ {ok} ok, else warn"
    else:
        ok, fail = THRESHOLDS["ess_per_chain"]
        status = grade(ess / num_chains, ok, fail, higher_is_better=True)
        rule = f"≥ {ok:.0f}/chain ok, ≥ {fail:.0f}/chain warn"
    return Check(
        "ess",
        status,
        f"{ess:.0f} of {num_chains * num_draws} draws",
        rule,
        "effective sample size (min over coordinates of bulk and tail ESS)"
        if status == "ok"
        else f"the {what} are strongly autocorrelated: few independent draws",
    )


def _divergence_check(stats) -> Check:
    """The fraction of HMC transitions that diverged."""
    frac = float(stats["diverging"].values.mean())
    ok, fail = THRESHOLDS["divergent_fraction"]
    status = grade(frac, ok, fail)
    return Check(
        "divergences",
        status,
        f"{frac:.2%}",
        "none ok, ≤ 1% warn",
        "no divergent transitions"
        if status == "ok"
        else "HMC trajectories diverged: lower the step size (the draws may be biased)",
    )


def _bfmi_check(dt) -> Check:
    """HMC's energy BFMI, the lowest over chains."""
    import arviz as az

    bfmi = np.atleast_1d(az.bfmi(dt)["energy"].values)
    low = float(np.min(bfmi))
    threshold = THRESHOLDS["bfmi"]
    status = "ok" if low >= threshold else "warn"
    return Check(
        "bfmi",
        status,
        f"{low:.2f} (min over chains)",
        f"≥ {threshold} ok",
        "momentum resampling explores the energy levels"
        if status == "ok"
        else "HMC explores energy levels poorly (heavy tails or bad scaling)",
    )


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
    status = grade(rhat, ok, fail)
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
    even added up, travel the width of their own spread once. Chains whose consecutive draws
    are far apart against each chain's own spread (lag-1 autocorrelation ≤ 0.75: a random
    walk's is near 1) but that do not reach the spread of all the draws sit each in its own
    mode, and are told so: a larger step size does not cross between modes.
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
    elif travelled >= 0.25 * (num_draws - 1) * 2.0 * float(x.var(axis=1).sum(axis=-1).mean()):
        message = (
            f"the {what} move within their own regions but not across the spread of all the "
            f"draws ({reach:.2g} of it): they sit in separate modes; cross between them with "
            "parallel tempering (negatives='parallel_tempering') or run longer"
        )
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


def acceptance_check(acceptance: float, attrs: dict, what: str) -> Check:
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
