"""What recording chains for diagnostics costs during `fit`.

    python benchmarks/recording_cost.py                 # 8gaussians, 1000 steps, 3 repeats
    python benchmarks/recording_cost.py --steps 500 --repeats 5

Every row trains the same MLPEnergy (hidden 128×3) with `fit`'s defaults (1024 chains,
20 MALA steps, batch 1024, persistent chains, 100 steps per compiled call) on 50 000 8gaussians
points; only what is recorded changes:

* none: `num_recorded_chains=0`;
* default: 8 chains, a draw every 10 steps (`fit`'s default);
* default + held-out NLL: also `validation_data` (5 000 points, NLL every 10 steps);
* every step: 64 chains recorded at every step (an upper bound).

One compiled program per row is built by a warm-up run first (the optimizer object is shared,
so the timed runs hit the compilation cache); the timed runs include everything `fit` does on
the host (history, records, progress bookkeeping). Rows are interleaved and repeated; the table
shows the median time per step and the overhead against "none".
"""

from __future__ import annotations

import argparse
import functools
import platform

import jax
from timing import interleaved, print_table

import numpyro_ebm as ebm

ROWS = {
    "none": {"num_recorded_chains": 0},
    "default (8 chains / 10 steps)": {},
    "default + held-out NLL": {"validation": True},
    "every step, 64 chains": {"num_recorded_chains": 64, "record_every": 1},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    toy = ebm.datasets.toy("8gaussians")
    data = toy.sample(jax.random.key(0), 50_000)
    validation = toy.sample(jax.random.key(1), 5_000)
    energy = ebm.energies.MLPEnergy(2, key=jax.random.key(2))
    optimizer = ebm.training.default_optimizer(args.steps)

    def run(settings: dict) -> None:
        settings = dict(settings)
        extra = {"validation_data": validation} if settings.pop("validation", False) else {}
        res = ebm.fit(
            energy,
            data,
            key=jax.random.key(3),
            num_steps=args.steps,
            optimizer=optimizer,
            progress_bar=False,
            **settings,
            **extra,
        )
        jax.block_until_ready(res.state)

    rows = {name: functools.partial(run, settings) for name, settings in ROWS.items()}
    times = interleaved(rows, args.repeats, args.steps)
    print(
        f"# recording cost, {args.steps} steps × {args.repeats} repeats, "
        f"{jax.devices()[0].platform} ({platform.machine()}, {jax.device_count()} device), "
        f"jax {jax.__version__}, float32"
    )
    print_table(
        times, "recording", "none", lambda m, b: f"{100 * (m / b - 1):+.1f}%", "overhead vs none"
    )


if __name__ == "__main__":
    main()
