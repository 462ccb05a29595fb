"""The result every estimator returns, and the two log-sum rules they share.

``LogZEstimate`` is what every ``numpyro_ebm.logz`` estimator returns. ``log_integral`` is the
stable ``log Σ exp`` of a quadrature or a finite sum; ``log_mean_exp`` is the stable log of a
mean of importance weights with its delta-method standard error (importance sampling, AIS).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["LogZEstimate", "log_integral", "log_mean_exp"]


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


def log_integral(neg_energy: np.ndarray, cell: float) -> float:
    """``log(Σ exp(neg_energy) · cell)`` over the finite entries (any shape).

    Example:
        >>> import numpy as np
        >>> round(log_integral(np.log(np.array([1.0, 3.0])), 0.5), 6)  # log 2
        0.693147
    """
    finite = neg_energy[np.isfinite(neg_energy)]
    if finite.size == 0:
        raise ValueError("the energy is not finite anywhere on the grid")
    peak = finite.max()
    return float(np.log(np.sum(np.exp(neg_energy - peak)) * cell) + peak)


def log_mean_exp(log_w: np.ndarray) -> tuple[float, float, float]:
    """``log mean exp(log_w)`` over ``(n,)`` log-weights, its delta-method standard error
    ``std(w) / (sqrt(n) mean(w))`` and the effective sample size ``(Σw)² / Σw²``.

    Example:
        >>> import numpy as np
        >>> value, stderr, ess = log_mean_exp(np.zeros(4))
        >>> value, stderr, ess
        (0.0, 0.0, 4.0)
    """
    log_w = np.asarray(log_w, np.float64)
    peak = log_w.max()
    w = np.exp(log_w - peak)
    n = w.size
    mean = w.mean()
    value = float(np.log(mean) + peak)
    stderr = float(w.std(ddof=1) / (np.sqrt(n) * mean)) if n > 1 else float("inf")
    ess = float(w.sum() ** 2 / np.sum(w**2))
    return value, stderr, ess
