"""The verdict on chains and training: ``diagnose`` against documented thresholds.

``diagnose`` reads a ``FitResult`` (its recorded chains and history), anything ``to_datatree``
reads, or a DataTree made by it, and returns a ``Diagnosis``: one ``Check`` per rule below, and
a one-line verdict.

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
                  once (the message says when each chain does cross its own draws' spread
                  but not all the draws': chains stuck in separate modes)
divergences       HMC divergent transitions: none ok, ≤ 1% warn, else fail
bfmi              HMC energy BFMI ≥ 0.3 ok in every chain, else warn (Betancourt 2016)
acceptance        mean acceptance within 0.1 of the kernel's target ok (during training
                  the step size is tuned to it), else warn; below 0.05 fail; ≥ 0.99 fail
                  (a Metropolis kernel whose steps are too small to explore; an acceptance
                  of exactly 1 without a known kernel is read as ULA's: info)
step_size         training step size inside its clip range, else fail: (1e-6, 10) widened by
                  the data's variances (samplers.step_size_bounds)
nonfinite_steps   no rejected (non-finite) training steps ok, else warn
energy_gap        |mean E(data) − mean E(negatives)| over the last 10% of steps ≤ 0.25
                  nats ok, ≤ 1 warn, else fail (a model still moving and chains that lag
                  both make a gap: ``chain_lag`` tells them apart)
energy_drift      change of the mean energies between the 6th and the last tenth of
                  training ≤ 0.5 nats ok, ≤ 5 warn, else fail
langevin_grad     growth of mean ‖∇ₓE‖ at the negatives over the same span ≤ ×2 ok,
                  ≤ ×10 warn, else fail
log_z             log Z moved ≤ 0.05 nats over the last 10% of steps ok, else warn
log_z_tracking    the tracked log Z (``FitResult.log_z``): with an AIS of the same energy
                  (``fit(..., calibrate_log_z=True)``), |tracked − AIS| ≤ 3 combined
                  standard errors ok, else fail; without, standard error ≤ 0.1 nats and
                  every update's conditional ESS ≥ 0.5 ok, else warn
ais_convergence   ``FitResult.log_z_ais`` from ``logz.ais_convergence`` (``fit(...,
                  calibrate_log_z={...})``): AIS with ``factor`` times more temperatures
                  within 3 combined standard errors of the shorter path, and its runs'
                  ``log Ẑ`` within a standard deviation of 1 nat, ok, else fail (a value
                  still rising had not converged: too low, and the likelihoods too high)
log_z_bound       the tracker's floor (``logz.bound``: a 95% lower bound on log Z from
                  importance sampling around the training rows) below the tracked log Z
                  at every step ok; the returned step's (``best_step``, else the last)
                  log Z still raised by it more than 0.1 nats fail (wells at the training
                  rows: memorisation), else warn (histories without ``log_z_raised``:
                  above it within a tenth of the steps before the returned one fail)
heldout_nll       final held-out NLL ≤ best of the second half + 0.05 nats ok, else warn
entropy_bound     with ``data_entropy`` H: final held-out NLL ≥ H − 0.15 nats ok, else
                  fail (no normalised density scores below H in expectation; the margin
                  is 3.4 standard errors of a 500-point held-out mean when log p has a
                  standard deviation of 1 nat, as for a 2-D Gaussian (½χ²₂): further
                  below, the learned log Z is wrong)
round_trips       parallel tempering: mean base → model → base round trips per ladder
                  ≥ 5 ok, ≥ 1 warn, else fail (the model slots got nothing from the base)
swap_acceptance   parallel tempering: lowest adjacent-pair swap acceptance ≥ 0.2 ok, else
                  warn; reports the barrier Λ and the temperatures it suggests (2Λ + 1)
================  ====================================================================

Chains recorded during training follow a target that moves with the parameters, so only the
second half of the records (``burn_in=0.5``) is the ``posterior`` group; the first half is
kept as ``warmup_posterior``. Their R-hat and ESS say how fast the negative-phase sampler
moves between the model's modes. Persistent training does not need each chain to mix (it
averages over ``num_chains`` chains, restarted at data now and then), so for them these checks
warn and never fail: a well-trained default 8gaussians run warns on R-hat, because its recorded
chains cross between the eight modes slowly (docs/benchmarks.md, "Recording chains for
diagnostics"). Chains on a fixed target (sampling from a trained model) get the standard
rules. ``chain_movement`` and an acceptance ≥ 0.99 fail for every kind of chain:
negative-phase chains that do not move give training nothing to learn from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from numpyro_ebm.diagnostics._chains import chain_checks
from numpyro_ebm.diagnostics._shared import STATUS_ORDER, THRESHOLDS, Check, FitResult, fit_attrs
from numpyro_ebm.diagnostics._training import (
    ais_convergence_check,
    log_z_tracking_check,
    training_checks,
)
from numpyro_ebm.diagnostics.arviz import to_datatree

__all__ = ["THRESHOLDS", "Check", "Diagnosis", "diagnose"]


@dataclass
class Diagnosis:
    """What ``diagnose`` found: a list of ``Check`` and a one-line verdict.

    ``str(diagnosis)`` is the printed table; ``diagnosis.ok`` is False when any check failed.
    """

    checks: list[Check] = field(default_factory=list)

    @property
    def status(self) -> str:
        """The worst status: ``"ok"``, ``"warn"`` or ``"fail"``."""
        worst = max((STATUS_ORDER[c.status] for c in self.checks), default=0)
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
        diagnosis.checks.extend(chain_checks(dt, training=history is not None))
    if history is not None:
        attrs = dict(dt.attrs) if dt is not None else fit_attrs(obj)
        diagnosis.checks.extend(training_checks(history, attrs, data_entropy))
    if isinstance(obj, FitResult):
        checks = (
            log_z_tracking_check(obj.log_z, obj.log_z_ais, obj.history),
            ais_convergence_check(obj.log_z_ais),
        )
        diagnosis.checks.extend(check for check in checks if check is not None)
    if not diagnosis.checks:
        raise ValueError("nothing to diagnose: no chains and no training history")
    if verbose:
        print(diagnosis)
    return diagnosis
