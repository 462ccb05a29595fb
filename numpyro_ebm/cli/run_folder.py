"""The run folder: ``run.json`` and ``metrics.json`` (reading, validating, writing), the
comparison of a run's stored settings with new ones, and creating or cleaning up folders.

A damaged or foreign file is a ``UsageError`` naming it; nothing here deletes what the user
had: ``remove_created`` removes only what the failing command itself created.

Example:
    >>> run, points = load_run("runs/rings")     # a finished run, its data file checked
    >>> update_metrics("runs/rings", run["config"]["steps"], {"note": "checked"})
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import platform
import shlex
import shutil
import tempfile

import jax
import numpy as np

import numpyro_ebm as ebm
from numpyro_ebm import _io, negatives, samplers, training
from numpyro_ebm.cli._common import (
    BUILTIN,
    CHECKPOINT_DIR,
    METRICS_FILE,
    RUN_FILE,
    RUN_FORMAT,
    TOYS,
    UsageError,
    write_json,
)
from numpyro_ebm.cli.data_files import Data, read_points, sha256
from numpyro_ebm.diagnostics.report import figures_folder_problem

# what a failed write into a folder means: no permission, a read-only or full file system
WRITE_ERRNOS = frozenset((errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT))


def checkpoint_step(folder: str) -> int | None:
    """The step of the run's last checkpoint (None when there is none); ``CheckpointError``
    naming the file when it is damaged."""
    return training.checkpoint_step(os.path.join(folder, CHECKPOINT_DIR))


def stopped_early(folder: str, config: dict, step: int) -> bool:
    """Whether the run's checkpoint at ``step`` is the end of a run stopped by ``--patience``:
    ``patience`` steps past its kept step (``training.checkpoint_best_step``; a checkpoint
    written before the kept step was recorded counts as not stopped)."""
    patience = config.get("patience")
    if patience is None:
        return False
    best = training.checkpoint_best_step(os.path.join(folder, CHECKPOINT_DIR))
    return training.selection.over(step, best, patience)


def _damaged(path: str, problem: str) -> UsageError:
    return UsageError(
        path,
        f"{problem}; the run folder is damaged (nothing was changed): restore the file from a "
        "backup, or train into a new --out",
    )


def _read_json(path: str):
    """The JSON value in ``path``; a file that cannot be read or parsed is a ``_damaged`` one."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise _damaged(path, f"cannot be read ({err})") from err


def _is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_quanta(value, dim: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == dim
        and all(_is_finite_number(q) and q >= 0 for q in value)
    )


