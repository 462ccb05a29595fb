"""The commands ``train``, ``evaluate``, ``sample``, ``report`` and ``demo``: each takes the
parsed options, checks what is left to check before any computation, and returns an exit code.

``main`` (in ``numpyro_ebm.cli``) turns their exceptions into messages and exit codes.

Example:
    >>> from numpyro_ebm.cli.parser import make_parser
    >>> args = make_parser().parse_args(["evaluate", "runs/rings"])
    >>> evaluate_command(args)    # prints the held-out table, updates runs/rings/metrics.json
    0
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import numpyro_ebm as ebm
from numpyro_ebm import _io, datasets, diagnostics, evaluate, logz, plots, samplers
from numpyro_ebm.cli._common import (
    CHECKPOINT_DIR,
    DENSITY_FILE,
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    KEY_DEQUANTIZE,
    KEY_ENERGY,
    KEY_FIT,
    KEY_KL,
    KEY_LAG,
    KEY_LOG_Z,
    METRICS_FILE,
    MIN_HELDOUT_ROWS,
    REPORT_FILE,
    RUN_FILE,
    UsageError,
    write_json,
)
from numpyro_ebm.cli.data_files import Data, file_to_model, prepare, read_points
from numpyro_ebm.cli.parser import check_positive, check_seed, given_settings, train_config
from numpyro_ebm.cli.run_folder import (
    check_output_file,
    check_report_file,
    check_settings,
    check_writable,
    checkpoint_step,
    diverged_message,
    existing_run,
    load_run,
    locked,
    make_folders,
    new_run,
    remove_created,
    started,
    stopped_early,
    update_metrics,
    writing,
)
from numpyro_ebm.training import TrainingDivergedError


def _energy(config: dict, dim: int):
    """The run's energy before training (``fit`` starts from it; ``load`` reads into it)."""
    key = jax.random.fold_in(jax.random.key(config["seed"]), KEY_ENERGY)
    return ebm.energies.MLPEnergy(dim, hidden=tuple(config["hidden"]), key=key)


def _fit(config: dict, data: Data, folder: str, *, progress_bar=False, checkpoint_every=None):
    """``fit`` with the run's settings and checkpoints: trains, or resumes."""
    key = jax.random.key(config["seed"])
    energy = _energy(config, data.train.shape[1])
    every = min(checkpoint_every or config["steps"], config["steps"])  # not part of the config
    return ebm.fit(
        energy,
        data.train,
        key=jax.random.fold_in(key, KEY_FIT),
        num_steps=config["steps"],
        sampler=config["sampler"],
        negatives=config["negatives"],
        objective=config.get("objective", "ml"),  # runs from before --objective: "ml"
        num_chains=config["chains"],
        num_mcmc_steps=config["mcmc_steps"],
        batch_size=config["batch_size"],
        learning_rate=config["learning_rate"],
        weight_decay=config.get("weight_decay", 0.0),  # runs from before --weight-decay: none
        progress_bar=progress_bar,
        checkpoint_dir=os.path.join(folder, CHECKPOINT_DIR),
        checkpoint_every=every,
        steps_per_call=every,
        validation_data=data.validation,
        patience=config.get("patience"),  # runs from before --patience: None
        augment=ebm.tables.with_noise(
            data.redequantizer() if config["data"].get("fresh_noise") else None,
            config.get("noise", 0.0),  # runs from before --noise: none
        ),
    )


def _restore(folder: str) -> tuple[dict, Data, ebm.FitResult]:
    """A finished run as ``(run.json, its data, its FitResult)``, loaded from its checkpoint
    (``ebm.load``: nothing is computed)."""
    run, points = load_run(folder)
    data = prepare(run["config"], points, run["standardization"])
    energy = _energy(run["config"], data.train.shape[1])
    return run, data, ebm.load(os.path.join(folder, CHECKPOINT_DIR), energy=energy)


