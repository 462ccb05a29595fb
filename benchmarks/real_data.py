"""Real tables: the EBM with ``fit``'s defaults against what a user would pick instead.

    python benchmarks/real_data.py [--data wine breast_cancer iris digits] [--seeds 0 1]
                                   [--steps 2000] [--sweep] [--no-flows] [--no-baselines]
                                   [--no-defaults] [--settings JSON ...]
                                   [--digits-space {logit,box}] [--flows-noise]
                                   [--ais-temperatures 5000]
                                   [--ais-particles 256] [--out results.json]
    python benchmarks/real_data.py --load results.json more.json   # tables of earlier runs

Data (all offline): scikit-learn's wine (178 × 13), breast cancer (569 × 30) and iris
(150 × 4: the smallest, where memorising the training rows is easiest) through
``datasets.table`` (fixed 60/20/20 split), dequantized where recorded on a grid and
standardized (``tables.TableTransform``); digits (64-D) through ``datasets.digits`` (its test
split; the last 300 training images are the validation split), mapped off its (−1, 1)⁶⁴ box by
``bounded.logit_box`` and standardized (``--digits-space box``: on the box itself, as before
session 20).

Units: tables in nats per point in the ORIGINAL units (the dequantized values; the
standardization's log-Jacobian is added to every model's number); digits in nats per image in
``digits()``'s scaled space, the box (each point's log-Jacobian of the logit map and the
standardization added to every model's number), as in docs/benchmarks.md's other digits rows.

Models, all fitted on the same rows and chosen on the validation split: the baselines of
``baselines.py`` (full-covariance Gaussian, Gaussian mixture, KDE, flowjax MAF and RQ-spline
flows); the EBM with ``fit``'s defaults (``MLPEnergy`` with its default widths, best-model
selection on the validation split, no early stopping) and the command line's Gaussian noise
on the training rows and AdamW's weight decay (``tables.default_noise``: 0.1 in model
coordinates, ``tables.default_weight_decay``: 0.1, both below 100 training rows per column, as
on every data set here; ``--settings '{"noise": 0, "weight_decay": 0}'`` turns them off); with
``--sweep``, the best EBM of a small sweep (``energy_l2`` × widths, each stopped 500 steps
after its best held-out score).
The EBM's test log-likelihood uses ``log Z`` by AIS of the selected energy (its error bar
combines the test set's and AIS's standard errors; 5000 temperatures of 256 particles, 8 runs:
on breast cancer AIS with 200 temperatures, the rows before session 27, missed 4 to 6 nats of
the selected energies' mass, see docs/benchmarks.md), or, when it is higher, the 95% lower
bound of ``logz.data_bound`` (65 536 draws around the training rows; AIS misses wells there),
which makes the number an upper bound on the test log-likelihood (marked "bound ... (used)");
the tracked ``log Z`` it was selected with is printed beside it, and the ``energy_gap`` health
check of the run. A second table compares each EBM row with the baseline chosen on validation
and with the best one on test, paired on the same test points (per-point differences, whose
spread is far below the two rows' own standard errors when the models agree on which points
are hard; the AIS error of ``log Z`` added). ``--out`` keeps every row's per-point test
log-likelihoods, so ``--load`` can compare runs made in separate processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import platform
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import numpyro_ebm as ebm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from baselines import Row, fit_baselines, paired_difference

# the sweep's runs stop 500 steps after their best held-out score (only to save time: the
# selected energy is the same unless a later score would have been lower still)
SWEEP = [
    {"energy_l2": l2, "hidden": hidden, "patience": 500}
    for l2 in (1e-2, 1e-3, 1e-4)
    for hidden in ((64, 64), (256, 256))
]


@dataclasses.dataclass
class Split:
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    # per point, add to a model's log-density for the reported units
    validation_log_jacobian: np.ndarray
    test_log_jacobian: np.ndarray
    units: str
    # fresh dequantization noise for every training batch (fit's augment), or None
    augment: Callable | None = None


def load(name: str, seed: int, digits_space: str = "logit") -> Split:
    """The data set's splits in model coordinates (dequantization noise drawn from ``seed``:
    each seed is a new draw of it, the split itself is fixed)."""
    if name == "digits":
        return _digits(digits_space)
    table = ebm.datasets.table(name)
    transform = ebm.tables.TableTransform.fit(table.train)
    key = jax.random.fold_in(jax.random.key(seed), 3)  # ebm_row uses branches 0, 1, 2
    train, validation, test = (
        transform.to_model(rows, key=jax.random.fold_in(key, i))
        for i, rows in enumerate((table.train, table.validation, table.test))
    )
    jacobians = (np.full(len(points), transform.log_jacobian) for points in (validation, test))
    augment = transform.redequantizer() if transform.quantized.any() else None
    return Split(train, validation, test, *jacobians, "nats/point", augment)


def _digits(space: str) -> Split:
    """Digits in ``digits()``'s (−1, 1)⁶⁴ box (``"box"``), or mapped onto the real line by
    ``bounded.logit_box`` and standardized with the training rows' moments (``"logit"``);
    the reported units are the box's either way."""
    digits = ebm.datasets.digits()
    parts = digits.train[:-300], digits.train[-300:], digits.test
    if space == "box":
        return Split(*parts, np.zeros(300), np.zeros(len(digits.test)), "nats/image (scaled)")
    coordinates = ebm.bounded.BoxCoordinates.fit(
        parts[0], ebm.bounded.logit_box(-1.0, 1.0), grid=ebm.datasets.DIGITS_GRID
    )
    (train, _), (validation, validation_jac), (test, test_jac) = (
        coordinates.to_model(points) for points in parts
    )
    augment = coordinates.redequantizer()
    units = "nats/image (scaled; models on the logit map of the box, standardized)"
    return Split(train, validation, test, validation_jac, test_jac, units, augment)