def _run_problem(run) -> str | None:
    """What is wrong with a ``run.json`` value (missing keys, wrong types), or None."""
    if not isinstance(run, dict):
        return "does not hold a JSON object"
    fields = {
        "command": lambda v: isinstance(v, str),
        "config": lambda v: isinstance(v, dict),
        "data_path": lambda v: v is None or isinstance(v, str),
        "standardization": lambda v: v is None or isinstance(v, dict),
        "event_shape": lambda v: isinstance(v, list) and len(v) == 1 and _is_int(v[0], 1),
        "diverged": lambda v: v is None or (isinstance(v, dict) and _is_int(v.get("step"))),
    }
    config_fields = {
        "data": lambda v: isinstance(v, dict) and v.get("name") in (*BUILTIN, "file"),
        "steps": lambda v: _is_int(v, 1),
        "hidden": lambda v: isinstance(v, list) and v and all(_is_int(w, 1) for w in v),
        "sampler": lambda v: v in samplers.KERNELS,
        "negatives": lambda v: v in ("auto", *negatives.KINDS),
        "chains": lambda v: _is_int(v, 1),
        "mcmc_steps": lambda v: _is_int(v, 1),
        "batch_size": lambda v: _is_int(v, 1),
        "learning_rate": lambda v: _is_finite_number(v) and v > 0,
        "validation_fraction": lambda v: v is None or (_is_finite_number(v) and 0 < v < 1),
        "seed": lambda v: _is_int(v),
    }
    for name, ok in fields.items():
        if name not in run and name != "diverged":
            return f"has no {name!r} entry"
        if not ok(run.get(name)):
            return f"has a wrong {name!r} entry ({_short(run[name])})"
    config = run["config"]
    if config.get("objective", "ml") not in training.objective.OBJECTIVES:
        return f"has a wrong 'config.objective' entry ({_short(config.get('objective'))})"
    if not (config.get("patience") is None or _is_int(config["patience"], 1)):
        return f"has a wrong 'config.patience' entry ({_short(config['patience'])})"
    for name in ("noise", "weight_decay"):
        if name in config and not (_is_finite_number(config[name]) and config[name] >= 0):
            return f"has a wrong 'config.{name}' entry ({_short(config[name])})"
    for name, ok in config_fields.items():
        if name not in config:
            return f"has no 'config.{name}' entry"
        if not ok(config[name]):
            return f"has a wrong 'config.{name}' entry ({_short(config[name])})"
    data, dim = config["data"], run["event_shape"][0]
    if data["name"] == "file":
        ok = (
            isinstance(data.get("sha256"), str)
            and isinstance(run["data_path"], str)
            and (data.get("columns") is None or isinstance(data["columns"], list))
            and isinstance(run["standardization"], dict)
            and all(
                isinstance(v, list) and len(v) == dim and all(map(_is_finite_number, v))
                for v in (run["standardization"].get(k) for k in ("mean", "std"))
            )
            and min(run["standardization"]["std"]) > 0
            and _is_quanta(run["standardization"].get("quantum", [0.0] * dim), dim)
        )
        if not ok:
            return "has a wrong 'config.data' or 'standardization' entry for a data file"
    elif data["name"] in TOYS and not _is_int(data.get("num_points"), 1):
        return "has a wrong 'config.data.num_points' entry"
    return None


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _read_run_json(folder: str) -> dict:
    path = os.path.join(folder, RUN_FILE)
    run = _read_json(path)
    if isinstance(run, dict) and run.get("format") != RUN_FORMAT:
        raise UsageError(
            path, f"is not a {RUN_FORMAT} file; pass the --out folder of `numpyro-ebm train`"
        )
    problem = _run_problem(run)
    if problem is not None:
        raise _damaged(path, problem)
    _read_metrics(folder)  # a damaged metrics.json is reported before anything is computed
    return run


def _read_metrics(folder: str) -> dict:
    """The run's ``metrics.json`` (empty when there is none yet)."""
    path = os.path.join(folder, METRICS_FILE)
    if not os.path.exists(path):
        return {}
    metrics = _read_json(path)
    if not isinstance(metrics, dict) or not _is_int(metrics.get("step")):
        raise _damaged(path, "is not a metrics file of numpyro-ebm (no step)")
    return metrics


