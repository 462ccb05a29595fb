"""Chains and training as ArviZ ``xarray.DataTree``: ``to_datatree``.

It reads the chains ``fit`` records during training (``FitResult.recorded_chains``, with the
history as a ``training`` group), a ``samplers.sample_chains`` run, the trace of
``EnergyDistribution.sample_with_trace``, or a raw ``samplers.run_chains(...,
keep_positions=True)`` result, and names the statistics as ArviZ does, ready for
``az.summary``, ``az.rhat``, ``az.ess``, ``az.bfmi`` and ``az.plot_*``.

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

import math
from typing import Any

import numpy as np

from numpyro_ebm import samplers
from numpyro_ebm.diagnostics._shared import FitResult, fit_attrs
from numpyro_ebm.diagnostics._tempering import tempering_dataset

__all__ = ["to_datatree"]


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
              keep_positions=True)`` (draw-major, flat positions; the ``draw`` coordinate
              numbers the records 1, 2, ..., which with ``thinning=k`` are k steps apart).
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
        Parallel-tempering chains (``DrawSettings(num_temperatures=K)``, or
        ``negatives="parallel_tempering"``) add a group ``tempering``: the temperatures
        ``beta``, ``swap_acceptance`` per adjacent pair, ``round_trips`` per replica, the
        barrier ``Λ`` and the number of temperatures it suggests.
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
        attrs = fit_attrs(obj)
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
        groups = _split_warmup(groups, min(math.floor(burn_in * num_draws), num_draws - 1))
    dt = az.from_dict(
        groups,
        dims={var_name: list(event_dims)},
        coords=all_coords,
        save_warmup=True,
        check_conventions=False,
    )
    _set_draw_steps(dt, draw_coords)
    if isinstance(obj, FitResult):
        dt["training"] = xr.DataTree(_training_dataset(obj.history))
    if getattr(draws, "tempering", None) is not None:
        dt["tempering"] = xr.DataTree(tempering_dataset(draws.tempering))
    dt.attrs.update(attrs)
    return dt


def _split_warmup(groups: dict, start: int) -> dict:
    """The draws before ``start`` moved to ``warmup_posterior`` and ``warmup_sample_stats``
    (no warmup groups if ``start`` is 0)."""
    split = {
        "posterior": {k: v[:, start:] for k, v in groups["posterior"].items()},
        "sample_stats": {k: v[:, start:] for k, v in groups["sample_stats"].items()},
    }
    if start != 0:
        split["warmup_posterior"] = {k: v[:, :start] for k, v in groups["posterior"].items()}
        split["warmup_sample_stats"] = {k: v[:, :start] for k, v in groups["sample_stats"].items()}
    return split


def _set_draw_steps(dt, steps: np.ndarray) -> None:
    """Make the ``draw`` coordinate the training or sampler step each draw was taken at: the
    last steps for the draws kept, the first for the warmup groups."""
    for name in ("posterior", "sample_stats"):
        n = dt[name].sizes["draw"]
        dt[name] = dt[name].to_dataset().assign_coords(draw=steps[-n:])
    for name in ("warmup_posterior", "warmup_sample_stats"):
        if name in dt.children:
            n = dt[name].sizes["draw"]
            dt[name] = dt[name].to_dataset().assign_coords(draw=steps[:n])


def _as_draws(obj) -> samplers.Draws:
    if isinstance(obj, samplers.Draws):
        return obj
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[1], samplers.Draws):
        return obj[1]
    if (
        isinstance(obj, tuple)
        and len(obj) == 3
        and isinstance(obj[1], samplers.ChainInfo)
        and obj[2] is not None
    ):
        _, trace, positions = obj
        positions = np.swapaxes(np.asarray(positions), 0, 1)
        info = samplers.ChainInfo(*(np.swapaxes(np.asarray(a), 0, 1) for a in trace))
        return samplers.Draws(positions, info, 1 + np.arange(positions.shape[1]))
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


def _sample_stats(info: samplers.ChainInfo) -> dict[str, np.ndarray]:
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
