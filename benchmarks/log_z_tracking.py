"""The tracked log Z (``logz.tracking``) against exact values, a long AIS, and its cost.

    python benchmarks/log_z_tracking.py calibration [--energies gaussian separable]
        [--dims 16 32 64] [--seeds 20] [--steps 300]
    python benchmarks/log_z_tracking.py digits [--steps 2000] [--points 5 | --at 300 600 ...]
        [--ais-temperatures 1000]
    python benchmarks/log_z_tracking.py overhead [--steps 100] [--repeats 3] [--floor-every 4]
    python benchmarks/log_z_tracking.py whole-run [--steps 2000]

``calibration``: energies whose log Z is exact whatever the training did (a trainable
``GaussianEnergy``, full covariance; ``SeparableEnergy``, a sum of 1-D MLPs integrated by 1-D
quadrature) trained by ``fit`` on non-Gaussian data (a skewed, correlated mixture), one run per
seed; the final tracked log Z against ``energy.log_z``: the share of seeds within 3 standard
errors and within 0.5 nats, and the share of the last 50 updates at which the floor's
importance estimate was fused with it (history column ``log_z_fused``).

``digits``: an ``MLPEnergy`` (256×256, energy_l2 1e-4 as in ``digits_likelihood.py``) trained
on the 64-D digits; at ``--points`` evenly spaced steps the tracked log Z of the averaged
energy against a long AIS of the same energy (``logz.ais`` with ``--ais-temperatures``).

``overhead``: milliseconds per training step with and without the tracker (and its floor, every
step or every ``--floor-every`` steps), from the same state after 250 steps, 1024 chains, 20
MALA steps, on 2-D toy data and on digits, run as ``fit`` runs them (100 steps per compiled
call).

``whole-run``: seconds of a whole digits run (init and ``--steps`` steps) with and without the
tracker: its cost amortised over the start, the re-anchors and the bridged updates.
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from toy_quality import fused_share

import numpyro_ebm as ebm
from numpyro_ebm.training import core, loop
from numpyro_ebm.training.fit import EnergyProblem


def machine() -> str:
    return (
        f"{platform.machine()}, {jax.devices()[0].device_kind}, jax {jax.__version__}, "
        f"{jax.devices()[0].platform}"
    )


def skewed_data(key, dim: int, n: int = 20_000) -> jax.Array:
    """Half exponential − 1, half N(0, 0.5²), coordinates mixed by I + 0.3·(superdiagonal)."""
    k1, k2, k3 = jax.random.split(key, 3)
    skew = jax.random.exponential(k1, (n, dim)) - 1.0
    narrow = jax.random.normal(k2, (n, dim)) * 0.5
    pick = jax.random.bernoulli(k3, 0.5, (n, 1))
    mixing = jnp.eye(dim) + 0.3 * jnp.eye(dim, k=1)
    return jnp.where(pick, skew, narrow) @ mixing


def make_energy(name: str, dim: int, key):
    if name == "gaussian":
        return ebm.energies.GaussianEnergy(jnp.zeros(dim)), 2e-2
    if name == "separable":
        return ebm.energies.SeparableEnergy(dim, key=key), 5e-3
    raise ValueError(name)


def calibration(args) -> None:
    print(f"# log_z_tracking calibration: {machine()}; {args.steps} steps, {args.chains} chains")
    print(
        "| energy | D | seeds | mean error | RMS error | mean stderr | max abs error | "
        "within 3 SE | within 0.5 nats | fused, last 50 updates | s/run |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.energies:
        for dim in args.dims:
            errors, stderrs, seconds, fused = [], [], [], []
            for seed in range(args.seeds):
                k_data, k_energy, k_fit = jax.random.split(jax.random.key(1000 + seed), 3)
                data = skewed_data(k_data, dim)
                energy, learning_rate = make_energy(name, dim, k_energy)
                start = time.perf_counter()
                res = ebm.fit(
                    energy,
                    data,
                    key=k_fit,
                    num_steps=args.steps,
                    num_chains=args.chains,
                    num_mcmc_steps=args.mcmc_steps,
                    batch_size=args.chains,
                    learning_rate=learning_rate,
                    progress_bar=False,
                )
                seconds.append(time.perf_counter() - start)
                errors.append(res.log_z.value - float(res.energy.log_z))
                stderrs.append(res.log_z.stderr)
                fused.append(fused_share(res.history, 50))
                if args.verbose:
                    print(
                        f"  {name} D={dim} seed {seed}: error {errors[-1]:+.3f} ± {stderrs[-1]:.3f}"
                    )
            e, s = np.array(errors), np.array(stderrs)
            print(
                f"| {name} | {dim} | {args.seeds} | {e.mean():+.3f} | {np.sqrt(np.mean(e**2)):.3f} "
                f"| {s.mean():.3f} | {np.abs(e).max():.3f} | {np.mean(np.abs(e) <= 3 * s):.0%} "
                f"| {np.mean(np.abs(e) < 0.5):.0%} | {np.mean(fused):.0%} "
                f"| {np.mean(seconds[1:] or seconds):.1f} |",
                flush=True,
            )


def digits(args) -> None:
    data = ebm.datasets.digits()
    train = jnp.asarray(data.train)
    k_energy, k_fit, k_ais = jax.random.split(jax.random.key(args.seed), 3)
    energy = ebm.energies.MLPEnergy(64, hidden=(256, 256), key=k_energy)
    config = ebm.TrainConfig(energy_l2=args.energy_l2).resolve(schedule_steps=args.steps)
    problem = EnergyProblem(config.batch_size, False)
    k_init, k_loop = jax.random.split(k_fit)
    start = time.perf_counter()
    state = core.init(k_init, energy, train, problem, config)
    init_seconds = time.perf_counter() - start
    print(
        f"# log_z_tracking digits: {machine()}; MLPEnergy 256x256, {args.steps} steps, "
        f"energy_l2 {args.energy_l2:g}, defaults otherwise; tracker start {init_seconds:.0f} s"
    )
    print(
        f"# start: tracked log Z0 = {float(core.log_z_of(state, 'x')[0]):.2f} ± "
        f"{float(core.log_z_of(state, 'x')[1]):.2f}"
    )
    print(
        "| step | tracked log Z | stderr | AIS log Z | AIS stderr | tracked − AIS | "
        "combined SE | NCE log Z | min ESS since last | max bridge steps | AIS s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    history = None
    points = args.at or [round(args.steps * (i + 1) / args.points) for i in range(args.points)]
    for i, point in enumerate(points):
        state, history, _ = loop.train(
            state,
            key=k_loop,
            data=train,
            problem=problem,
            config=config,
            num_steps=point,
            progress_bar=False,
            history=history,
        )
        tracked, stderr = (float(v) for v in core.log_z_of(state, "x"))
        nce = float(state.average_log_z["x"])
        averaged = jax.tree.map(
            lambda a: a.copy() if hasattr(a, "copy") else a, state.average_params
        )
        start = time.perf_counter()
        if args.ais_reference:  # "value:stderr" per point, from an earlier run of this seed
            value, error = (float(v) for v in args.ais_reference.split(",")[i].split(":"))
            ais = ebm.logz.LogZEstimate(value, error, "ais", None, {})
        else:
            ais = ebm.logz.ais(
                averaged,
                (64,),
                key=jax.random.fold_in(k_ais, i),
                data=train,
                num_temperatures=args.ais_temperatures,
                num_runs=args.ais_runs,
            )
        ais_seconds = time.perf_counter() - start
        since = slice(0 if i == 0 else points[i - 1], point)
        min_ess = float(np.min(history["log_z_min_ess"][since]))
        bridges = int(np.max(history["log_z_bridge_steps"][since]))
        combined = math.hypot(stderr, ais.stderr)
        print(
            f"| {point} | {tracked:.2f} | {stderr:.2f} | {ais.value:.2f} | {ais.stderr:.2f} | "
            f"{tracked - ais.value:+.2f} | {combined:.2f} | {nce:.2f} | {min_ess:.3f} | "
            f"{bridges} | {ais_seconds:.0f} |",
            flush=True,
        )


def overhead(args) -> None:
    """Milliseconds per training step with and without the tracker, from the same state after
    ``--warmup`` steps (past the early bridging and the re-anchors at 100 and 200): ``--steps``
    steps run as ``fit`` runs them (``loop.train``, 100 steps per compiled call), alternating
    the two ``--repeats`` times and keeping each one's fastest. Compilation excluded. The steady
    state: by default no re-anchor falls in the window (250 to 350; the next is at 400), and
    ``whole-run`` counts the re-anchors."""
    print(
        f"# log_z_tracking overhead: {machine()}; 1024 chains, 20 MALA steps, batch 1024; "
        f"{args.steps} steps (loop.train, 100 per call) from the state after {args.warmup} "
        f"steps, best of {args.repeats} alternating rounds"
    )
    every = args.floor_every
    print(
        "| data | energy | tracking off (ms/step) | on, no floor (ms/step) | "
        f"on, floor every {every} steps (ms/step) | on (ms/step) | overhead, no floor | "
        f"overhead, floor every {every} | overhead |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    cases = [
        ("8gaussians (2-D)", ebm.datasets.toy("8gaussians").sample(jax.random.key(0), 20_000),
         ebm.energies.MLPEnergy(2, hidden=(128, 128, 128), key=jax.random.key(1)), 0.01),
        ("digits (64-D)", jnp.asarray(ebm.datasets.digits().train),
         ebm.energies.MLPEnergy(64, hidden=(256, 256), key=jax.random.key(1)), 1e-4),
    ]  # fmt: skip
    for label, data, energy, energy_l2 in cases:
        on = ebm.TrainConfig(energy_l2=energy_l2).resolve(schedule_steps=2000)
        off = on.replace(track_log_z=False)
        problem = EnergyProblem(on.batch_size, False)
        state = core.init(jax.random.key(2), energy, data, problem, on)
        state, _, _ = loop.train(
            state, key=jax.random.key(3), data=data, problem=problem, config=on,
            num_steps=args.warmup, progress_bar=False,
        )  # fmt: skip
        untracked = state._replace(log_z_tracker={k: None for k in state.log_z_tracker})
        starts = {
            "off": (off, untracked),
            "no floor": (on.replace(log_z_floor_samples=0), state),
            "thinned": (on.replace(log_z_floor_every=every), state),
            "on": (on, state),
        }

        def run(config, start, num_steps, data=data, problem=problem):
            # loop.train donates the state it is given: each run starts from a copy
            new, _, _ = loop.train(
                loop.own_buffers(start), key=jax.random.key(5), data=data, problem=problem,
                config=config, num_steps=args.warmup + num_steps, progress_bar=False,
            )  # fmt: skip
            jax.block_until_ready(new.step)

        times = dict.fromkeys(starts, math.inf)
        for config, start in starts.values():  # compile
            run(config, start, 100)
        for _ in range(args.repeats):
            for name, (config, start) in starts.items():
                begin = time.perf_counter()
                run(config, start, args.steps)
                times[name] = min(times[name], (time.perf_counter() - begin) / args.steps)
        off_ms, bare_ms, thin_ms, on_ms = (1000 * times[k] for k in starts)
        print(
            f"| {label} | MLPEnergy | {off_ms:.2f} | {bare_ms:.2f} | {thin_ms:.2f} | "
            f"{on_ms:.2f} | {bare_ms / off_ms - 1:+.1%} | {thin_ms / off_ms - 1:+.1%} | "
            f"{on_ms / off_ms - 1:+.1%} |",
            flush=True,
        )


def whole_run(args) -> None:
    """Seconds for a whole digits run (``core.init`` and ``--steps`` steps, compilation excluded:
    each is run once before it is timed) with and without the tracker: its cost amortised over
    the start, the re-anchors and the bridged updates, not only the steady state."""
    train = jnp.asarray(ebm.datasets.digits().train)
    k_energy, k_fit = jax.random.split(jax.random.key(args.seed))
    energy = ebm.energies.MLPEnergy(64, hidden=(256, 256), key=k_energy)
    on = ebm.TrainConfig(energy_l2=args.energy_l2).resolve(schedule_steps=args.steps)
    problem = EnergyProblem(on.batch_size, False)
    k_init, k_loop = jax.random.split(k_fit)
    print(
        f"# log_z_tracking whole-run: {machine()}; digits, MLPEnergy 256x256, {args.steps} "
        f"steps, 1024 chains, 20 MALA steps, batch 1024; compilation excluded"
    )
    print("| tracking | init (s) | steps (s) | ms/step | overhead of the steps | overhead in all |")
    print("|---|---|---|---|---|---|")
    seconds = {}
    for track in (False, True):
        config = on.replace(track_log_z=track)

        def run(num_steps, config=config):
            start = time.perf_counter()
            state = core.init(k_init, energy, train, problem, config)
            jax.block_until_ready(state.step)
            middle = time.perf_counter()
            state, _, _ = loop.train(
                state, key=k_loop, data=train, problem=problem, config=config,
                num_steps=num_steps, progress_bar=False,
            )  # fmt: skip
            jax.block_until_ready(state.step)
            return middle - start, time.perf_counter() - middle

        run(1)  # compiles init and the 100-step call
        init_s, steps_s = run(args.steps)
        seconds[track] = (init_s, steps_s)
        base_init, base_steps = seconds[False]
        print(
            f"| {'on' if track else 'off'} | {init_s:.1f} | {steps_s:.1f} | "
            f"{1000 * steps_s / args.steps:.1f} | {steps_s / base_steps - 1:+.1%} | "
            f"{(init_s + steps_s) / (base_init + base_steps) - 1:+.1%} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    cal = sub.add_parser("calibration")
    cal.add_argument("--energies", nargs="+", default=["gaussian", "separable"])
    cal.add_argument("--dims", type=int, nargs="+", default=[16, 32, 64])
    cal.add_argument("--seeds", type=int, default=20)
    cal.add_argument("--steps", type=int, default=300)
    cal.add_argument("--chains", type=int, default=256)
    cal.add_argument("--mcmc-steps", type=int, default=5)
    cal.add_argument("--verbose", action="store_true")
    dig = sub.add_parser("digits")
    dig.add_argument("--steps", type=int, default=2000)
    dig.add_argument("--points", type=int, default=5)
    dig.add_argument("--at", type=int, nargs="+", help="the steps to compare at (else evenly)")
    dig.add_argument("--energy-l2", type=float, default=1e-4)
    dig.add_argument("--ais-temperatures", type=int, default=1000)
    dig.add_argument("--ais-runs", type=int, default=8)
    dig.add_argument("--seed", type=int, default=0)
    dig.add_argument(
        "--ais-reference",
        help="V:SE,V:SE,...: the AIS value and stderr at each point from an earlier run of the "
        "same seed and steps (training does not depend on the tracker: check the NCE column)",
    )
    over = sub.add_parser("overhead")
    over.add_argument("--steps", type=int, default=100)
    over.add_argument("--repeats", type=int, default=3)
    over.add_argument("--warmup", type=int, default=250)
    over.add_argument("--floor-every", type=int, default=4, help="the thinned floor's column")
    run = sub.add_parser("whole-run")
    run.add_argument("--steps", type=int, default=2000)
    run.add_argument("--energy-l2", type=float, default=1e-4)
    run.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    parts = {"calibration": calibration, "digits": digits, "overhead": overhead}
    parts["whole-run"] = whole_run
    parts[args.part](args)


if __name__ == "__main__":
    main()
