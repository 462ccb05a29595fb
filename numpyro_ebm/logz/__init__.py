"""Partition-function estimators: every one returns a ``LogZEstimate``.

``log Z = log ∫ exp(−E(x)) dx`` (or ``log Σ exp(−E(x))`` over a finite support).

* ``grid``: dims ≤ 3, all mass inside the box; error: discretisation and truncation (the
  reported error bar is the difference to the half-resolution rule). ``grid_covering`` grows
  the box until it holds the mass; ``grid_traced`` is differentiable.
* ``enumerate``: a finite support you can list; exact.
* ``importance``: a proposal covering the density's mass; ``E[log Ẑ] ≤ log Z`` (Jensen);
  delta-method standard error and effective sample size.
* ``data_bound``: importance sampling around the training rows; ``log Ẑ − 3`` is a 95% lower
  bound on ``log Z`` whatever the proposal, and finds wells at the rows that ``ais`` and the
  tracker miss (module ``bound``; the tracker's floor).
* ``ais``: a normalised base and enough temperatures; ``E[log Ẑ] ≤ log Z``; standard error
  from independent runs. ``reverse_ais`` from exact samples: ``E[log Ẑ] ≥ log Z``.
  ``ais_convergence``: ``ais`` with a path ``factor`` times longer too, and whether the two
  agree (a value still rising shows a path too short).
* ``tracking``: ``log Z`` followed through training by SMC along the trained energies (what
  ``fit`` reports, with a standard error); ``start``/``advance`` over ``TrackerState``.
* ``nce_log_z_loss``: the noise-contrastive loss of the ``log Z`` that ``fit`` also learns.
* ``select``: the one rule for which estimator over which box (``select.estimate``).

Importance sampling and AIS produce an UNBIASED estimate of Z, hence a downward-biased (on
average) log Z, hence optimistic log-likelihoods ``−E(x) − log Ẑ``. Report their standard errors.

Modules: ``estimate`` (``LogZEstimate``), ``quadrature``, ``importance``, ``ais``, ``bound``,
``nce``, ``tracking``, ``select``.
"""

from numpyro_ebm.logz import bound, select, tracking
from numpyro_ebm.logz.ais import ais, ais_convergence, reverse_ais
from numpyro_ebm.logz.bound import data_bound
from numpyro_ebm.logz.estimate import LogZEstimate
from numpyro_ebm.logz.importance import importance
from numpyro_ebm.logz.nce import nce_log_z_loss
from numpyro_ebm.logz.quadrature import (
    enumerate,
    grid,
    grid_covering,
    grid_log_density,
    grid_traced,
)

__all__ = [
    "LogZEstimate",
    "ais",
    "ais_convergence",
    "bound",
    "data_bound",
    "enumerate",
    "grid",
    "grid_covering",
    "grid_log_density",
    "grid_traced",
    "importance",
    "nce_log_z_loss",
    "reverse_ais",
    "select",
    "tracking",
]
