"""Train the 8gaussians default run and write its diagnostics report (the one in the docs).

    python benchmarks/diagnostics_report.py      # writes docs/reports/8gaussians.{html,md}
    python benchmarks/diagnostics_report.py --steps 500 --out /tmp/reports

`fit` with its defaults (MLPEnergy 128×3, 2000 steps, 1024 persistent MALA chains, 20 steps,
batch 1024) on 50 000 points, with 5 000 held-out points for the held-out NLL; then
`diagnostics.diagnose` (printed), the exact KL with grid log Z, and `diagnostics.report` as
self-contained HTML and as Markdown with PNGs.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax

import numpyro_ebm as ebm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--sampler", default="mala")
    parser.add_argument("--out", default=os.path.join("docs", "reports"))
    parser.add_argument("--name", default="8gaussians")
    args = parser.parse_args()

    toy = ebm.datasets.toy("8gaussians")
    k_data, k_val, k_energy, k_fit, k_kl = jax.random.split(jax.random.key(0), 5)
    data = toy.sample(k_data, 50_000)
    validation = toy.sample(k_val, 5_000)
    start = time.perf_counter()
    res = ebm.fit(
        ebm.energies.MLPEnergy(2, key=k_energy),
        data,
        key=k_fit,
        num_steps=args.steps,
        sampler=args.sampler,
        validation_data=validation,
        progress_bar=False,
    )
    seconds = time.perf_counter() - start
    kl = ebm.evaluate.kl_to_toy(res.energy, toy, key=k_kl)
    print(
        f"# 8gaussians, {args.steps} steps, sampler {args.sampler}, {seconds:.0f} s on "
        f"{jax.devices()[0].platform} ({platform.machine()}), jax {jax.__version__}, float32"
    )
    print(f"KL(data ‖ model) = {kl.kl:.4f} ± {kl.kl_stderr:.4f} nats")
    ebm.diagnostics.diagnose(res)
    title = f"Diagnostics report: 8gaussians, fit defaults ({args.steps} steps, {args.sampler})"
    for suffix in (".html", ".md"):
        path = os.path.join(args.out, args.name + suffix)
        ebm.diagnostics.report(res, path, data=data, toy=toy, key=k_kl, title=title)
        print("wrote", path)


if __name__ == "__main__":
    main()
