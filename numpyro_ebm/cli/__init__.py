"""The ``numpyro-ebm`` command: train, evaluate and sample energy-based models from the shell.

Commands (``numpyro-ebm COMMAND --help`` lists every option):

``train --data SOURCE --out DIR [options]``
    Fit an MLP energy by maximum likelihood (``numpyro_ebm.fit``) to a built-in data set
    (``8gaussians``, ``checkerboard``, ``rings``, ``digits``) or to your own ``.npy`` or ``.csv``
    file and write the run folder DIR. A file's columns recorded on a grid (whole numbers, or
    a fixed number of decimals up to 6: counts, a 0/1 flag, lengths in 0.1 cm) are
    dequantized (``numpyro_ebm.tables``: each value spread uniformly over its grid cell, so
    the column has a density), then every column is standardized (mean 0, standard deviation
    1, from the training split). Log-likelihoods are reported in the file's original units
    (of the dequantized values, with the bound on the recorded values' probability), samples
    on the columns' grids. The run keeps the parameters of the lowest held-out NLL on its
    validation split (best-model selection); ``--patience`` stops early. Running the same
    command again after an interruption resumes from the last checkpoint.
``evaluate DIR [--data PATH] [--log-z auto|grid|ais|learned] [--seed S]``
    Held-out log-likelihood (nats per point, mean ± standard error) of the run's validation
    split or of a file with the same columns; updates ``DIR/metrics.json``.
``sample DIR --num N --out FILE.npy [--seed S] [--mcmc-steps K]``
    Approximate samples of the trained model (MCMC), in the data's original units.
``report DIR [--out PATH]``
    Re-render the run's report (``.html`` or ``.md``) from the stored run.
``demo [--toy NAME] [--steps N] [--out DIR]``
    Train on a 2-D toy with the library's defaults, print the evaluation table (test NLL,
    entropy bound, KL ± standard error, time) and plot the learned density next to the true one.

The run folder holds ``run.json`` (what rebuilds the run: data source and fingerprint,
standardization, settings, versions; ``diverged`` once training diverged), ``checkpoint/``
(``fit``'s), ``metrics.json``, ``report.html``, for 2-D data ``density.png``, and ``.lock``
(``train`` and ``evaluate`` hold it: one writer at a time); every file is written atomically.
A user error (a bad file or option, a folder of another run, a damaged run file, a folder in
use, a folder that cannot be written) prints one line
``numpyro-ebm: error: <file or option>: <what is wrong>; <what to do>``
and exits with code 2 before any computation. No error path deletes anything the user had:
only what the failing command itself created, and only while the run has no checkpoint.

Exit codes:

===== ===============================================================================
0     done
1     training diverged (``run.json`` records it; ``train`` refuses to rerun it, and
      ``evaluate``, ``sample`` and ``report`` refuse the run with code 2)
2     bad input or settings, a damaged run file, a run folder in use by another process,
      a folder that cannot be written (read-only, no permission, full)
3     internal error (a bug): one line, and the full traceback written to
      ``DIR/traceback.txt`` of the run folder, or to a temporary file when there is none
130   interrupted (Ctrl-C); ``train`` resumes from its last checkpoint when run again
===== ===============================================================================

The package: ``parser`` (the options and their checks), ``data_files`` (the user's data file),
``run_folder`` (``run.json``, ``metrics.json`` and the folder itself), ``commands`` (one function
per command) and ``main`` here (exit codes, ``traceback.txt``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback

import numpyro_ebm as ebm
from numpyro_ebm import _io

# the file names, exit codes and built-in data names are part of the package's namespace
from numpyro_ebm.cli._common import (  # noqa: F401
    BUILTIN,
    CHECKPOINT_DIR,
    DENSITY_FILE,
    EXIT_DIVERGED,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    METRICS_FILE,
    REPORT_FILE,
    RUN_FILE,
    RUN_FORMAT,
    TOYS,
    TRACEBACK_FILE,
    UsageError,
)
from numpyro_ebm.cli.commands import (
    demo_command,
    evaluate_command,
    report_command,
    sample_command,
    train_command,
)
from numpyro_ebm.cli.parser import make_parser

__all__ = ["UsageError", "main"]

COMMANDS = {
    "evaluate": evaluate_command,
    "sample": sample_command,
    "report": report_command,
    "demo": demo_command,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``numpyro-ebm``; returns the exit code (see the module docstring).

    No exception escapes except argparse's ``SystemExit`` (code 2, for a malformed option)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = make_parser().parse_args(argv)
    try:
        if args.command == "train":
            return train_command(args, argv)
        return COMMANDS[args.command](args)
    except UsageError as err:
        _error_line(str(err))
    except ebm.CheckpointError as err:
        _error_line(
            f"{err}; the run's checkpoint is damaged (nothing was changed): restore the run "
            "folder from a backup, or train into a new --out"
        )
    except _io.FolderLockedError as err:
        _error_line(str(err))
    except KeyboardInterrupt:
        print("numpyro-ebm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        where = _write_traceback(_run_folder_of(args))
        what = " ".join(f"{type(err).__name__}: {err}".split())
        print(
            f"numpyro-ebm: internal error: {what[:200]}; this is a bug in numpyro-ebm: please "
            f"report it with the full traceback, written to {where}",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    return EXIT_USAGE


def _error_line(message: str) -> None:
    print(f"numpyro-ebm: error: {' '.join(message.split())}", file=sys.stderr)


def _run_folder_of(args: argparse.Namespace) -> str | None:
    folder = getattr(args, "dir", None) or (args.out if args.command == "train" else None)
    if folder and os.path.isfile(os.path.join(folder, RUN_FILE)):
        return folder
    return None


def _write_traceback(folder: str | None) -> str:
    """Write the exception being handled to ``folder/traceback.txt`` (or a temporary file)."""
    text = traceback.format_exc()
    if folder is not None:
        path = os.path.join(folder, TRACEBACK_FILE)
        try:
            _io.atomic_write(path, lambda f: f.write(text), mode="w")
            return path
        except OSError:
            pass
    fd, path = tempfile.mkstemp(prefix="numpyro-ebm-traceback-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path