def fit_result(folder: str) -> ebm.FitResult:
    """The ``FitResult`` of a finished ``numpyro-ebm train`` run folder (``ebm.load``)."""
    return _restore(folder)[2]


# -- evaluation --------------------------------------------------------------------------------


def _check_log_z_method(method: str, dim: int) -> None:
    if method == "grid" and dim > logz.select.GRID_MAX_DIMS:
        raise UsageError(
            "--log-z", f"grid quadrature works in up to 3 dimensions, the run has {dim}; use ais"
        )


def _log_z(res, data: Data, method: str, key) -> logz.LogZEstimate:
    """``log Z`` of the run's energy as ``--log-z`` says (``logz.select``: the library's one
    rule for which estimator over which box)."""
    return logz.select.estimate(
        res.energy,
        res.event_shape,
        method=method,
        data=data.train,
        bounds=None if data.toy is None else data.toy.bounds,
        key=key,
        learned=res.log_z,
    )


def _heldout(res, data: Data, points_model: np.ndarray, log_z: logz.LogZEstimate) -> dict:
    """Held-out log-likelihood per point in the original units, with what it used."""
    log_jacobian = data.log_jacobian_at(points_model)
    # a grid whose box misses mass gives log Z an infinite error: the score is shown with it,
    # and with the warning row (evaluate.log_likelihood itself refuses such a log Z)
    missed = math.isinf(log_z.stderr)
    usable = log_z.value if missed else log_z
    ll = evaluate.log_likelihood(res.energy, points_model, usable, log_jacobian=log_jacobian)
    return {
        "num_points": len(points_model),
        "log_likelihood": ll.value,
        "stderr": math.inf if missed else ll.stderr,
        "units": data.units,
        "log_z": log_z.value,
        "log_z_stderr": log_z.stderr,
        "log_z_method": log_z.method,
        "log_z_info": {
            **({} if log_z.ess is None else {"ess": log_z.ess}),
            **{k: v for k, v in (log_z.info or {}).items() if k == "bounds" or np.ndim(v) == 0},
        },
        "log_jacobian": float(np.mean(log_jacobian)),
        **({"log_cell_volume": data.log_cell_volume} if data.dequantizes else {}),
    }


def _run_key(config: dict, purpose: int, seed: int | None = None):
    base = jax.random.key(config["seed"] if seed is None else seed)
    return jax.random.fold_in(base, purpose)


def _kl(res, data: Data, key) -> dict:
    kl = evaluate.kl_to_toy(res.energy, data.toy, key=key)
    return {
        "kl": kl.kl,
        "kl_stderr": kl.kl_stderr,
        "test_nll": kl.test_nll,
        "test_nll_stderr": kl.test_nll_stderr,
        "entropy": kl.entropy,
        "log_z": kl.log_z.value,
        "log_z_method": kl.log_z.method,
    }


def _print_table(rows) -> None:
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def _split_name(config: dict, data: Data) -> str:
    if config["data"]["name"] != "digits":
        return "validation split"
    if data.test is None:  # a run made before digits had a validation split
        return "digits test split (also used to select the kept step)"
    return "digits test split"


def _heldout_rows(entry: dict, what: str) -> list[tuple[str, str]]:
    log_z = f"{entry['log_z']:.4f}"
    if entry["log_z_stderr"] is not None and math.isfinite(entry["log_z_stderr"]):
        log_z += f" ± {entry['log_z_stderr']:.2g}"
    rows = [
        ("held-out data", f"{what} ({entry['num_points']} points)"),
        (f"log Z ({entry['log_z_method']})", log_z),
        (
            f"log-likelihood ({entry['units']} units)",
            f"{entry['log_likelihood']:.4f} ± {entry['stderr']:.4f} nats per point",
        ),
    ]
    if "log_cell_volume" in entry:
        bound = entry["log_likelihood"] + entry["log_cell_volume"]
        rows.append(("log P(recorded values) ≥", f"{bound:.4f} nats per point"))
    if entry["log_z_info"].get("outer_shell_mass", 0.0) > logz.select.GRID_EDGE_MASS:
        rows.append(("warning", "the model's mass reaches the grid's edge: try --log-z ais"))
    return rows


