"""How the training step scales with the number of chains and the dimension.

    python benchmarks/scaling.py                                 # the default grid
    python benchmarks/scaling.py --chains 65536 --dims 64        # one point
    python benchmarks/scaling.py --budget 30                     # skip configurations slower

One training step of `fit` (`training.energy_step`, i.e. the core step for one energy, in a
compiled `lax.scan`, the call `fit` makes):
`num_chains` persistent MALA chains × 20 steps under an `MLPEnergy` (hidden 512 × 2 by
default), the loss gradient on a batch of 1024 and on the negatives, Adam, the parameter
average and the learned log Z. Data: standard normal points of the given dimension (the
throughput does not depend on what the data are). Columns:

- chain-steps / s: `num_chains × num_mcmc_steps` per step over the time per step (each MALA
  step is one energy value and gradient per chain: the cost that dominates);
- ms / step: the median over repeated compiled calls (compile excluded; compile time reported);
- memory: XLA's own accounting of the compiled call (`memory_analysis`: arguments + outputs +
  temporaries, in MiB), and on a GPU the allocator's peak.

Configurations expected to take more than `--budget` seconds per step (extrapolated linearly in
the number of chains from the previous one) are skipped and marked so.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import equinox as eqx
import jax

import numpyro_ebm as ebm
from numpyro_ebm import training

BATCH, NUM_MCMC_STEPS = 1024, 20


def build(num_chains: int, dim: int, hidden: tuple[int, ...], steps_per_call: int):
    """``(call, state, data, key)``: ``call(state, key, data)`` runs ``steps_per_call`` steps."""
    data = jax.random.normal(jax.random.key(0), (8192, dim))
    energy = ebm.energies.MLPEnergy(dim, hidden=hidden, key=jax.random.key(1))
    config = ebm.TrainConfig(
        optimizer=training.default_optimizer(1000),
        num_chains=num_chains,
        num_mcmc_steps=NUM_MCMC_STEPS,
        batch_size=BATCH,
        num_recorded_chains=0,
    ).resolve(schedule_steps=1000)
    state = training.energy_init(jax.random.key(2), energy, data, config)

    @eqx.filter_jit
    def call(state, key, data):
        def body(state, step_key):
            k_rows, k_step = jax.random.split(step_key)
            rows = jax.random.randint(k_rows, (BATCH,), 0, data.shape[0])
            return training.energy_step(k_step, state, data[rows], config)[0], None

        return jax.lax.scan(body, state, jax.random.split(key, steps_per_call))[0]

    return call, state, data


def memory_mib(call, state, key, data) -> float:
    stats = call.lower(state, key, data).compile().compiled.memory_analysis()
    if stats is None:
        return float("nan")
    total = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
    return total / 2**20


def measure(num_chains, dim, hidden, steps_per_call, min_seconds):
    call, state, data = build(num_chains, dim, hidden, steps_per_call)
    start = time.perf_counter()
    state = jax.block_until_ready(call(state, jax.random.key(3), data))
    compile_s = time.perf_counter() - start
    times, i = [], 0
    while sum(times) < min_seconds or len(times) < 2:
        start = time.perf_counter()
        state = jax.block_until_ready(call(state, jax.random.key(10 + i), data))
        times.append((time.perf_counter() - start) / steps_per_call)
        i += 1
    step = statistics.median(times)
    peak = float("nan")
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        peak = stats["peak_bytes_in_use"] / 2**20
    return step, compile_s, memory_mib(call, state, jax.random.key(4), data), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chains", type=int, nargs="+", default=[256, 1024, 4096, 16384, 65536])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 64, 784])
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 512])
    parser.add_argument("--steps-per-call", type=int, default=2)
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--budget", type=float, default=20.0, help="max seconds per step")
    args = parser.parse_args()
    hidden = tuple(args.hidden)
    device = jax.devices()[0]
    print(
        f"# scaling: MLP {hidden}, {NUM_MCMC_STEPS} MALA steps per training step, batch {BATCH};"
        f" {device.platform} ({device.device_kind}, {platform.machine()}), "
        f"{jax.device_count()} device(s), jax {jax.__version__}, float32"
    )
    print(
        "| dim | chains | chain-steps / s | ms / step | compile (s) | XLA memory (MiB) "
        "| peak allocated (MiB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for dim in args.dims:
        previous = None
        for num_chains in sorted(args.chains):
            if previous is not None:
                estimate = previous[1] * num_chains / previous[0]
                if estimate > args.budget:
                    print(
                        f"| {dim} | {num_chains} | skipped (≈ {estimate:.0f} s / step "
                        f"expected) | | | | |",
                        flush=True,
                    )
                    continue
            step, compile_s, mem, peak = measure(
                num_chains, dim, hidden, args.steps_per_call, args.min_seconds
            )
            previous = (num_chains, step)
            rate = num_chains * NUM_MCMC_STEPS / step
            print(
                f"| {dim} | {num_chains} | {rate:.3g} | {1e3 * step:.1f} | {compile_s:.1f} "
                f"| {mem:.0f} | {peak:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
