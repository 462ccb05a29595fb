"""AIS cost against accuracy on energies with a closed-form log Z.

    python benchmarks/ais_cost.py                       # 10-D mixture and 32-D Gaussian
    python benchmarks/ais_cost.py --temperatures 10 100 --particles 1000

For each energy, `logz.ais` runs with N(0, I) as the base (the hard case: the base is not
fitted to samples) over a grid of temperatures × particles (5 MALA moves per temperature, 8
independent runs for the error bar). Columns: the energy evaluations with gradient spent
(particles × temperatures × moves × runs), the time of a second call (compiled; the first
call, which compiles, is reported separately), the error against the exact log Z, the reported
standard error and whether it covers the error (|error| ≤ 2 se). The error of one run is one
draw: the coverage over seeds is tested in `tests/test_logz.py`.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
from logz_accuracy import correlated_gaussian, mixture_10d

import numpyro_ebm as ebm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--temperatures", type=int, nargs="+", default=[10, 30, 100, 300, 1000])
    parser.add_argument("--particles", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--moves", type=int, default=5)
    parser.add_argument("--runs", type=int, default=8)
    args = parser.parse_args()

    print(
        f"# ais_cost: {platform.machine()}, {jax.devices()[0].device_kind}, jax {jax.__version__},"
        f" float32; base N(0, I), {args.moves} MALA moves per temperature, {args.runs} runs"
    )
    print(
        "| energy | temperatures | particles | gradient evaluations | compile + run (s) "
        "| run (s) | estimate − truth | stderr | within 2 se |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    cases = [("10-D mixture", mixture_10d(), 10), ("32-D Gaussian", correlated_gaussian(32), 32)]
    for name, energy, dim in cases:
        truth = float(energy.log_z)
        for particles in args.particles:
            for temperatures in args.temperatures:
                times = []
                for seed in (0, 1):  # the first call compiles; the second is timed alone
                    start = time.perf_counter()
                    est = ebm.logz.ais(
                        energy,
                        (dim,),
                        key=jax.random.key(seed),
                        num_particles=particles,
                        num_temperatures=temperatures,
                        num_mcmc_steps=args.moves,
                        num_runs=args.runs,
                    )
                    times.append(time.perf_counter() - start)
                error = est.value - truth
                evaluations = particles * temperatures * args.moves * args.runs
                covered = "yes" if abs(error) <= 2 * est.stderr + 1e-5 else "no"
                print(
                    f"| {name} | {temperatures} | {particles} | {evaluations:.2e} "
                    f"| {times[0]:.1f} | {times[1]:.2f} | {error:+.4f} | {est.stderr:.4f} "
                    f"| {covered} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
