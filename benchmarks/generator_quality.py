"""Generator-based negatives (Kim & Bengio 2016) against MCMC on the 2-D toys.

    python benchmarks/generator_quality.py                       # all modes, three toys
    python benchmarks/generator_quality.py --toys 8gaussians --modes hybrid --steps 500

Modes (each trains a fresh MLPEnergy, hidden 128×3, with `fit`'s defaults otherwise: 2000 steps,
1024 negatives per step, batch 1024, 50 000 training points):

* paper: `negatives="generator", entropy="batch_norm"`: the paper's method (deterministic
  generator with batch norm, entropy Σ ½ log(2πe γ²), one generator step then one energy step).
* improved: `negatives="generator", entropy="nearest_neighbour"`: a noisy generator with a
  k-nearest-neighbour entropy estimate of its output.
* hybrid: `negatives="hybrid"`: generator samples (improved entropy), importance-resampled
  towards the model, start 20 MALA steps; the refined samples are the negatives and also pull
  the generator (amortization).
* pcd: persistent MALA chains (the training issue's default), for reference.

Columns: KL(data ‖ model) ± one standard error with grid-exact log Z (512² grid, 20 000 fresh
test points); wall time including compilation; energy-gradient evaluations (per-event gradients
of E, in x or θ, counted from the configuration: chains' initial and per-step gradients,
generator-loss backward passes, the diagnostic ∇ₓE at generator negatives, and the parameter
gradient's data and negative points; the hybrid's resampling adds 1024 energy evaluations per
step without a gradient); for the trained generator, the energy distance of 20 000
of its samples to 20 000 test points (lower is better, 0 when equal in distribution) and, on
8gaussians, its largest deviation from the true 1/8 share per mode (samples assigned to the
nearest centre).
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import numpyro_ebm as ebm

TOYS = ("8gaussians", "rings", "checkerboard")
MODES = {
    "paper": {"negatives": "generator", "entropy": "batch_norm"},
    "improved": {"negatives": "generator", "entropy": "nearest_neighbour"},
    "hybrid": {"negatives": "hybrid"},
    "pcd": {"negatives": "persistent"},
}
NUM_CHAINS, NUM_MCMC_STEPS, BATCH = 1024, 20, 1024


def gradient_evaluations(negatives: str, steps: int) -> int:
    """Per-event energy gradients over a run (see the module docstring)."""
    chains = NUM_CHAINS * (1 + NUM_MCMC_STEPS)  # MALA: one gradient at the start, one per step
    parameter_gradient = BATCH + NUM_CHAINS
    per_step = {
        "persistent": chains + parameter_gradient,
        "generator": NUM_CHAINS + NUM_CHAINS + parameter_gradient,
        "hybrid": chains + NUM_CHAINS + parameter_gradient,
    }[negatives]
    return per_step * steps


def mode_share_error(samples: np.ndarray) -> float:
    """Largest |share − 1/8| over the 8 modes of 8gaussians (nearest centre = nearest angle)."""
    angle = np.arctan2(samples[:, 1], samples[:, 0])
    mode = np.round(angle / (np.pi / 4)).astype(int) % 8
    shares = np.bincount(mode, minlength=8) / len(mode)
    return float(np.max(np.abs(shares - 1 / 8)))


def run(toy_name: str, mode: str, steps: int, seed: int = 0) -> dict:
    toy = ebm.datasets.toy(toy_name)
    k_data, k_energy, k_fit, k_test, k_gen, k_ref = jax.random.split(jax.random.key(seed), 6)
    data = toy.sample(k_data, 50_000)
    energy = ebm.energies.MLPEnergy(2, key=k_energy)
    options = MODES[mode]
    start = time.perf_counter()
    res = ebm.fit(
        energy,
        data,
        key=k_fit,
        num_steps=steps,
        num_chains=NUM_CHAINS,
        num_mcmc_steps=NUM_MCMC_STEPS,
        batch_size=BATCH,
        progress_bar=False,
        **options,
    )
    jax.block_until_ready(res.energy)
    seconds = time.perf_counter() - start
    out = ebm.evaluate.kl_to_toy(res.energy, toy, key=k_test)
    row = {
        "toy": toy_name,
        "mode": mode,
        "steps": steps,
        "kl": out.kl,
        "kl_se": out.kl_stderr,
        "seconds": seconds,
        "grads": gradient_evaluations(options["negatives"], steps),
        "rejected": int(np.sum(~res.history["is_finite"].astype(bool))),
        "gen_ed": float("nan"),
        "share": float("nan"),
    }
    if res.generator is not None:
        samples = res.generator(k_gen, 20_000)
        reference = toy.sample(k_ref, 20_000)
        row["gen_ed"] = float(
            jax.jit(ebm.generator.energy_distance)(samples[:5000], reference[:5000])
        )
        if toy_name == "8gaussians":
            row["share"] = mode_share_error(np.asarray(samples))
        row["finite"] = bool(jnp.all(jnp.isfinite(samples)))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toys", nargs="+", default=list(TOYS), choices=TOYS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(
        f"# generator_quality: {platform.processor() or platform.machine()}, "
        f"{jax.device_count()}× {jax.devices()[0].device_kind}, jax {jax.__version__}"
    )
    print(
        "| toy | mode | steps | KL (nats) | time (s) | energy-gradient evals | rejected steps | "
        "generator energy distance | generator max share error |"
    )
    print("|---" * 9 + "|")
    for toy_name in args.toys:
        for mode in args.modes:
            r = run(toy_name, mode, args.steps, args.seed)
            print(
                f"| {r['toy']} | {r['mode']} | {r['steps']} | {r['kl']:.4f} ± {r['kl_se']:.4f} | "
                f"{r['seconds']:.1f} | {r['grads'] / 1e6:.1f} M | {r['rejected']} | "
                f"{r['gen_ed']:.4f} | {r['share']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
