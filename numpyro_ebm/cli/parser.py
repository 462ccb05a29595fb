"""The command line: the ``argparse`` parser (one small function per command) and the checks
of the option values that need no data, ending in ``train_config``, the run's settings.

Example:
    >>> args = make_parser().parse_args(["train", "--data", "rings", "--out", "runs/rings"])
    >>> config, points, path = train_config(args)      # checked; points is None for a toy
    >>> config["sampler"], config["steps"]
    ('mala', 2000)
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os

import numpy as np

from numpyro_ebm import logz, samplers, tables
from numpyro_ebm.cli._common import BUILTIN, TOYS, UsageError, jsonable
from numpyro_ebm.cli.data_files import (
    check_columns,
    check_rows,
    read_points,
    sha256,
    training_shape,
)
from numpyro_ebm.energies import default_hidden
from numpyro_ebm.negatives import KINDS as NEGATIVES
from numpyro_ebm.training.objective import OBJECTIVES


def _parse_hidden(text: str) -> list[int]:
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        widths = []
    if not widths or min(widths) < 1:
        raise UsageError(
            "--hidden",
            f"{text!r} is not a comma-separated list of positive layer widths; write e.g. "
            "--hidden 128,128",
        )
    if max(widths) > _MAX_WIDTH or len(widths) > _MAX_LAYERS:
        raise UsageError(
            "--hidden",
            f"{text!r} is too large: at most {_MAX_LAYERS} layers of at most {_MAX_WIDTH} units "
            "(the network must fit in memory); write e.g. --hidden 128,128",
        )
    return widths


# Upper limits of the integer options: counters are int32 in the compiled loop; sizes beyond
# these do not fit in memory (a chain, a data point or a batch row costs at least a few hundred
# bytes through the network); seeds are int64.
_MAX_VALUE = {
    "steps": 2**31 - 1,
    "checkpoint_every": 2**31 - 1,
    "mcmc_steps": 2**31 - 1,
    "chains": 2**24,
    "batch_size": 2**24,
    "num_data": 10**8,
    "num": 10**8,
    "seed": 2**63 - 1,
}
_RECORD_EVERY = 10  # fit's default record_every: the held-out NLL's spacing in steps
_MAX_WIDTH = 2**14  # a 2**14-wide layer pair already holds 2**28 parameters (1 GiB, plus Adam's)
_MAX_LAYERS = 64


def check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        option = "--" + name.replace("_", "-")
        if value is None:
            continue
        if not value > 0:
            raise UsageError(option, f"must be positive, got {value}; pass a number > 0")
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(option, f"must be finite, got {value}; e.g. {option} 0.005")
        if name in _MAX_VALUE and value > _MAX_VALUE[name]:
            raise UsageError(
                option, f"must be at most {_MAX_VALUE[name]}, got {value}; pass a smaller number"
            )


def given_settings(args: argparse.Namespace) -> frozenset[str]:
    """The stored settings whose defaults depend on the run (``--patience``, ``--hidden``,
    ``--noise``, ``--weight-decay``) that the command line names: a resumed run keeps its own
    for the others."""
    names = ("patience", "hidden", "noise", "weight_decay")
    return frozenset(name for name in names if getattr(args, name) is not None)


def check_seed(args: argparse.Namespace) -> None:
    if args.seed is not None and not 0 <= args.seed <= _MAX_VALUE["seed"]:
        raise UsageError(
            "--seed", f"must be between 0 and {_MAX_VALUE['seed']}, got {args.seed}; e.g. --seed 0"
        )


def train_config(args: argparse.Namespace) -> tuple[dict, np.ndarray | None, str | None]:
    """Check the options and the data file: ``(config, points, data path)``. No JAX compute."""
    check_positive(
        args,
        "steps",
        "chains",
        "mcmc_steps",
        "batch_size",
        "learning_rate",
        "checkpoint_every",
        "num_data",
    )
    check_seed(args)
    if not 0 < args.validation_fraction < 1:
        raise UsageError(
            "--validation-fraction",
            f"must be between 0 and 1, got {args.validation_fraction}; e.g. 0.1",
        )
    columns = None
    if args.columns is not None:
        columns = [name.strip() for name in args.columns.split(",")]
        if "" in columns or len(set(columns)) != len(columns):
            raise UsageError(
                "--columns", f"{args.columns!r} has empty or repeated names; e.g. --columns x,y"
            )
    hidden = None if args.hidden is None else _parse_hidden(args.hidden)  # before the file
    data, points, path = _data_config(args, columns)
    if hidden is None:  # the widths follow the data's dimension (toys 2-D, digits 64-D)
        dim = 64 if data["name"] == "digits" else 2 if points is None else points.shape[1]
        hidden = list(default_hidden(dim))
    config = {
        "data": data,
        "steps": args.steps,
        "hidden": hidden,
        "sampler": args.sampler,
        "objective": args.objective,
        "negatives": args.negatives,
        "chains": args.chains,
        "mcmc_steps": args.mcmc_steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "patience": _patience(args),
        "noise": _auto_number(
            args, "noise", "a standard deviation", tables.default_noise, data, points
        ),
        "weight_decay": _auto_number(
            args, "weight_decay", "a decay", tables.default_weight_decay, data, points
        ),
        "validation_fraction": None if args.data == "digits" else args.validation_fraction,
        "seed": args.seed,
    }
    return jsonable(config), points, path


def default_patience(steps: int) -> int:
    """``--patience``'s default: a quarter of the run, at least 100 steps (10 held-out
    evaluations at ``fit``'s ``record_every`` of 10)."""
    return max(steps // 4, 100)


def _patience(args: argparse.Namespace) -> int | None:
    if args.patience is None:
        return default_patience(args.steps)
    if args.patience == 0:
        return None
    low, high = _RECORD_EVERY, _MAX_VALUE["steps"]
    if not low <= args.patience <= high:
        raise UsageError(
            "--patience",
            f"must be 0 (never stop early) or a number of steps from {low} (the held-out NLL "
            f"is computed every {low} steps) to {high}, got {args.patience}",
        )
    return args.patience


def _auto_number(args, name: str, what: str, default, data: dict, points) -> float:
    """``--noise`` or ``--weight-decay`` checked, or by default (``auto``) ``default``
    (``tables.default_noise``, ``tables.default_weight_decay``) of the training split."""
    value = getattr(args, name)
    if value is None or value == "auto":
        return default(*training_shape(data, points, args.validation_fraction))
    option = "--" + name.replace("_", "-")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number >= 0):
        raise UsageError(option, f"must be auto or {what} >= 0, got {value!r}; e.g. {option} 0.1")
    return number


