"""Score matching against maximum likelihood on the 2-D toys: KL, cost per step, time to a KL.

    python benchmarks/objectives.py                          # the three toys, every objective
    python benchmarks/objectives.py --toys 8gaussians --steps 500 --objectives ml,ssm

Each row trains a fresh MLPEnergy (hidden 128×3; the annealed-DSM row a NoiseConditionalEnergy
of the same size) with `fit`'s defaults apart from the objective (1024 persistent MALA chains ×
20 steps for ML, none for score matching; batch 1024; learning rate 5e-3 with cosine decay;
parameter average 0.995; energy_l2 0.01 decaying to 10%) on 50 000 training points. Every
``--every`` steps the averaged energy is scored on 20 000 fresh test points with log Z by
quadrature on a 512² grid over the toy's box widened by 50% per side (``evaluate.kl_to_toy``):
the KL column is the end of the run (± one standard error), "to KL ≤ t" the first evaluated
step (and the training seconds until then) at which KL fell to ``--target``. Milliseconds per
step exclude compilation and evaluation (the calls after the first). The log Z tracker is
off (the grid gives log Z exactly in 2-D), so the step costs are those of the objectives.

Objectives: ``ml`` maximum likelihood; ``sm`` score matching with the exact Hessian trace;
``ssm`` sliced score matching (1 Rademacher projection, variance reduction); ``dsm`` denoising
score matching at σ = ``--sigma`` (in the toys' units); ``adsm`` annealed DSM over 10 noise
scales from 1.0 down to ``--sigma`` (geometric) with a noise-conditional energy.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np

import numpyro_ebm as ebm
from numpyro_ebm import training

TOYS = ("8gaussians", "rings", "checkerboard")
OBJECTIVES = ("ml", "sm", "ssm", "dsm", "adsm")


def objective_and_energy(name: str, sigma: float, key):
    if name == "adsm":
        scales = tuple(float(s) for s in np.geomspace(1.0, sigma, 10))
        energy = ebm.energies.NoiseConditionalEnergy(2, scales[-1], key=key)
        return training.DenoisingScoreMatching(scales), energy
    energy = ebm.energies.MLPEnergy(2, key=key)
    if name == "dsm":
        return training.DenoisingScoreMatching(sigma), energy
    return name, energy


def run(toy_name: str, name: str, args) -> dict:
    toy = ebm.datasets.toy(toy_name)
    k_data, k_energy, k_init, k_loop, k_test = jax.random.split(jax.random.key(args.seed), 5)
    data = toy.sample(k_data, 50_000)
    objective, energy = objective_and_energy(name, args.sigma, k_energy)
    config = ebm.TrainConfig(objective=objective, track_log_z=False).resolve(args.steps)
    problem = training.EnergyProblem(config.batch_size)
    state = training.energy_init(k_init, energy, data, config)
    curve, seconds, step_seconds, history = [], 0.0, [], None
    for stop in range(args.every, args.steps + 1, args.every):
        start = time.perf_counter()
        state, history, _ = training.train(
            state,
            key=k_loop,
            data=data,
            problem=problem,
            config=config,
            num_steps=stop,
            steps_per_call=args.every,
            progress_bar=False,
            history=history,
        )
        elapsed = time.perf_counter() - start
        seconds += elapsed
        if stop > args.every:
            step_seconds.append(elapsed / args.every)
        kl = ebm.evaluate.kl_to_toy(state.average_params, toy, key=k_test)
        curve.append((stop, seconds, kl))
    final = curve[-1][2]
    reached = next(((s, t) for s, t, kl in curve if kl.kl <= args.target), None)
    return {
        "toy": toy_name,
        "objective": name,
        "kl": final.kl,
        "kl_se": final.kl_stderr,
        "ms": 1000 * float(np.median(step_seconds)) if step_seconds else float("nan"),
        "reached": reached,
        "seconds": seconds,
        "curve": [(s, kl.kl) for s, _, kl in curve],
        "rejected": int(np.sum(~history["is_finite"].astype(bool))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--toys", default=",".join(TOYS))
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=200, help="steps between KL evaluations")
    parser.add_argument("--target", type=float, default=0.05, help="the KL to reach (nats)")
    parser.add_argument("--sigma", type=float, default=0.05, help="DSM noise scale")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(
        f"# objectives: {platform.machine()} {jax.devices()[0].platform}, jax {jax.__version__}; "
        f"{args.steps} steps, KL every {args.every}, target {args.target}, DSM σ {args.sigma}, "
        f"seed {args.seed}"
    )
    print(
        f"| toy | objective | KL ± se (nats) | ms/step | to KL ≤ {args.target} (step, s) "
        "| run s (incl. compile) | rejected steps |"
    )
    print("|---|---|---|---|---|---|---|")
    curves = []
    for toy_name in args.toys.split(","):
        for name in args.objectives.split(","):
            r = run(toy_name, name, args)
            reached = "not reached"
            if r["reached"] is not None:
                reached = f"{r['reached'][0]}, {r['reached'][1]:.0f}"
            print(
                f"| {r['toy']} | {r['objective']} | {r['kl']:.4f} ± {r['kl_se']:.4f} "
                f"| {r['ms']:.1f} | {reached} | {r['seconds']:.0f} | {r['rejected']} |",
                flush=True,
            )
            curves.append(r)
    print("\nKL along training (step: KL)")
    for r in curves:
        points = ", ".join(f"{s}: {kl:.3f}" for s, kl in r["curve"])
        print(f"- {r['toy']} {r['objective']}: {points}")


if __name__ == "__main__":
    main()
