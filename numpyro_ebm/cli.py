"""The ``numpyro-ebm`` command.

``numpyro-ebm demo [--toy NAME] [--steps N] [--out DIR]`` trains an MLP energy on a 2-D toy
with the library's defaults, prints the evaluation table (test NLL, entropy bound, KL ± standard
error, time) and writes plots of the learned density next to the true one and of samples.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

__all__ = ["main"]

TOYS = ("8gaussians", "checkerboard", "rings")


def _demo(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    import numpyro_ebm as ebm
    from numpyro_ebm.plots import save_density_plot

    toy = ebm.datasets.toy(args.toy)
    key = jax.random.key(args.seed)
    k_data, k_energy, k_fit, k_test = jax.random.split(key, 4)
    data = toy.sample(k_data, args.num_data)
    energy = ebm.energies.MLPEnergy(2, key=k_energy)
    print(f"Training an MLP energy on {args.toy} ({args.num_data} points, {args.steps} steps)")
    start = time.perf_counter()
    res = ebm.fit(energy, data, key=k_fit, num_steps=args.steps, progress_bar=not args.quiet)
    seconds = time.perf_counter() - start
    result = ebm.evaluate.kl_to_toy(res.energy, toy, key=k_test)
    diverged = int(np.sum(~res.history["is_finite"].astype(bool)))
    rows = [
        ("toy", args.toy),
        ("test NLL (nats)", f"{result.test_nll:.4f} ± {result.test_nll_stderr:.4f}"),
        ("entropy bound −H (best NLL)", f"{result.entropy:.4f}"),
        ("KL(data ‖ model) (nats)", f"{result.kl:.4f} ± {result.kl_stderr:.4f}"),
        ("log Z (grid)", f"{result.log_z.value:.4f}"),
        ("rejected non-finite steps", str(diverged)),
        (
            "final acceptance / step size",
            f"{res.history['acceptance_rate'][-1]:.3f} / {res.history['step_size'][-1]:.4f}",
        ),
        ("training time (s, incl. compile)", f"{seconds:.1f}"),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.toy}_density.png")
    save_density_plot(path, res.energy, toy, res.chains, log_z=result.log_z.value)
    print(f"\nwrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``numpyro-ebm``."""
    parser = argparse.ArgumentParser(prog="numpyro-ebm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train on a 2-D toy and print the evaluation table")
    demo.add_argument(
        "--toy", default="8gaussians", choices=("8gaussians", "checkerboard", "rings")
    )
    demo.add_argument("--steps", type=int, default=2000)
    demo.add_argument("--num-data", type=int, default=50_000)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="outputs/demo")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.steps < 1:
            parser.error("--steps must be >= 1")
        return _demo(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