def _data_config(args: argparse.Namespace, columns: list[str] | None) -> tuple:
    """``--data`` checked (a built-in, or a file read and checked now): ``(the config's data
    entry, the file's points or None, the file's absolute path or None)``."""
    points, path = None, None
    if args.data in BUILTIN:
        if args.columns is not None:
            raise UsageError(
                "--columns", f"only applies to .csv files, not to {args.data!r}; leave it out"
            )
        if args.data == "digits":
            if args.num_data is not None:
                raise UsageError("--num-data", "only applies to the built-in toys; leave it out")
            if importlib.util.find_spec("sklearn") is None:
                raise UsageError("--data", "digits needs scikit-learn; pip install scikit-learn")
            data = {
                "name": "digits",
                "standardized": False,
                "space": "logit",  # off the box (bounded.logit_box); runs before: the box
                "fresh_noise": True,
            }
        else:
            num_points = args.num_data or 50_000
            check_rows(num_points, args.validation_fraction, "--num-data")
            data = {"name": args.data, "num_points": num_points, "standardized": False}
    else:
        if args.num_data is not None:
            raise UsageError("--num-data", "only applies to the built-in toys; leave it out")
        if not os.path.splitext(args.data)[1] and not os.path.exists(args.data):
            raise UsageError(
                "--data",
                f"{args.data!r} is neither a built-in data set ({', '.join(BUILTIN)}) nor a "
                "file; pass one of those names or a .npy/.csv path",
            )
        path = os.path.abspath(args.data)
        points, names = read_points(args.data, columns)
        check_rows(len(points), args.validation_fraction, args.data)
        check_columns(points, names, args.data, args.seed, args.validation_fraction)
        data = {
            "name": "file",
            "sha256": sha256(path),
            "columns": names,
            "shape": list(points.shape),
            "standardized": True,
            "dequantize": True,  # gridded columns (tables.quantum); runs made before: False
            "fresh_noise": True,  # new noise every batch (fit's augment); runs before: False
        }
    return data, points, path


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="numpyro-ebm",
        description="Train, evaluate and sample energy-based models (numpyro_ebm).",
        epilog="Exit codes: 0 done, 1 training diverged, 2 bad input or settings (one line), "
        "3 internal error (traceback written to a file), 130 interrupted.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_evaluate(sub)
    _add_sample(sub)
    _add_report(sub)
    _add_demo(sub)
    return parser


