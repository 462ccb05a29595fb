"""Diagnostics with ArviZ: chains as DataTrees, a verdict on a run, and reports.

Three questions, answered with the tools NumPyro and BlackJAX users already know:

* Did the chains mix? ``to_datatree`` (``diagnostics.arviz``) turns recorded chains into an
  ArviZ 1.x ``xarray.DataTree`` (``posterior`` + ``sample_stats`` with ArviZ's names), ready
  for ``az.summary``, ``az.rhat``, ``az.ess``, ``az.bfmi`` and ``az.plot_*``. It reads the
  chains ``fit`` records during training (``FitResult.recorded_chains``), a
  ``samplers.sample_chains`` run, the trace of ``EnergyDistribution.sample_with_trace``, or a
  raw ``samplers.run_chains(..., keep_positions=True)`` result.
* Is training healthy? ``FitResult.history`` holds per-step metrics; ``to_datatree`` also puts
  them in a ``training`` group (dimension ``step``).
* Can I trust the result? ``diagnose`` (``diagnostics.checks``, which documents every check and
  threshold) checks both and prints a short verdict; ``report`` (``diagnostics.report``) writes
  an HTML or Markdown report with figures and tables. ``chain_lag`` (``diagnostics.lag``)
  tells negatives that lag behind the model from a model still moving, which the
  ``energy_gap`` check cannot.

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

from numpyro_ebm.diagnostics.arviz import to_datatree
from numpyro_ebm.diagnostics.checks import THRESHOLDS, Check, Diagnosis, diagnose
from numpyro_ebm.diagnostics.lag import ChainLag, chain_lag
from numpyro_ebm.diagnostics.report import report

__all__ = [
    "THRESHOLDS",
    "ChainLag",
    "Check",
    "Diagnosis",
    "chain_lag",
    "diagnose",
    "report",
    "to_datatree",
]
