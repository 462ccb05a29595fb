"""Generator-based negatives (Kim & Bengio 2016) against MCMC on the 2-D toys.

    python benchmarks/generator_quality.py                       # all modes, three toys
    python benchmarks/generator_quality.py --toys 8gaussians --modes hybrid --steps 500
    python benchmarks/generator_quality.py --energies mlp deep --modes hybrid pcd
    python benchmarks/generator_quality.py --toys checkerboard --energies deep --modes hybrid pcd \
        --seeds 0 1 2                                             # across training seeds
    python benchmarks/generator_quality.py --modes hybrid --hybrid restart_fraction=0.1
                                          # a hybrid whose chains mostly persist (see below)
    python benchmarks/generator_quality.py --modes hybrid --hybrid resample=false num_mcmc_steps=40
    python benchmarks/generator_quality.py --toys checkerboard --energies deep --modes pcd \
        --chains 256 --steps 4000                                 # other fit settings
    python benchmarks/generator_quality.py --energies deep --modes hybrid pcd --deep-sigma 4
                                          # DeepEnergy's quadratic at the toys' scale

Modes (each trains a fresh energy, `MLPEnergy` (hidden 128×3) and/or `DeepEnergy` (Kim & Bengio's
product of experts, σ = 1 unless ``--deep-sigma``), with `fit`'s defaults otherwise: 2000 steps
(``--steps``), 1024 negatives per step (``--chains``), 20 MALA steps per update
(``--mcmc-steps``), `fit`'s learning rate (``--learning-rate``), batch 1024, 50 000 training
points):

* paper: `negatives="generator", entropy="batch_norm"`: the paper's method (deterministic
  generator with batch norm, entropy Σ ½ log(2πe γ²), one generator step then one energy step).
* improved: `negatives="generator", entropy="nearest_neighbour"`: a noisy generator with a
  k-nearest-neighbour entropy estimate of its output.
* hybrid: `negatives="hybrid"`: generator samples (improved entropy), importance-resampled
  towards the model, start 20 MALA steps; the refined samples are the negatives and also pull
  the generator (amortization). ``--hybrid NAME=VALUE ...`` changes fields of fit's
  ``negatives.Hybrid`` (all other settings fit's), e.g. ``restart_fraction=0.1``: each chain
  restarts from the generator's samples with probability 0.1 per step and otherwise continues
  from its last negative; ``resample=false``: no importance resampling.
* pcd: persistent MALA chains (the training issue's default), for reference.
* exact: a reference that no real data allows, the model's own draws (``GridNegatives``):
  every step, 1024 draws of the current model from a 128² grid over the KL's quadrature box
  (the cell drawn with its probability, the point uniform within it), then the 20 MALA steps,
  which leave the model invariant, smooth the cells away. Maximum likelihood with exact
  negatives: what any negative phase would give if it sampled the model exactly.

Columns: KL(data ‖ model) ± one standard error with grid-exact log Z (512² grid, 20 000 fresh
test points); wall time including compilation; energy-gradient evaluations (per-event gradients
of E, in x or θ, counted from the configuration: chains' initial and per-step gradients,
generator-loss backward passes, the diagnostic ∇ₓE at generator negatives, and the parameter
gradient's data and negative points; the hybrid's resampling adds 1024 energy evaluations per
step without a gradient); for the trained generator, the energy distance of 20 000
of its samples to 20 000 test points (lower is better, 0 when equal in distribution) and, on
8gaussians, its largest deviation from the true 1/8 share per mode (samples assigned to the
nearest centre); the far-field gap (``far_field_gap``): the lowest energy on rays beyond the
KL's quadrature box (out to 5 times its half-width) minus the lowest inside it. A negative gap
is a well the grid does not see: the model's mass lies outside the box and its KL is then
only a lower bound; the hybrid's resampling ESS: the mean over the run of the importance
weights' effective sample size as a fraction of the batch (NaN without resampling).

When both hybrid and pcd ran, a second table gives, per toy and energy, the paired difference
KL(hybrid) − KL(pcd) on the same test points with its standard error, and whether the hybrid is
no worse than persistent chains: difference ≤ 2 standard errors. When exact ran too, the same
table gives KL(hybrid) − KL(exact) and KL(pcd) − KL(exact): how far each is from maximum
likelihood with exact negatives (negative: better than it at this number of steps).

That standard error covers only the test points: it holds the trained models fixed. A method
comparison must also include the training randomness (data, initial weights, chains, generator):
two trainings of the same method with different seeds can differ by far more. With ``--seeds``
(two or more), every row is trained once per seed, the per-seed tables are printed as above, and
a last table gives, per toy and energy, the mean over seeds of the per-seed difference
KL(hybrid) − KL(pcd), its standard error across seeds (sample standard deviation / √seeds), the
per-seed differences, and the verdict across seeds: the hybrid is no worse when the mean
difference is ≤ 2 standard errors across seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    "exact": {"negatives": "grid"},  # GridNegatives over the toy's box (run builds it)
}
ENERGIES = {"mlp": ebm.energies.MLPEnergy, "deep": ebm.energies.DeepEnergy}
NUM_CHAINS, NUM_MCMC_STEPS, BATCH = 1024, 20, 1024


@dataclasses.dataclass(frozen=True)
class GridNegatives(ebm.negatives.ShortRun):
    """Exact negatives for a 2-D energy: ``num_chains`` draws of the current model from a
    ``cells``² grid over ``bounds`` (each cell with its probability under the model, the point
    uniform within it), then ``num_mcmc_steps`` of the kernel, which leave the model invariant
    and smooth the cells away. ``cells``² energy evaluations per step: a reference for the
    toys, not a method (the grid grows exponentially with the dimension)."""

    name = "grid"
    bounds: tuple = ((-8.0, 8.0), (-8.0, 8.0))
    cells: int = 128

    def sample(self, key, state, target):
        k_cell, k_jitter, k_chains = jax.random.split(key, 3)
        # the cells' midpoints, as the grid quadrature of the KL's log Z takes them
        mesh, axes, _ = ebm.logz.quadrature._mesh(self.bounds, self.cells)
        centres = jnp.asarray(mesh, jnp.float32)
        width = jnp.asarray([a[1] - a[0] for a in axes], jnp.float32)
        logits = -jax.vmap(target.energy)(centres)
        drawn = jax.random.categorical(k_cell, logits, shape=(self.num_chains,))
        jitter = jax.random.uniform(k_jitter, (self.num_chains, 2)) - 0.5
        starts = centres[drawn] + width * jitter
        run = self.run(k_chains, starts, target, state.step_size)
        new = state._replace(
            bank=run.finals, step_size=self.adapted(state.step_size, run.acceptance_rate, target)
        )
        info = ebm.negatives.NegativeInfo(
            run.acceptance_rate, state.step_size, run.langevin_grad_norm, {}, run.record
        )
        return new, run.finals, info


def gradient_evaluations(
    negatives: str, steps: int, num_chains: int = NUM_CHAINS, num_mcmc_steps: int = NUM_MCMC_STEPS
) -> int:
    """Per-event energy gradients over a run (see the module docstring)."""
    chains = num_chains * (1 + num_mcmc_steps)  # MALA: one gradient at the start, one per step
    parameter_gradient = BATCH + num_chains
    per_step = {
        "persistent": chains + parameter_gradient,
        "grid": chains + parameter_gradient,  # and the grid's 128² energies (no gradient)
        "generator": num_chains + num_chains + parameter_gradient,
        "hybrid": chains + num_chains + parameter_gradient,
    }[negatives]
    return per_step * steps


def mode_share_error(samples: np.ndarray) -> float:
    """Largest |share − 1/8| over the 8 modes of 8gaussians (nearest centre = nearest angle)."""
    angle = np.arctan2(samples[:, 1], samples[:, 0])
    mode = np.round(angle / (np.pi / 4)).astype(int) % 8
    shares = np.bincount(mode, minlength=8) / len(mode)
    return float(np.max(np.abs(shares - 1 / 8)))


def far_field_gap(energy, bounds, num_rays: int = 64, reach: float = 5.0) -> float:
    """Lowest energy beyond the KL's quadrature box minus the lowest inside it.

    The energy is evaluated on ``num_rays`` rays from the box's centre, from its edge out to
    ``reach`` times its half-width (400 points each), and on a 256² grid inside the box. A
    negative gap is a well outside the box that the grid's log Z does not see: the KL is then a
    lower bound (the model's mass is elsewhere)."""
    bounds = np.asarray(bounds, np.float64)
    centre, half = bounds.mean(axis=1), (bounds[:, 1] - bounds[:, 0]) / 2
    angles = np.linspace(0.0, 2 * np.pi, num_rays, endpoint=False)
    unit = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    edge = 1.0 / np.max(np.abs(unit) / half, axis=1)  # distance to the box's edge per ray
    t = np.linspace(1.0, reach, 400)
    outside = centre + (edge[:, None, None] * t[None, :, None]) * unit[:, None, :]
    grids = [np.linspace(lo, hi, 256) for lo, hi in bounds]
    inside = np.stack([g.ravel() for g in np.meshgrid(*grids)], axis=1)
    batched = jax.jit(jax.vmap(energy))
    e_out = np.asarray(batched(jnp.asarray(outside.reshape(-1, 2), jnp.float32)))
    e_in = np.asarray(batched(jnp.asarray(inside, jnp.float32)))
    return float(e_out.min() - e_in.min())


def mean_finite(values) -> float:
    """Mean of the finite values (NaN when there are none: no resampling ran)."""
    values = np.asarray([] if values is None else values, np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def hybrid_changes(pairs: list[str]) -> dict:
    """``["resample=false", "restart_fraction=0.1"]`` → ``{"resample": False, ...}``: each value
    is parsed as the type of the field's default in ``negatives.Hybrid``."""
    defaults = {f.name: f.default for f in dataclasses.fields(ebm.negatives.Hybrid)}
    changes = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in defaults or not value:
            raise SystemExit(f"--hybrid: expected NAME=VALUE with a Hybrid field, got {pair!r}")
        kind = type(defaults[name])
        booleans = {"true": True, "false": False}
        try:
            changes[name] = booleans[value.lower()] if kind is bool else kind(value)
        except (KeyError, ValueError):
            raise SystemExit(f"--hybrid: {name} takes a {kind.__name__}, got {value!r}") from None
    return changes


def run(
    toy_name: str, energy_name: str, mode: str, steps: int, seed: int = 0, hybrid=None, *,
    num_chains: int = NUM_CHAINS, num_mcmc_steps: int = NUM_MCMC_STEPS,
    learning_rate: float | None = None, deep_sigma: float | None = None,
) -> dict:  # fmt: skip
    """Train one row and score it; ``learning_rate`` None: ``fit``'s default; ``deep_sigma``:
    ``DeepEnergy``'s ``sigma`` (None: its default)."""
    toy = ebm.datasets.toy(toy_name)
    k_data, k_energy, k_fit, k_test, k_gen, k_ref = jax.random.split(jax.random.key(seed), 6)
    data = toy.sample(k_data, 50_000)
    given = energy_name == "deep" and deep_sigma is not None
    energy = ENERGIES[energy_name](2, key=k_energy, **({"sigma": deep_sigma} if given else {}))
    options = MODES[mode]
    kind = options["negatives"]
    if mode == "hybrid" and hybrid:  # fit's hybrid, with only those settings changed
        resolved = ebm.TrainConfig(
            num_chains=num_chains, num_mcmc_steps=num_mcmc_steps, batch_size=BATCH, negatives=kind
        ).resolve(steps)
        options = {"negatives": resolved.negatives.replace(**hybrid)}
    if mode == "exact":
        box = ebm.logz.select.box(toy_bounds=toy.bounds, padding=0.5)
        grid = GridNegatives(
            num_chains=num_chains,
            num_mcmc_steps=num_mcmc_steps,
            bounds=tuple(tuple(float(v) for v in side) for side in box),
        )
        options = {"negatives": grid}
    rate = {} if learning_rate is None else {"learning_rate": learning_rate}
    start = time.perf_counter()
    res = ebm.fit(
        energy,
        data,
        key=k_fit,
        num_steps=steps,
        num_chains=num_chains,
        num_mcmc_steps=num_mcmc_steps,
        batch_size=BATCH,
        progress_bar=False,
        **rate,
        **options,
    )
    jax.block_until_ready(res.energy)
    seconds = time.perf_counter() - start
    out = ebm.evaluate.kl_to_toy(res.energy, toy, key=k_test)
    test_points = toy.sample(k_test, 20_000)  # the points kl_to_toy used (same key)
    log_p = -np.asarray(jax.jit(jax.vmap(res.energy))(test_points), np.float64) - out.log_z.value
    row = {
        "toy": toy_name,
        "energy": energy_name,
        "mode": mode,
        "log_p": log_p,
        "steps": steps,
        "kl": out.kl,
        "kl_se": out.kl_stderr,
        "seconds": seconds,
        "grads": gradient_evaluations(kind, steps, num_chains, num_mcmc_steps),
        "rejected": int(np.sum(~res.history["is_finite"].astype(bool))),
        # the box kl_to_toy integrates over (its default: the toy's bounds, padding 0.5)
        "far": far_field_gap(res.energy, ebm.logz.select.box(toy_bounds=toy.bounds, padding=0.5)),
        "gen_ed": float("nan"),
        "share": float("nan"),
        # the hybrid's resampling: mean effective sample size (fraction of the batch) over the run
        "ess": mean_finite(res.history.get("resampling_ess")),
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


def paired_difference(first: dict, second: dict) -> tuple[float, float]:
    """KL(first) − KL(second) of two rows and 2 standard errors over the same test points (one
    training each).

    KL(a) − KL(b) = mean(log p_b − log p_a) over the test points: paired."""
    difference = second["log_p"] - first["log_p"]
    return float(difference.mean()), float(2 * difference.std(ddof=1) / np.sqrt(difference.size))


def across_seeds(differences: list[float]) -> tuple[float, float]:
    """Mean of the per-seed differences and 2 standard errors across seeds (training included)."""
    values = np.asarray(differences, np.float64)
    return float(values.mean()), float(2 * values.std(ddof=1) / np.sqrt(values.size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toys", nargs="+", default=list(TOYS), choices=TOYS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--energies", nargs="+", default=["mlp"], choices=list(ENERGIES))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--chains", type=int, default=NUM_CHAINS, help="negatives per step")
    parser.add_argument("--mcmc-steps", type=int, default=NUM_MCMC_STEPS)
    parser.add_argument("--learning-rate", type=float, help="peak learning rate (default: fit's)")
    parser.add_argument(
        "--deep-sigma",
        type=float,
        help="DeepEnergy's sigma, the scale of its quadratic (default: DeepEnergy's)",
    )
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0)
    seeds.add_argument(
        "--seeds", type=int, nargs="+", help="train every row once per seed (two or more)"
    )
    parser.add_argument(
        "--hybrid",
        nargs="+",
        default=[],
        metavar="NAME=VALUE",
        help="change fields of fit's negatives.Hybrid, e.g. restart_fraction=0.1 resample=false",
    )
    args = parser.parse_args()
    hybrid = hybrid_changes(args.hybrid)
    seed_list = args.seeds or [args.seed]
    if len(set(seed_list)) != len(seed_list):
        parser.error(f"--seeds must be distinct, got {seed_list}")
    several = len(seed_list) > 1
    rate = "fit default" if args.learning_rate is None else args.learning_rate
    print(
        f"# generator_quality: {platform.processor() or platform.machine()}, "
        f"{jax.device_count()}× {jax.devices()[0].device_kind}, jax {jax.__version__}; "
        f"hybrid changes {hybrid or 'none'}; {args.chains} chains, {args.mcmc_steps} MCMC "
        f"steps, learning rate {rate}; DeepEnergy sigma {args.deep_sigma or 'default'}"
    )
    seed_column = "seed | " if several else ""
    print(
        f"| toy | energy | mode | {seed_column}steps | KL (nats) | time (s) | "
        "energy-gradient evals | rejected steps | generator energy distance | "
        "generator max share error | far-field gap | resampling ESS |"
    )
    print("|---" * (12 + several) + "|")
    rows = {}
    for seed in seed_list:
        for toy_name in args.toys:
            for energy_name in args.energies:
                for mode in args.modes:
                    r = run(
                        toy_name, energy_name, mode, args.steps, seed, hybrid,
                        num_chains=args.chains, num_mcmc_steps=args.mcmc_steps,
                        learning_rate=args.learning_rate, deep_sigma=args.deep_sigma,
                    )  # fmt: skip
                    rows[toy_name, energy_name, mode, seed] = r
                    seed_cell = f"{seed} | " if several else ""
                    print(
                        f"| {r['toy']} | {r['energy']} | {r['mode']} | {seed_cell}{r['steps']} | "
                        f"{r['kl']:.4f} ± {r['kl_se']:.4f} | {r['seconds']:.1f} | "
                        f"{r['grads'] / 1e6:.1f} M | {r['rejected']} | {r['gen_ed']:.4f} | "
                        f"{r['share']:.3f} | {r['far']:+.1f} | {r['ess']:.3f} |",
                        flush=True,
                    )
    for first, second in (("hybrid", "pcd"), ("hybrid", "exact"), ("pcd", "exact")):
        if {first, second} <= set(args.modes):
            compare(rows, first, second, args.toys, args.energies, seed_list)


def compare(rows: dict, first: str, second: str, toys, energies, seed_list) -> None:
    """Print KL(first) − KL(second) per toy, energy and seed (paired on the test points), and
    across seeds when there are several."""
    several = len(seed_list) > 1
    seed_column = "seed | " if several else ""
    print(
        f"\n| toy | energy | {seed_column}KL({first}) − KL({second}) | 2 SE (test points) | "
        f"{first} no worse |"
    )
    print("|---" * (5 + several) + "|")
    differences = {}
    for toy_name in toys:
        for energy_name in energies:
            for seed in seed_list:
                mean, two_se = paired_difference(
                    rows[toy_name, energy_name, first, seed],
                    rows[toy_name, energy_name, second, seed],
                )
                differences.setdefault((toy_name, energy_name), []).append(mean)
                seed_cell = f"{seed} | " if several else ""
                print(
                    f"| {toy_name} | {energy_name} | {seed_cell}{mean:+.4f} | {two_se:.4f} | "
                    f"{'yes' if mean <= two_se else 'NO'} |",
                    flush=True,
                )
    if not several:
        return
    print(
        f"\nAcross {len(seed_list)} training seeds {seed_list}: mean of the per-seed "
        "differences, 2 standard errors across seeds."
    )
    print(
        f"\n| toy | energy | mean KL({first}) − KL({second}) | 2 SE (seeds) | "
        f"per-seed differences | {first} no worse |"
    )
    print("|---" * 6 + "|")
    for (toy_name, energy_name), values in differences.items():
        mean, two_se = across_seeds(values)
        listed = ", ".join(f"{v:+.4f}" for v in values)
        print(
            f"| {toy_name} | {energy_name} | {mean:+.4f} | {two_se:.4f} | {listed} | "
            f"{'yes' if mean <= two_se else 'NO'} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