def ebm_row(
    split: Split, *, seed: int, steps: int, label: str, fresh_noise: bool = True,
    ais: dict | None = None, **settings,
) -> Row:  # fmt: skip
    """``fit`` on ``split.train`` (validation for early stopping and selection), scored on
    test with AIS ``log Z``; ``settings`` override ``fit``'s defaults (``hidden`` is the
    energy's; ``weight_decay`` is AdamW's decay in the default optimizer, by default
    ``tables.default_weight_decay``'s; ``noise`` is the standard deviation of the Gaussian
    noise added, in model coordinates, to every training batch after its dequantization, by
    default ``tables.default_noise``'s: both as the command line does, ``tables.with_noise``);
    ``fresh_noise``: new dequantization noise for every batch (``split.augment``); ``ais``:
    ``logz.ais`` settings (``num_temperatures``, ``num_particles``) of the row's log Z, checked
    against a path a quarter as long (``logz.ais_convergence``)."""
    start = time.perf_counter()
    dim = split.train.shape[1]
    key = jax.random.key(seed)
    hidden = settings.pop("hidden", None)
    settings.setdefault("weight_decay", ebm.tables.default_weight_decay(*split.train.shape))
    noise = settings.pop("noise", ebm.tables.default_noise(*split.train.shape))
    width = {} if hidden is None else {"hidden": hidden}
    energy = ebm.energies.MLPEnergy(dim, key=jax.random.fold_in(key, 0), **width)
    result = ebm.fit(
        energy,
        split.train,
        key=jax.random.fold_in(key, 1),
        num_steps=steps,
        validation_data=split.validation,
        progress_bar=False,
        augment=ebm.tables.with_noise(split.augment if fresh_noise else None, noise),
        **settings,
    )
    # the row's log Z is AIS with the longer path; a quarter of it says whether it had converged
    ais = {"num_temperatures": 200, **(ais or {})}
    ais["num_temperatures"] = max(ais["num_temperatures"] // 4, 1)
    log_z = ebm.logz.ais_convergence(
        result.energy, (dim,), key=jax.random.fold_in(key, 2), data=split.train, factor=4, **ais
    )
    convergence = log_z.info["convergence"]
    # AIS misses wells at the training rows; the bound around them does not (logz.bound)
    near = ebm.logz.data_bound(result.energy, split.train, key=jax.random.fold_in(key, 4))
    floor = near.info["lower_bound"]
    used, used_se = (log_z.value, log_z.stderr) if log_z.value >= floor else (floor, 0.0)

    def log_likelihood(points):
        return -np.asarray(jax.vmap(result.energy)(jnp.asarray(points))) - used

    test = log_likelihood(split.test) + split.test_log_jacobian
    validation = log_likelihood(split.validation) + split.validation_log_jacobian
    test_se = math.sqrt(test.var(ddof=1) / len(test) + used_se**2)
    tracked = result.log_z
    gap = ebm.diagnostics.diagnose(result)["energy_gap"]
    chosen = (
        f"noise {noise}, weight decay {settings['weight_decay']}; step {result.best_step} of "
        f"{int(result.state.step)}; log Z AIS "
        f"{log_z.value:.2f} ± {log_z.stderr:.2f} "
        f"({convergence['num_temperatures'][0]} temperatures: "
        f"{convergence['shorter']:.2f}, runs' spread {convergence['spread']:.2f}: "
        f"{'converged' if convergence['converged'] else 'NOT CONVERGED'}"
        f"), bound {floor:.2f}{' (used)' if used == floor else ''}, tracked "
        f"{tracked.value:.2f} ± {tracked.stderr:.2f}; energy_gap {gap.value} {gap.status}"
    )
    return Row(
        model=label,
        test_ll=float(test.mean()),
        test_se=test_se,
        validation_ll=float(validation.mean()),
        chosen=chosen,
        seconds=time.perf_counter() - start,
        test_points=tuple(test.tolist()),
        log_z_se=float(used_se),
    )


def _no_baselines(*args, **kwargs) -> list[Row]:
    return []


def run(name: str, seed: int, args) -> list[Row]:
    split = load(name, seed, args.digits_space)
    rows = (fit_baselines if args.baselines else _no_baselines)(
        np.asarray(split.train, np.float64),
        np.asarray(split.validation, np.float64),
        np.asarray(split.test, np.float64),
        seed=seed,
        flows=args.flows,
        quick=args.quick,
        log_jacobian=(split.validation_log_jacobian, split.test_log_jacobian),
        # the flows as a user would train them; --flows-noise: with the EBM's Gaussian noise
        augment=ebm.tables.with_noise(
            split.augment if args.fresh_noise else None,
            ebm.tables.default_noise(*split.train.shape) if args.flows_noise else 0.0,
        ),
    )

    def row(label, **setting):
        return ebm_row(
            split,
            seed=seed,
            steps=args.steps,
            label=label,
            fresh_noise=args.fresh_noise,
            ais={"num_temperatures": args.ais_temperatures, "num_particles": args.ais_particles},
            **setting,
        )

    if args.defaults:
        rows.append(row("ebm (defaults)"))
    rows.extend(row(f"ebm {setting}", **setting) for setting in args.settings)
    if args.sweep:
        swept = [row("ebm (best of sweep)", **setting) for setting in SWEEP]
        best = max(swept, key=lambda row: row.validation_ll)
        setting = SWEEP[swept.index(best)]
        rows.append(dataclasses.replace(best, chosen=f"{setting}; {best.chosen}"))
    return rows


def print_table(name: str, units: str, by_seed: dict[int, list[Row]]) -> None:
    print(f"\n### {name} ({units}; seeds {sorted(by_seed)})\n")
    print("| model | test LL | ± test SE | seed sd | validation LL | chosen (first seed) | s |")
    print("|---|---|---|---|---|---|---|")
    first = by_seed[min(by_seed)]
    for i, row in enumerate(first):
        # the same row of every seed (``--load`` may merge files with other rows per seed)
        runs = [
            rows[i] for rows in by_seed.values() if i < len(rows) and rows[i].model == row.model
        ]
        test = np.array([r.test_ll for r in runs])
        sd = test.std(ddof=1) if len(test) > 1 else float("nan")
        print(
            f"| {row.model} | {test.mean():.2f} | {np.mean([r.test_se for r in runs]):.2f} | "
            f"{sd:.2f} | {np.mean([r.validation_ll for r in runs]):.2f} | {row.chosen} | "
            f"{np.mean([r.seconds for r in runs]):.0f} |"
        )
    print_paired(by_seed)


def print_paired(by_seed: dict[int, list[Row]]) -> None:
    """Each EBM row minus the baseline chosen on validation (as a user would choose) and minus
    the best baseline on test, paired on the test points (``baselines.paired_difference``),
    per seed."""
    lines = []
    for seed, rows in sorted(by_seed.items()):
        baselines = [r for r in rows if not r.model.startswith("ebm") and r.test_points]
        if not baselines:
            continue
        chosen = max(baselines, key=lambda r: r.validation_ll)
        best = max(baselines, key=lambda r: r.test_ll)
        for row in rows:
            if row.model.startswith("ebm") and row.test_points:
                (d1, se1), (d2, se2) = (paired_difference(row, b) for b in (chosen, best))
                lines.append(
                    f"| {row.model} | {seed} | {chosen.model} | {d1:+.2f} ± {se1:.2f} | "
                    f"{best.model} | {d2:+.2f} ± {se2:.2f} |"
                )
    if lines:
        print("\nPaired on the test points (± the paired standard error):\n")
        print(
            "| EBM row | seed | baseline chosen on validation | EBM − it | best baseline on "
            "test | EBM − it |"
        )
        print("|---|---|---|---|---|---|")
        print("\n".join(lines))


def loaded(paths: list[pathlib.Path]) -> dict[str, dict[int, list[Row]]]:
    """Rows of earlier ``--out`` files, merged by data set and seed in the order given (runs
    made in separate processes, compared on the same test points)."""
    merged: dict[str, dict[int, list[Row]]] = {}
    for path in paths:
        for name, by_seed in json.loads(path.read_text()).items():
            for seed, rows in by_seed.items():
                merged.setdefault(name, {}).setdefault(int(seed), []).extend(
                    Row(**{**row, "test_points": tuple(row.get("test_points", ()))}) for row in rows
                )
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = (*ebm.datasets.TABLE_NAMES, "digits")
    parser.add_argument("--data", nargs="+", default=list(names), choices=names)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--no-flows", dest="flows", action="store_false")
    parser.add_argument("--no-baselines", dest="baselines", action="store_false")
    parser.add_argument("--no-defaults", dest="defaults", action="store_false")
    parser.add_argument(
        "--settings",
        nargs="+",
        type=json.loads,
        default=[],
        metavar="JSON",
        help="an EBM row for each: fit settings over the defaults, e.g. '{\"energy_l2\": 1e-4}'",
    )
    parser.add_argument("--quick", action="store_true", help="small baselines sweep (smoke)")
    parser.add_argument(
        "--digits-space",
        choices=("logit", "box"),
        default="logit",
        help="digits: every model on the logit map of the (-1, 1) box (default), or on the box",
    )
    parser.add_argument(
        "--fixed-noise",
        dest="fresh_noise",
        action="store_false",
        help="train the EBM on one draw of the dequantization noise (before session 20)",
    )
    parser.add_argument(
        "--flows-noise",
        action="store_true",
        help="train the flows with the Gaussian noise the default EBM gets "
        "(tables.default_noise), not only fresh dequantization noise",
    )
    parser.add_argument(
        "--ais-temperatures",
        type=int,
        default=5000,
        help="AIS temperatures for the EBM rows' log Z (200 before session 27: too few on "
        "breast cancer)",
    )
    parser.add_argument("--ais-particles", type=int, default=256, help="AIS particles per run")
    parser.add_argument("--out", type=pathlib.Path)
    parser.add_argument(
        "--load",
        nargs="+",
        type=pathlib.Path,
        metavar="FILE",
        help="print the tables of earlier --out files (merged by data set and seed) and exit",
    )
    args = parser.parse_args()
    if args.load:
        for name, by_seed in loaded(args.load).items():
            print_table(name, load(name, min(by_seed), args.digits_space).units, by_seed)
        return
    print(
        f"# {platform.machine()} {platform.processor() or ''}, jax {jax.__version__} "
        f"({jax.default_backend()}), steps {args.steps}, seeds {args.seeds}"
    )
    results = {}
    for name in args.data:
        by_seed = {seed: run(name, seed, args) for seed in args.seeds}
        print_table(name, load(name, args.seeds[0], args.digits_space).units, by_seed)
        results[name] = {
            seed: [dataclasses.asdict(r) for r in rows] for seed, rows in by_seed.items()
        }
        if args.out:
            text = json.dumps(results, indent=1)  # all or nothing: a kill keeps the last file
            ebm._io.atomic_write(args.out, lambda f, text=text: f.write(text), mode="w")


if __name__ == "__main__":
    main()