# -- commands ----------------------------------------------------------------------------------


def train_command(args: argparse.Namespace, argv: list[str]) -> int:
    config, points, path = train_config(args)
    check_settings(args.out, existing_run(args.out), config, given=given_settings(args))
    created = make_folders(args.out)
    before = set(os.listdir(args.out))
    # a FolderLockedError leaves even a folder created here: the holder writes into it now
    advice = "copy the run folder somewhere you can write, or train into another --out"
    with locked(args.out, advice, created):
        return _train_locked(args, argv, config, points, path, created, before)


def _train_locked(args, argv, config, points, path, created: list[str], before: set) -> int:
    """``train`` while this process holds ``--out``'s lock. What an error path removes is only
    what this invocation created, and only while the run has no checkpoint."""
    out = args.out
    existing = existing_run(out)  # again: another writer may have finished meanwhile
    config = check_settings(out, existing, config, given=given_settings(args))
    if existing is not None and existing.get("diverged") is not None:
        print(diverged_message(out, existing["diverged"]["step"]), file=sys.stderr)
        return EXIT_DIVERGED
    start_step = checkpoint_step(out)

    def discard_unstarted():
        if existing is None and not started(out):
            new = [os.path.join(out, name) for name in os.listdir(out) if name not in before]
            remove_created(created, [] if created else new)

    # all checks done: compute from here on
    run = existing
    try:
        data = prepare(config, points, existing and existing["standardization"])
        _check_log_z_method(args.log_z, data.train.shape[1])
        if existing is None:
            run = new_run(config, data, argv, path)
            write_json(os.path.join(out, RUN_FILE), run)
        _announce(out, config, data, _source(run, config), start_step)
        start = time.perf_counter()
        res = _fit(
            config,
            data,
            out,
            progress_bar=not args.quiet,
            checkpoint_every=args.checkpoint_every,
        )
    except KeyboardInterrupt:
        return _interrupted(out, discard_unstarted)
    except TrainingDivergedError as err:
        step = int(err.state.step)
        write_json(os.path.join(out, RUN_FILE), {**run, "diverged": {"step": step}})
        print(diverged_message(out, step), file=sys.stderr)
        return EXIT_DIVERGED
    except BaseException as err:
        discard_unstarted()
        if isinstance(err, ValueError) and not isinstance(err, ebm.CheckpointError):
            raise UsageError(out, f"{err}; change the settings") from err
        raise
    return _finish_training(args, config, data, run, res, time.perf_counter() - start)


def _source(run: dict, config: dict) -> str:
    """The run's data as the user named it: the file's path or the built-in's name."""
    return run["data_path"] or config["data"]["name"]


def _announce(out: str, config: dict, data: Data, source: str, start_step: int | None) -> None:
    """Say whether ``train`` starts, resumes or only recomputes the metrics of a run."""
    if start_step and start_step >= config["steps"]:
        print(f"{out} is trained already ({start_step} steps): recomputing its metrics")
    elif start_step and stopped_early(out, config, start_step):
        print(
            f"{out} is trained already (stopped early at step {start_step}: --patience "
            f"{config['patience']}): recomputing its metrics"
        )
    elif start_step:
        print(f"Resuming {out} from step {start_step} of {config['steps']}")
    else:
        print(
            f"Training an MLP energy on {source} ({len(data.train)} points, "
            f"{len(data.validation)} held out) for {config['steps']} steps -> {out}"
        )


