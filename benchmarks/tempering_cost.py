"""Parallel tempering's cost on the checkerboard: K replicas per ladder at equal gradient cost.

    python benchmarks/tempering_cost.py                       # K = 1, 4, 8, 16; 2000 steps
    python benchmarks/tempering_cost.py --temps 1 8 --steps 500

Every row trains the same MLPEnergy (128×3, `fit`'s defaults otherwise, as in
`benchmarks/toy_quality.py`: seed 0, 50 000 training points, batch 1024, 20 MALA
transitions per replica and step) with ``replicas`` = ladders × K held constant (1024 by
default), so every step costs the same number of energy-gradient evaluations
(replicas × 20): K = 1 is plain persistent chains without re-initialisation at data
(``Persistent(num_chains=1024, reinit_fraction=0)``), K > 1 is
``ParallelTempering(num_chains=1024 // K, num_temperatures=K)``.

One run per K gives the whole wall-time-to-KL curve: the script hands `fit` a checkpoint
writer (``training.checkpoint.saver``, replaced here) that is called every
``--every`` steps (``steps_per_call`` = ``--every``, so the trajectory is the one of a plain
2000-step run: step t folds t into the key) and evaluates the parameter average at steps 250,
500, 1000 and 2000 (KL with grid-exact log Z as in `toy_quality.py`). The wall time to each
point is measured from the call to `fit` and EXCLUDES the evaluations (their time is
subtracted); it includes compilation. ms/step is (t(2000) − t(250)) / 1750: after
compilation. The last three columns split the final KL (``cell_split``): the model's mass on
the 8 squares, the largest deviation of one square's mass from their mean, and the KL of the
9-bin histogram (8 squares + everything else) = −log(mass on the squares) + the KL of the
squares' relative shares. Λ, minimum swap acceptance and round trips (per ladder, summed over
its replicas, per step) are means over the last 100 steps.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import numpyro_ebm as ebm
from numpyro_ebm.training import checkpoint as _checkpoint

CURVE = (250, 500, 1000, 2000)


def cell_split(energy, num_points: int = 512) -> tuple[float, float, float]:
    """Where the final model's KL comes from, by quadrature on the 512² grid of ``kl_to_toy``
    (box [−8, 8]², whose cell edges include the squares' edges): the model's mass on the 8
    black squares (the support), the largest relative deviation of one square's mass from
    the mean square's, and the KL between the squares' masses (9 bins: 8 squares + the rest),
    a lower bound on the full KL that only the split of mass between the squares sets."""
    edges = np.linspace(-8.0, 8.0, num_points + 1)
    mid = 0.5 * (edges[1:] + edges[:-1])
    xs, ys = np.meshgrid(mid, mid, indexing="ij")
    grid = jnp.asarray(np.stack([xs.ravel(), ys.ravel()], axis=-1), jnp.float32)
    neg = np.asarray(jax.jit(jax.vmap(lambda x: -energy(x)))(grid), np.float64)
    q = np.exp(neg - neg.max())
    q /= q.sum()
    i, j = np.floor(xs.ravel() / 2), np.floor(ys.ravel() / 2)
    black = (np.abs(xs.ravel()) < 4) & (np.abs(ys.ravel()) < 4) & ((i + j) % 2 == 0)
    cells = np.array(
        [q[black & (i == a) & (j == b)].sum() for a in range(-2, 2) for b in range(-2, 2)
         if (a + b) % 2 == 0]
    )  # fmt: skip
    support = float(cells.sum())
    spread = float(np.max(np.abs(cells / cells.mean() - 1.0)))
    coarse = float(np.sum(0.125 * np.log(0.125 / cells)))
    return support, spread, coarse


def run(temps: int, replicas: int, steps: int, every: int, rounds: int, seed: int) -> dict:
    toy = ebm.datasets.toy("checkerboard")
    k_data, k_energy, k_fit, k_test = jax.random.split(jax.random.key(seed), 4)
    data = toy.sample(k_data, 50_000)
    energy = ebm.energies.MLPEnergy(2, key=k_energy)
    if temps == 1:
        negatives = ebm.negatives.Persistent(
            num_chains=replicas, num_mcmc_steps=rounds, reinit_fraction=0.0
        )
    else:
        negatives = ebm.negatives.ParallelTempering(
            num_chains=replicas // temps, num_temperatures=temps, num_mcmc_steps=rounds
        )
    curve: dict[int, tuple[float, float, float]] = {}  # step: (seconds, kl, kl_se)
    excluded = [0.0]
    start = [0.0]
    wanted = {s for s in CURVE if s <= steps} | {steps}

    def saver(folder, meta):
        del folder, meta

        def save(state, history, recorded, diverged):
            del history, recorded
            jax.block_until_ready(state)
            now = time.perf_counter()
            step = int(state.step)
            if diverged or step not in wanted:
                return
            out = ebm.evaluate.kl_to_toy(state.average_params, toy, key=k_test)
            curve[step] = (now - start[0] - excluded[0], out.kl, out.kl_stderr)
            excluded[0] += time.perf_counter() - now

        return save

    original = _checkpoint.saver
    _checkpoint.saver = saver
    try:
        start[0] = time.perf_counter()
        res = ebm.fit(
            energy,
            data,
            key=k_fit,
            num_steps=steps,
            negatives=negatives,
            steps_per_call=every,
            checkpoint_every=every,
            progress_bar=False,
        )
        jax.block_until_ready(res.energy)
    finally:
        _checkpoint.saver = original
    h = res.history
    pt = {k: float(np.mean(np.asarray(h[k][-100:]))) for k in h if k in _PT_COLUMNS}
    first = min(curve)
    ms = 1e3 * (curve[steps][0] - curve[first][0]) / max(steps - first, 1)
    return {
        "temps": temps,
        "ladders": replicas // temps,
        "curve": curve,
        "ms_per_step": ms,
        "acc": float(np.mean(h["acceptance_rate"][-100:])),
        "pt": pt,
        "cells": cell_split(res.energy),
    }


_PT_COLUMNS = ("barrier", "swap_acceptance_min", "round_trips")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--temps", nargs="+", type=int, default=[1, 4, 8, 16])
    parser.add_argument("--replicas", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(
        f"# tempering_cost: checkerboard, {args.replicas} replicas, {args.rounds} rounds/step, "
        f"seed {args.seed}; {platform.processor() or platform.machine()}, "
        f"{jax.device_count()}× {jax.devices()[0].device_kind}, jax {jax.__version__}"
    )
    steps = [s for s in CURVE if s <= args.steps]
    steps = steps if args.steps in steps else [*steps, args.steps]
    print(
        "| K | ladders × K | ms/step | "
        + " | ".join(f"KL @ {s} (time s)" for s in steps)
        + " | acceptance | Λ | min swap acc. | round trips / ladder / step | "
        "mass on the squares | max square deviation | 9-bin KL |"
    )
    print("|---" * (len(steps) + 10) + "|")
    for temps in args.temps:
        r = run(temps, args.replicas, args.steps, args.every, args.rounds, args.seed)
        cells = [
            f"{r['curve'][s][1]:.4f} ± {r['curve'][s][2]:.4f} ({r['curve'][s][0]:.0f})"
            if s in r["curve"]
            else "—"
            for s in steps
        ]
        pt = r["pt"]
        extra = [f"{pt[k]:.3g}" if k in pt else "—" for k in _PT_COLUMNS]
        print(
            f"| {temps} | {r['ladders']} × {temps} | {r['ms_per_step']:.0f} | "
            + " | ".join(cells)
            + f" | {r['acc']:.2f} | "
            + " | ".join(extra)
            + " | {:.3f} | {:.1%} | {:.4f} |".format(*r["cells"]),
            flush=True,
        )


if __name__ == "__main__":
    main()
