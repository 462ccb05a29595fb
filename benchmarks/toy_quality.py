"""Quality of `fit` on the 2-D toys: KL(data ‖ model) with grid-exact log Z, and wall time.

    python benchmarks/toy_quality.py                    # defaults on the three toys
    python benchmarks/toy_quality.py --variants         # + samplers {hmc, ula} and negatives
                                                        #   {replay, short_run}
    python benchmarks/toy_quality.py --toys 8gaussians --steps 500

Each row trains a fresh MLPEnergy (hidden 128×3) with `fit`'s defaults unless the row says
otherwise (2000 steps, 1024 chains, 20 MALA steps, batch 1024, persistent chains with 10% of
them re-initialised at data points each step) on 50 000 training points, then
evaluates on 20 000 fresh test points with log Z by quadrature on a 512² grid over the toy's box
widened by 50% per side. KL ± one standard error (paired differences on the same points).
"learned log Z − grid" compares the log Z learned during training (noise-contrastive) with the
quadrature value. Times include compilation.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np

import numpyro_ebm as ebm

TOYS = ("8gaussians", "rings", "checkerboard")


def run(
    toy_name: str, steps: int, sampler: str, negatives: str, reinit: float | None, seed: int = 0
) -> dict:
    toy = ebm.datasets.toy(toy_name)
    k_data, k_energy, k_fit, k_test = jax.random.split(jax.random.key(seed), 4)
    data = toy.sample(k_data, 50_000)
    energy = ebm.energies.MLPEnergy(2, key=k_energy)
    start = time.perf_counter()
    extra = {} if reinit is None else {"reinit_fraction": reinit}
    res = ebm.fit(
        energy,
        data,
        key=k_fit,
        num_steps=steps,
        sampler=sampler,
        negatives=negatives,
        progress_bar=False,
        **extra,
    )
    jax.block_until_ready(res.energy)
    seconds = time.perf_counter() - start
    out = ebm.evaluate.kl_to_toy(res.energy, toy, key=k_test)
    return {
        "toy": toy_name,
        "sampler": sampler,
        "steps": steps,
        "negatives": negatives + ("" if reinit is None else f" (reinit {reinit:g})"),
        "kl": out.kl,
        "kl_se": out.kl_stderr,
        "nll": out.test_nll,
        "nll_se": out.test_nll_stderr,
        "entropy": out.entropy,
        "log_z_error": res.log_z.value - out.log_z.value,
        "rejected": int(np.sum(~res.history["is_finite"].astype(bool))),
        "acc": float(np.mean(res.history["acceptance_rate"][-100:])),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toys", nargs="+", default=list(TOYS), choices=TOYS)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--variants", action="store_true")
    args = parser.parse_args()
    configs = [("mala", "persistent", None)]
    if args.variants:
        configs += [
            ("hmc", "persistent", None),
            ("ula", "persistent", None),
            ("mala", "replay", None),
            ("mala", "short_run", None),
            ("mala", "persistent", 0.0),
        ]
    print(
        f"# toy_quality: {platform.processor() or platform.machine()}, "
        f"{jax.device_count()}× {jax.devices()[0].device_kind}, jax {jax.__version__}"
    )
    header = (
        "| toy | sampler | negatives | steps | KL (nats) | test NLL | −H bound | "
        "learned log Z − grid | rejected steps | acceptance | time (s) |"
    )
    print(header)
    print("|---" * 11 + "|")
    for toy_name in args.toys:
        for sampler, negatives, reinit in configs:
            r = run(toy_name, args.steps, sampler, negatives, reinit)
            print(
                f"| {r['toy']} | {r['sampler']} | {r['negatives']} | {r['steps']} | "
                f"{r['kl']:.4f} ± {r['kl_se']:.4f} | {r['nll']:.3f} ± {r['nll_se']:.3f} | "
                f"{r['entropy']:.3f} | {r['log_z_error']:+.4f} | {r['rejected']} | "
                f"{r['acc']:.2f} | {r['seconds']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