def existing_run(out: str) -> dict | None:
    """The run stored in ``out`` (None for a new or empty folder)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(out, "is a file; pass a folder for the run with --out")
    if not os.path.isdir(out):
        return None
    if os.path.exists(os.path.join(out, RUN_FILE)):
        return _read_run_json(out)
    if set(os.listdir(out)) - {_io.LOCK_FILE}:
        raise UsageError(
            out, "exists and is not a numpyro-ebm run folder; pick another --out (a new folder)"
        )
    return None


def diverged_message(out: str, step: int) -> str:
    return (
        f"numpyro-ebm: error: {out}: training diverged at step {step} (non-finite energies or "
        "gradients many steps in a row); train into a new --out with a lower --learning-rate "
        "(e.g. a tenth) or another --sampler"
    )


def load_run(folder: str) -> tuple[dict, np.ndarray | None]:
    """A finished run's ``run.json`` and its data file's points (None for built-in data)."""
    if not os.path.isdir(folder):
        raise UsageError(
            folder, "no such run folder; pass the --out folder of a `numpyro-ebm train` run"
        )
    if not os.path.exists(os.path.join(folder, RUN_FILE)):
        raise UsageError(
            folder,
            f"is not a numpyro-ebm run folder (no {RUN_FILE}); pass the --out folder of a "
            "`numpyro-ebm train` run",
        )
    run = _read_run_json(folder)
    config = run["config"]
    if run.get("diverged") is not None:
        raise UsageError(
            folder,
            f"training diverged at step {run['diverged']['step']}, the run has no trained "
            "model; train into a new --out with a lower --learning-rate",
        )
    step = checkpoint_step(folder)
    if step is None or (step < config["steps"] and not stopped_early(folder, config, step)):
        stopped = "before its first checkpoint" if step is None else f"at step {step}"
        raise UsageError(
            folder,
            f"training stopped {stopped} of {config['steps']}; finish it by running the "
            f"train command again: {run['command']}",
        )
    points = None
    if config["data"]["name"] == "file":
        path = run["data_path"]
        if not os.path.isfile(path):
            raise UsageError(
                path, "the run's data file is missing; put it back (or retrain into a new --out)"
            )
        if sha256(path) != config["data"]["sha256"]:
            raise UsageError(
                path,
                "changed since the run was trained (different contents); restore the original "
                "file or train a new run",
            )
        points, _ = read_points(path, config["data"]["columns"], wanted_by="the run")
    return run, points


def update_metrics(folder: str, step: int, updates: dict) -> dict:
    """Merge ``updates`` (``{"heldout": {data: {method: entry}}, ...}``) into metrics.json."""
    path = os.path.join(folder, METRICS_FILE)
    metrics = _read_metrics(folder)
    if metrics.get("step") != step:
        metrics = {"step": step}
    for data_name, entries in updates.pop("heldout", {}).items():
        metrics.setdefault("heldout", {}).setdefault(data_name, {}).update(entries)
    metrics.update(updates)
    with writing(folder, path, "copy the run folder somewhere you can write and use the copy"):
        write_json(path, metrics)
    return metrics


def _config_differences(stored: dict, config: dict) -> str:
    changes = []
    for name, value in config.items():
        if stored.get(name) == value:
            continue
        if name == "data":
            changes.append("--data: other data")
        else:
            old, new = (
                ",".join(map(str, v)) if isinstance(v, list) else v
                for v in (stored.get(name), value)
            )
            changes.append(f"--{name.replace('_', '-')} {old} -> {new}")
    return ", ".join(changes)


def make_folders(out: str) -> list[str]:
    """Create ``out`` and its missing parents before any compute: the folders this call
    created, outermost first. If one cannot be created, the others are removed again."""
    missing, path = [], os.path.abspath(out)
    while not os.path.lexists(path):
        missing.append(path)
        path = os.path.dirname(path)
    created = []
    try:
        for folder in reversed(missing):
            os.mkdir(folder)
            created.append(folder)
    except OSError as err:
        remove_created(created, [])
        raise UsageError(
            "--out",
            f"{out} cannot be created ({err.strerror}: {err.filename}); pick a folder you can "
            "write to",
        ) from err
    return created


def remove_created(folders: list[str], entries: list[str]) -> None:
    """Remove what this invocation created: ``entries`` (paths inside a folder that existed)
    and ``folders`` (whole, innermost first; they held nothing before this invocation)."""
    for path in entries:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
    for i, folder in enumerate(reversed(folders)):
        if i == 0:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def as_stored(stored: dict, config: dict, *, given: frozenset[str]) -> dict:
    """``config`` for resuming the run whose config is ``stored``; ``given``: the settings
    named on the command line. A run resumes as it started: with its stored widths unless
    ``--hidden`` is given (a run made before the widths followed the data's dimension keeps
    its 128,128,128), and a run made before ``--patience``, ``--noise``, ``--weight-decay``,
    dequantization or fresh dequantization noise existed without them unless that option is
    given."""
    config = dict(config)
    for name in ("patience", "noise", "weight_decay"):
        if name not in stored and name not in given:
            config.pop(name, None)
    if "hidden" not in given:
        config["hidden"] = stored["hidden"]
    for name in ("dequantize", "fresh_noise", "space"):
        if name not in stored["data"]:
            config["data"] = {k: v for k, v in config["data"].items() if k != name}
    return config


def check_settings(out: str, existing: dict | None, config: dict, *, given: frozenset[str]) -> dict:
    """The settings to train ``out``'s run with: ``config``, or for a run made before some
    settings existed ``as_stored``; ``UsageError`` when they differ from the stored run's."""
    if existing is None:
        return config
    config = as_stored(existing["config"], config, given=given)
    if existing["config"] != config:
        raise UsageError(
            out,
            f"holds a run with other settings ({_config_differences(existing['config'], config)})"
            f"; pick another --out, or delete {out} to start again",
        )
    return config


