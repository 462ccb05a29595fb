"""Quality of `fit` on the 2-D toys: KL(data ‖ model) with grid-exact log Z, and wall time.

    python benchmarks/toy_quality.py                    # defaults on the three toys
    python benchmarks/toy_quality.py --variants         # + samplers {hmc, ula} and negatives
                                                        #   {replay, short_run}
    python benchmarks/toy_quality.py --toys 8gaussians --steps 500
    python benchmarks/toy_quality.py --toys 8gaussians rings --log-z-particles 8192  # tracked
                                                        #   log Z with a smaller error bar
    python benchmarks/toy_quality.py --tempering        # issue 17: persistent (default and
                                                        #   reinit 0) against parallel
                                                        #   tempering, + the "bimodal" toy
    python benchmarks/toy_quality.py --tempering --toys bimodal --rows pt --ladders 128 --temps 8

Each row trains a fresh MLPEnergy (hidden 128×3) with `fit`'s defaults unless the row says
otherwise (2000 steps, 1024 chains, 20 MALA steps, batch 1024, persistent chains with 10% of
them re-initialised at data points each step) on 50 000 training points, then
evaluates on 20 000 fresh test points with log Z by quadrature on a 512² grid over the toy's box
widened by 50% per side. KL ± one standard error (paired differences on the same points).
"tracked log Z − grid" compares the log Z tracked during training (``FitResult.log_z``, ± its
standard error; "fused": the share of the last 100 updates at which the floor's importance
estimate was fused with it) with the quadrature value, and "NCE log Z − grid" the
noise-contrastive one learned beside it. Times include compilation.

With ``--tempering`` the rows are persistent chains (default, and with reinit_fraction=0) and
``ParallelTempering`` (``--ladders`` ladders of ``--temps`` replicas, ``--rounds`` rounds per
step; ladders × temps = 1024 replicas by default, the gradient evaluations of 1024 persistent
chains), the toys include ``"bimodal"`` (0.7 / 0.3, modes 12σ apart), and a last column gives
the model's mass left / right of ``datasets.BIMODAL_SPLIT`` (quadrature of the normalised
model density over each half of the widened box; truth 0.700 / 0.300). The PT columns
(barrier Λ, minimum swap acceptance, round trips per ladder per step) are means over the
last 100 steps.
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
ALL_TOYS = (*TOYS, "bimodal")
ROWS = {  # name: (sampler, negatives, reinit_fraction)
    "persistent": ("mala", "persistent", None),
    "persistent0": ("mala", "persistent", 0.0),
    "pt": ("mala", "parallel_tempering", None),
}


def fused_share(history: dict, last: int) -> float:
    """The share of the floors among the last ``last`` updates (``log_z_bound`` finite: the
    floor runs at every ``log_z_floor_every``-th update) at which the floor's importance
    estimate was fused with the tracked ``log Z``."""
    if "log_z_fused" not in history:
        return 0.0
    floors = np.isfinite(history["log_z_bound"][-last:])
    return float(np.mean(history["log_z_fused"][-last:][floors])) if floors.any() else 0.0


def mode_masses(energy, toy, num_points: int = 512, padding: float = 0.5) -> tuple[float, float]:
    """The normalised model's mass left and right of ``datasets.BIMODAL_SPLIT``, by midpoint
    quadrature on a ``num_points``² grid over the toy's box widened by ``padding`` per side."""
    bounds = ebm.logz.select.box(toy_bounds=toy.bounds, padding=padding)
    axes = [lo + (hi - lo) * (np.arange(num_points) + 0.5) / num_points for lo, hi in bounds]
    xs, ys = np.meshgrid(*axes, indexing="ij")
    grid = jnp.asarray(np.stack([xs.ravel(), ys.ravel()], axis=-1), jnp.float32)
    neg = np.asarray(jax.jit(jax.vmap(lambda x: -energy(x)))(grid), np.float64)
    w = np.exp(neg - neg.max())
    left = w[xs.ravel() < ebm.datasets.BIMODAL_SPLIT].sum() / w.sum()
    return float(left), float(1.0 - left)