def _command(sub, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help)


def _add_train(sub) -> None:
    train = _command(sub, "train", "train an MLP energy and write a run folder (rerun to resume)")
    train.add_argument(
        "--data",
        required=True,
        metavar="SOURCE",
        help=f"built-in data set ({', '.join(BUILTIN)}) or a .npy/.csv file of points",
    )
    train.add_argument("--out", required=True, metavar="DIR", help="run folder")
    _add_training_settings(train)
    train.add_argument(
        "--validation-fraction",
        type=float,
        default=0.1,
        metavar="F",
        help="share of the rows held out (default: %(default)s; digits: its test split)",
    )
    train.add_argument("--columns", metavar="A,B", help="CSV columns to use (default: all)")
    train.add_argument(
        "--num-data", type=int, metavar="N", help="points drawn from a toy (default: 50000)"
    )
    train.add_argument(
        "--seed", type=int, default=0, help="seed of all the run's PRNG keys (default: %(default)s)"
    )
    train.add_argument(
        "--checkpoint-every",
        type=int,
        default=100,
        metavar="N",
        help="steps between checkpoints, and per compiled call: --patience is checked at "
        "their ends (may change when resuming: the training is the same, its stop may come "
        "later by up to N - 1 steps) (default: %(default)s)",
    )
    _add_log_z(train, "log Z estimator of the held-out table after training")
    train.add_argument("--no-report", action="store_true", help="skip report.html and density.png")
    train.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_training_settings(train: argparse.ArgumentParser) -> None:
    """The options stored in the run's config that set the model and its training."""
    train.add_argument(
        "--steps", type=int, default=2000, metavar="N", help="training steps (default: %(default)s)"
    )
    train.add_argument(
        "--hidden",
        metavar="W,W",
        help="MLP layer widths (default: by the data's dimension, 128,128,128 for 2 columns, "
        "else two layers of at least 256: energies.default_hidden)",
    )
    train.add_argument(
        "--sampler",
        default="mala",
        choices=samplers.KERNELS,
        help="negative-phase kernel (default: %(default)s)",
    )
    train.add_argument(
        "--objective",
        default="ml",
        choices=OBJECTIVES,
        help="training objective: maximum likelihood, or (sliced / denoising) score matching "
        "(default: %(default)s)",
    )
    train.add_argument(
        "--negatives",
        default="auto",
        choices=("auto", *NEGATIVES),
        help="where negatives come from; auto: persistent chains for ml, none for score "
        "matching (default: %(default)s)",
    )
    train.add_argument(
        "--chains",
        type=int,
        default=1024,
        metavar="N",
        help="negatives per step (default: %(default)s)",
    )
    train.add_argument(
        "--mcmc-steps",
        type=int,
        default=20,
        metavar="K",
        help="sampler steps per update (default: %(default)s)",
    )
    train.add_argument(
        "--batch-size",
        type=int,
        default=1024,
        metavar="N",
        help="data points per update (default: %(default)s)",
    )
    train.add_argument(
        "--learning-rate",
        type=float,
        default=5e-3,
        metavar="LR",
        help="peak Adam learning rate (default: %(default)s)",
    )
    train.add_argument(
        "--noise",
        metavar="S",
        help="standard deviation of Gaussian noise added to every training batch, in the "
        "model's (standardized) coordinates; 0: none (default: auto, 0.1 with fewer than 100 "
        "training rows per column, else 0: tables.default_noise)",
    )
    train.add_argument(
        "--weight-decay",
        metavar="W",
        help="AdamW's weight decay on the energy's parameters; 0: none, plain Adam (default: "
        "auto, 0.1 with fewer than 100 training rows per column, else 0: "
        "tables.default_weight_decay)",
    )
    train.add_argument(
        "--patience",
        type=int,
        metavar="N",
        help="stop when the held-out NLL on the validation split has not improved for N steps "
        "(checked at each checkpoint; the run keeps its best parameters either way); 0: never "
        "stop early "
        "(default: a quarter of --steps, at least 100)",
    )