def _interrupted(out: str, discard_unstarted) -> int:
    """Ctrl-C during ``train``: drop an unstarted run and say where to resume from."""
    try:
        step = checkpoint_step(out)
    except ebm.CheckpointError:
        step = None
    discard_unstarted()
    if step is None:
        print("numpyro-ebm: interrupted before the first checkpoint", file=sys.stderr)
    else:
        print(
            f"numpyro-ebm: interrupted; the last checkpoint is at step {step}: run the "
            "same command again to resume from it",
            file=sys.stderr,
        )
    return EXIT_INTERRUPTED


def _finish_training(args, config: dict, data: Data, run: dict, res, seconds: float) -> int:
    """After ``fit``: the held-out metrics (and KL on a toy), their table, report and plot."""
    out = args.out
    step = int(res.state.step)
    log_z = _log_z(res, data, args.log_z, _run_key(config, KEY_LOG_Z))
    split, points = data.heldout
    entry = _heldout(res, data, points, log_z)
    updates = {"heldout": {split: {log_z.method: entry}}}
    if data.toy is not None:
        updates["kl_to_toy"] = _kl(res, data, _run_key(config, KEY_KL))
    update_metrics(out, step, updates)
    print()
    _print_table(_training_rows(config, data, run, res, entry, updates, seconds))
    print(f"\nwrote {os.path.join(out, METRICS_FILE)}")
    report, density = os.path.join(out, REPORT_FILE), os.path.join(out, DENSITY_FILE)
    if not args.no_report:
        _write_or_warn(REPORT_FILE, lambda: _write_report(res, data, config, report))
        if data.train.shape[1] == 2:
            _write_or_warn(DENSITY_FILE, lambda: _density_plot(res, data, density))
    return EXIT_OK


def _training_rows(config, data: Data, run, res, entry, updates, seconds) -> list:
    """The rows of the table ``train`` prints."""
    history = res.history
    standardized = "standardized" if data.mean is not None else "as is"
    if data.box is not None:
        standardized = "off its box by the logit map, standardized, new noise every step"
    if data.dequantizes:
        gridded = int(np.sum(data.quantum > 0))
        standardized = f"{gridded} gridded column(s) dequantized, {standardized}"
    steps = f"{int(res.state.step)}"
    if int(res.state.step) < config["steps"]:
        steps += f" of {config['steps']} (stopped early: --patience {config['patience']})"
    rows = [
        ("data", f"{_source(run, config)} ({standardized})"),
        ("steps", steps),
        *(() if res.best_step is None else [("kept parameters of step", str(res.best_step))]),
        *_heldout_rows(entry, _split_name(config, data)),
    ]
    if data.toy is not None:
        kl = updates["kl_to_toy"]
        rows.append(("KL(toy ‖ model) (nats)", f"{kl['kl']:.4f} ± {kl['kl_stderr']:.4f}"))
    rows += [
        ("rejected non-finite steps", str(int(np.sum(~history["is_finite"].astype(bool))))),
        (
            "final acceptance / step size",
            f"{history['acceptance_rate'][-1]:.3f} / {history['step_size'][-1]:.4g}",
        ),
        ("this session's time (s)", f"{seconds:.1f}"),
    ]
    return rows


def _write_or_warn(name: str, write) -> None:
    """Write a figure or report after training; a numerical failure in drawing it (e.g. a
    singular matrix from extreme data) is a warning: the trained run and its metrics stay."""
    try:
        print(f"wrote {write()}")
    except (ValueError, FloatingPointError, np.linalg.LinAlgError) as err:
        print(
            f"numpyro-ebm: warning: {name} skipped ({' '.join(str(err).split())}); the run and "
            "its metrics are saved",
            file=sys.stderr,
        )


