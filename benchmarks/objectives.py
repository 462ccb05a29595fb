"""Score matching against maximum likelihood: KL on the 2-D toys, test likelihood on digits, cost.

    python benchmarks/objectives.py                          # the three toys, every objective
    python benchmarks/objectives.py --toys 8gaussians --steps 500 --objectives ml,ssm
    python benchmarks/objectives.py --toys digits --objectives ml,ssm,dsm,ssm+ml --sigma 0.1

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
scales from 1.0 down to ``--sigma`` (geometric) with a noise-conditional energy;
``ssm+ml`` the hybrid: sliced score matching for the first half of the steps, then maximum
likelihood from the averaged SSM energy for the second half (fresh chains, a fresh schedule).

``digits`` (64-D, scikit-learn's 8×8 digits dequantised to (−1, 1), ``datasets.digits()``):
MLPEnergy 256×256 with ``energy_l2`` 1e-4 (as ``digits_likelihood.py``), scored at the end
only, by the test log-likelihood in nats/image with log Z by AIS (base fitted to the training
rows; the error bar combines the test mean's and AIS's), so the "to KL" column is empty
and its per-step times are those of the same calls as on the toys.
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
OBJECTIVES = ("ml", "sm", "ssm", "dsm", "adsm", "ssm+ml")


def objective_and_energy(name: str, sigma: float, key, digits: bool = False):
    dim, hidden = (64, (256, 256)) if digits else (2, (128, 128, 128))
    if name == "adsm":
        scales = tuple(float(s) for s in np.geomspace(1.0, sigma, 10))
        energy = ebm.energies.NoiseConditionalEnergy(dim, scales[-1], hidden=hidden, key=key)
        return training.DenoisingScoreMatching(scales), energy
    energy = ebm.energies.MLPEnergy(dim, hidden=hidden, key=key)
    if name == "dsm":
        return training.DenoisingScoreMatching(sigma), energy
    return name, energy


def phases(name: str, steps: int) -> list[tuple[str, int]]:
    """The objectives a row trains with, in order, and their steps."""
    if name == "ssm+ml":
        return [("ssm", steps // 2), ("ml", steps - steps // 2)]
    return [(name, steps)]


def run(toy_name: str, name: str, args) -> dict:
    digits = toy_name == "digits"
    k_data, k_energy, k_init, k_loop, k_test = jax.random.split(jax.random.key(args.seed), 5)
    if digits:
        data_set = ebm.datasets.digits()
        data, test = data_set.train, data_set.test
    else:
        toy = ebm.datasets.toy(toy_name)
        data = toy.sample(k_data, 50_000)
    energy, offset = None, 0
    curve, seconds, step_seconds, history, rejected = [], 0.0, [], None, 0
    for phase, steps in phases(name, args.steps):
        objective, fresh = objective_and_energy(phase, args.sigma, k_energy, digits)
        energy = fresh if energy is None else energy
        settings = dict(objective=objective, track_log_z=False)
        if digits:
            settings["energy_l2"] = 1e-4
        config = ebm.TrainConfig(**settings).resolve(steps)
        problem = training.EnergyProblem(config.batch_size)
        state = training.energy_init(jax.random.fold_in(k_init, offset), energy, data, config)
        history = None
        every = args.every
        # every ``every`` steps, and the phase's last step (a phase need not be a multiple)
        for stop in [*range(every, steps, every), steps]:
            start = time.perf_counter()
            state, history, _ = training.train(
                state,
                key=jax.random.fold_in(k_loop, offset),
                data=data,
                problem=problem,
                config=config,
                num_steps=stop,
                steps_per_call=every,
                progress_bar=False,
                history=history,
            )
            elapsed = time.perf_counter() - start
            seconds += elapsed
            if stop > every and stop % every == 0:  # not the compiling first call, nor a
                step_seconds.append(elapsed / every)  # short last one (it runs a full scan)
            if not digits:
                kl = ebm.evaluate.kl_to_toy(state.average_params, toy, key=k_test)
                curve.append((offset + stop, seconds, kl.kl, kl.kl_stderr))
        rejected += int(np.sum(~history["is_finite"].astype(bool)))
        energy, offset = state.average_params, offset + steps
    if digits:
        log_z = ebm.logz.ais(energy, (64,), key=k_test, data=data)
        ll = ebm.evaluate.log_likelihood(energy, test, log_z)
        se = float(np.hypot(ll.stderr, log_z.stderr))
        curve.append((offset, seconds, ll.value, se))
    final = curve[-1]
    reached = None
    if not digits:
        reached = next(((s, t) for s, t, kl, _ in curve if kl <= args.target), None)
    return {
        "toy": toy_name,
        "objective": name,
        "kl": final[2],
        "kl_se": final[3],
        "ms": 1000 * float(np.median(step_seconds)) if step_seconds else float("nan"),
        "reached": reached,
        "seconds": seconds,
        "curve": [(s, value) for s, _, value, _ in curve],
        "rejected": rejected,
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
    print("(digits rows: the KL column is the test log-likelihood in nats/image, higher is better)")
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