def run(
    toy_name: str,
    steps: int,
    sampler: str,
    negatives: str,
    reinit: float | None,
    seed: int = 0,
    tempering: dict | None = None,
    log_z_particles: int | None = None,
    log_z_floor_every: int | None = None,
) -> dict:
    toy = ebm.datasets.toy(toy_name)
    k_data, k_energy, k_fit, k_test = jax.random.split(jax.random.key(seed), 4)
    data = toy.sample(k_data, 50_000)
    energy = ebm.energies.MLPEnergy(2, key=k_energy)
    start = time.perf_counter()
    extra = {} if reinit is None else {"reinit_fraction": reinit}
    if log_z_particles is not None:
        extra["log_z_particles"] = log_z_particles
    if log_z_floor_every is not None:
        extra["log_z_floor_every"] = log_z_floor_every
    label = negatives + ("" if reinit is None else f" (reinit {reinit:g})")
    if negatives == "parallel_tempering":
        t = tempering or {}
        ladders, temps = t.get("ladders", 128), t.get("temps", 8)
        rounds, gain = t.get("rounds", 20), t.get("gain", 0.1)
        negatives = ebm.negatives.ParallelTempering(
            num_chains=ladders, num_temperatures=temps, num_mcmc_steps=rounds, ladder_gain=gain
        )
        label = f"PT {ladders}×{temps}, {rounds} rounds, gain {gain:g}"
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
    h = res.history
    pt = {
        k: float(np.mean(np.asarray(h[k][-100:])))
        for k in ("barrier", "swap_acceptance_min", "round_trips")
        if k in h
    }
    return {
        "masses": mode_masses(res.energy, toy) if toy_name == "bimodal" else None,
        "pt": pt,
        "toy": toy_name,
        "sampler": sampler,
        "steps": steps,
        "negatives": label,
        "kl": out.kl,
        "kl_se": out.kl_stderr,
        "nll": out.test_nll,
        "nll_se": out.test_nll_stderr,
        "entropy": out.entropy,
        "log_z_error": res.log_z.value - out.log_z.value,
        "log_z_se": res.log_z.stderr,
        "fused": fused_share(h, 100),
        "nce_error": (res.log_z.info or {}).get("nce", np.nan) - out.log_z.value,
        "rejected": int(np.sum(~res.history["is_finite"].astype(bool))),
        "acc": float(np.mean(res.history["acceptance_rate"][-100:])),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toys", nargs="+", default=None, choices=ALL_TOYS)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", action="store_true")
    parser.add_argument("--tempering", action="store_true", help="issue 17 rows (see above)")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--ladders", type=int, default=128)
    parser.add_argument("--temps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--gain", type=float, default=0.1)
    parser.add_argument(
        "--log-z-particles", type=int, help="the tracker's particles (default: fit's, 512)"
    )
    parser.add_argument(
        "--log-z-floor-every", type=int, help="the tracker's floor every this many steps (1)"
    )
    args = parser.parse_args()
    if args.tempering:
        tempering(args)
        return
    args.toys = args.toys or list(TOYS)
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
        f"{jax.device_count()}× {jax.devices()[0].device_kind}, jax {jax.__version__}, "
        f"seed {args.seed}, tracker particles {args.log_z_particles or 512}, "
        f"floor every {args.log_z_floor_every or 1} steps"
    )
    header = (
        "| toy | sampler | negatives | steps | KL (nats) | test NLL | −H bound | "
        "tracked log Z − grid | NCE log Z − grid | rejected steps | acceptance | time (s) |"
    )
    print(header)
    print("|---" * 12 + "|")
    for toy_name in args.toys:
        for sampler, negatives, reinit in configs:
            r = run(
                toy_name, args.steps, sampler, negatives, reinit, args.seed,
                log_z_particles=args.log_z_particles, log_z_floor_every=args.log_z_floor_every,
            )  # fmt: skip
            print(
                f"| {r['toy']} | {r['sampler']} | {r['negatives']} | {r['steps']} | "
                f"{r['kl']:.4f} ± {r['kl_se']:.4f} | {r['nll']:.3f} ± {r['nll_se']:.3f} | "
                f"{r['entropy']:.3f} | {r['log_z_error']:+.4f} ± {r['log_z_se']:.4f} "
                f"(fused {r['fused']:.0%}) | "
                f"{r['nce_error']:+.4f} | {r['rejected']} | "
                f"{r['acc']:.2f} | {r['seconds']:.1f} |",
                flush=True,
            )


def tempering(args) -> None:
    settings = {"ladders": args.ladders, "temps": args.temps, "rounds": args.rounds}
    settings["gain"] = args.gain
    print(
        f"# toy_quality --tempering: {platform.processor() or platform.machine()}, "
        f"{jax.device_count()}× {jax.devices()[0].device_kind}, jax {jax.__version__}, "
        f"seed {args.seed}"
    )
    print(
        "| toy | negatives | steps | KL (nats) | test NLL | −H bound | acceptance | Λ | "
        "min swap acc. | round trips / ladder / step | time (s) | mass left / right |"
    )
    print("|---" * 12 + "|")
    for toy_name in args.toys or list(ALL_TOYS):
        for row in args.rows:
            sampler, negatives, reinit = ROWS[row]
            r = run(toy_name, args.steps, sampler, negatives, reinit, args.seed, settings)
            pt = r["pt"]
            cols = [f"{pt[k]:.3g}" if k in pt else "—" for k in ("barrier", "swap_acceptance_min")]
            cols.append(f"{pt['round_trips']:.4f}" if "round_trips" in pt else "—")
            masses = "—" if r["masses"] is None else "{:.3f} / {:.3f}".format(*r["masses"])
            print(
                f"| {r['toy']} | {r['negatives']} | {r['steps']} | "
                f"{r['kl']:.4f} ± {r['kl_se']:.4f} | {r['nll']:.3f} ± {r['nll_se']:.3f} | "
                f"{r['entropy']:.3f} | {r['acc']:.2f} | {' | '.join(cols)} | "
                f"{r['seconds']:.1f} | {masses} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