def started(out: str) -> bool:
    """Whether the run in ``out`` has a checkpoint (a damaged one counts: it is kept)."""
    try:
        return checkpoint_step(out) is not None
    except ebm.CheckpointError:
        return True


def new_run(config: dict, data: Data, argv: list[str], path: str | None) -> dict:
    """The ``run.json`` of a new run."""
    return {
        "format": RUN_FORMAT,
        "command": shlex.join(["numpyro-ebm", *argv]),
        "config": config,
        "data_path": path,
        "standardization": None
        if data.mean is None
        else {
            "mean": data.mean.tolist(),
            "std": data.std.tolist(),
            "quantum": data.quantum.tolist(),
        },
        "event_shape": list(data.train.shape[1:]),
        "split": {
            "train": len(data.train),
            "validation": len(data.validation),
            **({} if data.test is None else {"test": len(data.test)}),
        },
        "versions": {
            "numpyro_ebm": ebm.__version__,
            "jax": jax.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
    }


def check_output_file(path: str, example: str) -> None:
    """``path`` can be written (checked before any compute): not a folder, in a writable one."""
    if os.path.isdir(path):
        raise UsageError(
            "--out",
            f"{path} is an existing folder; name a file, e.g. {os.path.join(path, example)}",
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError("--out", f"folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(
            "--out", f"folder {folder} is not writable (permission denied); pick another"
        )
    check_writable(folder, "--out", f"folder {folder} ", "pick another")


def check_writable(folder: str, subject: str, what: str, advice: str) -> None:
    """``folder`` takes a new file (one is made and removed: ``os.access`` says yes to root
    and knows nothing of read-only file systems); else a ``UsageError``."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".tmp-probe-")
    except OSError as err:  # the probe's random name would only confuse
        raise _not_writable(subject, what, OSError(err.errno, err.strerror), advice) from err
    os.close(fd)
    os.remove(probe)


def check_report_file(path: str) -> None:
    """``check_output_file`` for a report; a ``.md`` one also needs a figures folder it may
    replace (absent, or holding only an earlier report's figures)."""
    check_output_file(path, "report.html")
    problem = figures_folder_problem(path) if path.lower().endswith(".md") else None
    if problem is not None:
        raise UsageError(
            "--out",
            f"{problem}; the report's figures would replace it: move it away, or pick another "
            "--out",
        )


def _not_writable(subject: str, what: str, err: OSError, advice: str) -> UsageError:
    where = f"{err.strerror}: {err.filename}" if err.filename else err.strerror or str(err)
    return UsageError(subject, f"{what}cannot be written ({where}); {advice}")


@contextlib.contextmanager
def writing(folder: str, subject: str, advice: str):
    """Turn a failed write into ``folder`` (``WRITE_ERRNOS``) into a ``UsageError``."""
    try:
        yield
    except OSError as err:
        folder = os.path.abspath(folder)
        named = isinstance(err.filename, str | bytes | os.PathLike)
        name = os.path.abspath(os.fsdecode(err.filename)) if named else folder
        if err.errno not in WRITE_ERRNOS or os.path.commonpath([folder, name]) != folder:
            raise
        raise _not_writable(subject, "", err, advice) from err


@contextlib.contextmanager
def locked(folder: str, advice: str, created: list[str] | tuple = ()):
    """``_io.folder_lock(folder)``; a folder where the lock file cannot be made (no
    permission, a read-only file system) is a ``UsageError``, after the folders this
    invocation ``created`` are removed again."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(_io.folder_lock(folder))
        except OSError as err:
            remove_created(list(created), [])
            raise _not_writable(folder, "the run folder ", err, advice) from err
        yield