def _add_log_z(command: argparse.ArgumentParser, what: str) -> None:
    command.add_argument(
        "--log-z",
        default="auto",
        choices=logz.select.METHODS,
        help=f"{what}; auto: grid in up to 3 dimensions, else the log Z tracked in "
        "training when its standard error is at most 0.1, else AIS (default: %(default)s)",
    )


def _add_evaluate(sub) -> None:
    ev = _command(sub, "evaluate", "held-out log-likelihood of a trained run")
    ev.add_argument("dir", metavar="DIR", help="run folder")
    ev.add_argument(
        "--data",
        metavar="PATH",
        help=".npy/.csv file with the run's columns (default: the validation split)",
    )
    _add_log_z(ev, "log Z estimator")
    ev.add_argument(
        "--seed", type=int, metavar="S", help="seed of the AIS and KL keys (default: the run's)"
    )


def _add_sample(sub) -> None:
    sample = _command(sub, "sample", "draw approximate samples of a trained model into a .npy file")
    sample.add_argument("dir", metavar="DIR", help="run folder")
    sample.add_argument("--num", type=int, required=True, metavar="N", help="number of samples")
    sample.add_argument("--out", required=True, metavar="FILE.npy", help="output file")
    sample.add_argument(
        "--seed", type=int, default=0, metavar="S", help="seed of the chains (default: %(default)s)"
    )
    sample.add_argument(
        "--mcmc-steps",
        type=int,
        default=1000,
        metavar="K",
        help="warm-up steps of each chain (default: %(default)s)",
    )


def _add_report(sub) -> None:
    report = _command(sub, "report", "re-render the report of a trained run")
    report.add_argument("dir", metavar="DIR", help="run folder")
    report.add_argument(
        "--out", metavar="PATH", help=".html or .md file (default: DIR/report.html)"
    )


def _add_demo(sub) -> None:
    demo = _command(sub, "demo", "train on a 2-D toy and print the evaluation table")
    demo.add_argument(
        "--toy", default="8gaussians", choices=TOYS, help="toy density (default: %(default)s)"
    )
    demo.add_argument(
        "--steps", type=int, default=2000, help="training steps (default: %(default)s)"
    )
    demo.add_argument(
        "--num-data", type=int, default=50_000, help="training points (default: %(default)s)"
    )
    demo.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    demo.add_argument(
        "--out", default="outputs/demo", help="folder of the plot (default: %(default)s)"
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
