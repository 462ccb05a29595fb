"""Parallel tempering in the DataTree (group ``tempering``) and its checks in ``diagnose``."""

from __future__ import annotations

import numpy as np

from numpyro_ebm import samplers
from numpyro_ebm.diagnostics._shared import THRESHOLDS, Check


def tempering_dataset(summary: samplers.TemperingSummary):
    """``xarray.Dataset`` of a ``TemperingSummary``: ``beta`` (dim ``temperature``),
    ``swap_acceptance`` (dim ``pair``: slots ``i, i+1``), ``round_trips`` (dims ``chain``,
    ``replica``), and ``barrier``, ``rounds``, ``suggested_replicas`` as scalars."""
    import xarray as xr

    round_trips = np.asarray(summary.round_trips)
    barrier = float(summary.barrier)
    return xr.Dataset(
        {
            "beta": ("temperature", np.asarray(summary.betas)),
            "swap_acceptance": ("pair", np.asarray(summary.swap_acceptance)),
            "round_trips": (("chain", "replica"), round_trips),
            "barrier": barrier,
            "rounds": int(summary.rounds),
            "suggested_replicas": samplers.suggested_replicas(barrier)
            if np.isfinite(barrier)
            else -1,
        }
    )


def tempering_checks(ds) -> list[Check]:
    """``round_trips`` (mean base → model → base trips per ladder: ``≥ 5`` ok, ``≥ 1`` warn,
    else fail: a ladder none of whose replicas came back from the model has not brought the
    model slot anything from the base) and ``swap_acceptance`` (lowest pair ``≥ 0.2`` ok, else
    warn: the replicas are too few for the barrier ``Λ``; the message gives the suggested
    number)."""
    trips = np.asarray(ds["round_trips"].values)
    per_ladder = float(trips.sum(axis=-1).mean())
    ok, fail = THRESHOLDS["round_trips"]
    status = "ok" if per_ladder >= ok else "warn" if per_ladder >= fail else "fail"
    rounds = int(ds["rounds"].values)
    message = (
        f"{per_ladder:.1f} round trips (base → model → base) per ladder in {rounds} rounds"
        + ("" if status == "ok" else ": the model slots get few fresh states from the base; "
           "use more rounds or more temperatures")
    )  # fmt: skip
    checks = [Check("round_trips", status, f"{per_ladder:.3g}", f"≥ {ok:g} ok, ≥ {fail:g} warn",
                    message)]  # fmt: skip
    acceptance = np.asarray(ds["swap_acceptance"].values)
    lowest = float(np.min(acceptance))
    barrier = float(ds["barrier"].values)
    suggested = int(ds["suggested_replicas"].values)
    floor = THRESHOLDS["swap_acceptance"]
    status = "ok" if lowest >= floor else "warn"
    message = f"barrier Λ = {barrier:.2f}: about {suggested} temperatures suit it"
    if status == "warn":
        message += f" (this ladder has {acceptance.size + 1})"
    checks.append(Check("swap_acceptance", status, f"{lowest:.2f}", f"≥ {floor:g} ok", message))
    return checks