def _write_report(res, data: Data, config: dict, path: str) -> str:
    coordinates = ", standardized coordinates" if data.mean is not None else ""
    if data.box is not None:
        coordinates = ", standardized logit coordinates"
    title = (
        f"numpyro-ebm run on {config['data']['name']}: {res.config.objective.name} objective, "
        f"{res.config.negatives_name} negatives, {config['sampler']}{coordinates}"
    )
    key = _run_key(config, KEY_KL) if data.toy is not None else None
    lag_key = _run_key(config, KEY_LAG)
    return diagnostics.report(
        res, path, data=data.train, toy=data.toy, key=key, title=title, lag_key=lag_key
    )


def _density_plot(res, data: Data, path: str) -> str:
    """The learned density (in original units) next to the data and the final chains."""
    if data.toy is not None:
        plots.save_density_plot(path, res.energy, data.toy, res.chains)
        return path
    energy = res.energy
    if data.mean is not None:
        mean, std = jnp.asarray(data.mean, jnp.float32), jnp.asarray(data.std, jnp.float32)

        def energy(x):
            return res.energy((x - mean) / std)

    points = data.to_original(data.train)
    figure = plots.density_figure(
        energy, points, samples=data.to_original(res.chains), bounds=_plot_box(points)
    )
    return plots.save_figure(figure, path)


def _plot_box(points: np.ndarray) -> np.ndarray:
    """``(d, 2)`` box of the bulk of ``points``: the 0.5%–99.5% quantiles plus 15% on each side,
    so that a few outliers (1e20 among unit-scale data) do not squeeze the data into a pixel."""
    low, high = np.quantile(np.asarray(points, np.float64), [0.005, 0.995], axis=0)
    pad = 0.15 * np.where(high > low, high - low, np.maximum(np.abs(high), 1.0))
    return np.stack([low - pad, high + pad], axis=1)


def evaluate_command(args: argparse.Namespace) -> int:
    check_seed(args)
    run, points = load_run(args.dir)
    config = run["config"]
    dim = run["event_shape"][0]
    _check_log_z_method(args.log_z, dim)
    extra = None
    if args.data is not None:
        extra, _ = read_points(args.data, config["data"].get("columns"), wanted_by="the run")
        if extra.shape[1] != dim:
            names = config["data"].get("columns")
            raise UsageError(
                args.data,
                f"has {extra.shape[1]} columns, the run was trained on {dim}"
                + (f" ({', '.join(names)})" if names else "")
                + "; pass data with the same columns",
            )
        if len(extra) < MIN_HELDOUT_ROWS:
            raise UsageError(
                args.data, "has fewer than 2 rows; pass at least 2 (for a standard error)"
            )
    with locked(args.dir, "copy the run folder somewhere you can write and evaluate the copy"):
        return _evaluate_locked(args, run, points, extra)


def _evaluate_locked(args: argparse.Namespace, run: dict, points, extra) -> int:
    config = run["config"]
    data = prepare(config, points, run["standardization"])
    energy = _energy(config, data.train.shape[1])
    res = ebm.load(os.path.join(args.dir, CHECKPOINT_DIR), energy=energy)
    if extra is None:
        (name, points_model), what = data.heldout, _split_name(config, data)
    else:  # checked before log Z is computed
        name = what = os.path.abspath(args.data)
        names = config["data"].get("columns")
        key = _run_key(config, KEY_DEQUANTIZE, args.seed)
        points_model = file_to_model(data, extra, names, args.data, key=key)
    log_z = _log_z(res, data, args.log_z, _run_key(config, KEY_LOG_Z, args.seed))
    entry = _heldout(res, data, points_model, log_z)
    updates = {"heldout": {name: {log_z.method: entry}}}
    rows = [("run", f"{args.dir} (step {int(res.state.step)})"), *_heldout_rows(entry, what)]
    if data.toy is not None and extra is None:
        kl = updates["kl_to_toy"] = _kl(res, data, _run_key(config, KEY_KL, args.seed))
        rows.append(("KL(toy ‖ model) (nats)", f"{kl['kl']:.4f} ± {kl['kl_stderr']:.4f}"))
    update_metrics(args.dir, int(res.state.step), updates)
    _print_table(rows)
    print(f"\nwrote {os.path.join(args.dir, METRICS_FILE)}")
    return EXIT_OK


def sample_command(args: argparse.Namespace) -> int:
    check_positive(args, "num", "mcmc_steps")
    check_seed(args)
    if not args.out.endswith(".npy"):
        raise UsageError("--out", f"{args.out!r} does not end in .npy; e.g. --out samples.npy")
    check_output_file(args.out, "samples.npy")
    _, data, res = _restore(args.dir)
    model = ebm.EnergyDistribution(
        res.energy,
        res.event_shape,
        sampler=getattr(res.config.negatives, "sampler", res.config.sampler),
        draws=samplers.DrawSettings(num_warmup=args.mcmc_steps),
        initializer=res.generator,
    )
    draws = model.sample(jax.random.key(args.seed), (args.num,))
    draws = data.to_original(draws, on_grid=True)  # gridded columns back on their grid
    _io.atomic_write(args.out, lambda f: np.save(f, draws))
    print(
        f"wrote {args.num} samples ({args.mcmc_steps} MCMC warm-up steps per chain; "
        f"approximate) to {args.out}"
    )
    return EXIT_OK


def report_command(args: argparse.Namespace) -> int:
    path = args.out or os.path.join(args.dir, REPORT_FILE)
    if os.path.splitext(path)[1].lower() not in (".html", ".md"):
        raise UsageError("--out", f"{path!r} must end in .html or .md; e.g. --out report.md")
    advice = "pick another --out" if args.out else "pass --out to write the report elsewhere"
    if args.out is not None:
        check_report_file(path)
    elif os.path.isdir(args.dir):
        check_writable(args.dir, args.dir, "the run folder ", advice)
    run, data, res = _restore(args.dir)
    with writing(os.path.dirname(os.path.abspath(path)), path, advice):
        print(f"wrote {_write_report(res, data, run['config'], path)}")
    return EXIT_OK


def demo_command(args: argparse.Namespace) -> int:
    check_positive(args, "steps", "num_data")
    check_seed(args)
    if args.num_data < 2:
        raise UsageError("--num-data", f"must be at least 2, got {args.num_data}; e.g. 2000")
    if os.path.lexists(args.out) and not os.path.isdir(args.out):
        raise UsageError("--out", f"{args.out} is a file; pass a folder for the plot")
    created = make_folders(args.out)
    try:
        code = _demo_run(args)
    except BaseException:
        remove_created(created, [])
        raise
    if code != EXIT_OK:
        remove_created(created, [])
    return code


def _demo_run(args: argparse.Namespace) -> int:
    toy = datasets.toy(args.toy)
    key = jax.random.key(args.seed)
    k_data, k_energy, k_fit, k_test = jax.random.split(key, 4)
    data = toy.sample(k_data, args.num_data)
    energy = ebm.energies.MLPEnergy(2, key=k_energy)
    print(f"Training an MLP energy on {args.toy} ({args.num_data} points, {args.steps} steps)")
    start = time.perf_counter()
    try:
        res = ebm.fit(energy, data, key=k_fit, num_steps=args.steps, progress_bar=not args.quiet)
    except TrainingDivergedError as err:
        print(
            f"numpyro-ebm: error: demo: training diverged at step {int(err.state.step)} "
            "(non-finite energies or gradients many steps in a row); try another --seed or "
            "more --num-data",
            file=sys.stderr,
        )
        return EXIT_DIVERGED
    seconds = time.perf_counter() - start
    result = evaluate.kl_to_toy(res.energy, toy, key=k_test)
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
    print()
    _print_table(rows)
    path = os.path.join(args.out, f"{args.toy}_density.png")
    plots.save_density_plot(path, res.energy, toy, res.chains, log_z=result.log_z.value)
    print(f"\nwrote {path}")
    return EXIT_OK
