"""The ``numpyro-ebm`` command: train, evaluate and sample energy-based models from the shell.

Commands (``numpyro-ebm COMMAND --help`` lists every option):

``train --data SOURCE --out DIR [options]``
    Fit an MLP energy by maximum likelihood (``numpyro_ebm.fit``) to a built-in data set
    (``8gaussians``, ``checkerboard``, ``rings``, ``digits``) or to your own ``.npy`` or ``.csv``
    file and write the run folder DIR. A file's columns are standardized (mean 0, standard
    deviation 1, from the training split) before training; log-likelihoods and samples are
    reported in the file's original units. Running the same command again after an
    interruption resumes from the last checkpoint.
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
use) prints one line ``numpyro-ebm: error: <file or option>: <what is wrong>; <what to do>``
and exits with code 2 before any computation. No error path deletes anything the user had:
only what the failing command itself created, and only while the run has no checkpoint.

Exit codes:

===== ===============================================================================
0     done
1     training diverged (``run.json`` records it; ``train`` refuses to rerun it, and
      ``evaluate``, ``sample`` and ``report`` refuse the run with code 2)
2     bad input or settings, a damaged run file, a run folder in use by another process
3     internal error (a bug): one line, and the full traceback written to
      ``DIR/traceback.txt`` of the run folder, or to a temporary file when there is none
130   interrupted (Ctrl-C); ``train`` resumes from its last checkpoint when run again
===== ===============================================================================
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import hashlib
import importlib.util
import io
import json
import math
import os
import platform
import shlex
import shutil
import stat
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import numpyro_ebm as ebm
import numpyro_ebm._io as _io
from numpyro_ebm import datasets, diagnostics, evaluate, logz, plots, samplers
from numpyro_ebm.train import NEGATIVES, TrainingDivergedError, checkpoint_step
from numpyro_ebm.validation import validate_data

__all__ = ["UsageError", "main"]

TOYS = datasets.TOY_NAMES
BUILTIN = (*TOYS, "digits")
RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
DENSITY_FILE = "density.png"
CHECKPOINT_DIR = "checkpoint"
TRACEBACK_FILE = "traceback.txt"
RUN_FORMAT = "numpyro-ebm-run/1"

# fold_in tags of the run's key (jax.random.key(--seed)): one key per purpose
_DATA, _SPLIT, _ENERGY, _FIT, _LOG_Z, _KL = range(6)

_MIN_TRAIN_ROWS = 10
_MIN_HELDOUT_ROWS = 2  # a standard error needs two points
_GRID_POINTS = {1: 4096, 2: 512, 3: 96}  # per axis: 2**12, 2**18, ~2**20 energies a grid
_GRID_MAX_DOUBLINGS = 5  # six boxes at most
_GRID_EDGE_MASS = 1e-3


EXIT_OK = 0
EXIT_DIVERGED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A mistake of the user's; ``main`` prints it as
    ``numpyro-ebm: error: <subject>: <message>`` on one line and returns 2."""

    def __init__(self, subject: str, message: str):
        super().__init__(f"{subject}: {message}")


# -- data files --------------------------------------------------------------------------------


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_regular_file(path: str) -> None:
    """Refuse a missing path, a folder, and what is not a regular file (a FIFO or a device
    such as ``/dev/zero`` would block or never end), without opening it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as err:
        raise UsageError(path, "no such file; check the path") from err
    except OSError as err:
        raise UsageError(path, f"cannot be read ({err.strerror}); check the path") from err
    if stat.S_ISDIR(mode):
        raise UsageError(path, "is a folder, not a file; pass a .npy or .csv file")
    if not stat.S_ISREG(mode):
        raise UsageError(
            path, "is not a regular file (a pipe or a device); save the data to a file first"
        )


def _open_data(path: str):
    """``path``, a regular file, opened for binary reading."""
    _check_regular_file(path)
    try:
        return open(path, "rb")
    except PermissionError as err:
        raise UsageError(
            path, "cannot be read: permission denied; make it readable (chmod u+r) or copy it"
        ) from err
    except OSError as err:
        raise UsageError(path, f"cannot be read ({err.strerror}); check the file") from err


def _as_float64(points: np.ndarray, path: str) -> np.ndarray:
    """Floats and integers as native float64 (as a CSV's numbers are read); others refused."""
    kind = points.dtype.kind
    if kind == "f" and points.dtype.itemsize > 8:
        raise UsageError(
            path,
            f"holds {points.dtype} values (extended precision), which JAX cannot hold; "
            "save array.astype('float64')",
        )
    if kind not in "fiu":
        raise UsageError(
            path,
            f"holds {points.dtype} values, not numbers; energy-based models need continuous "
            "data: save array.astype('float64')",
        )
    return points.astype(np.float64)  # native byte order, whatever the file's


def _read_npy(path: str) -> np.ndarray:
    """A ``.npy`` file's 2-D array as float64, its header checked against the file's size
    before any array is allocated."""
    with _open_data(path) as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(f)
        except (OSError, ValueError, EOFError) as err:
            raise UsageError(
                path, f"is not a NumPy .npy file ({err}); save arrays with numpy.save(path, array)"
            ) from err
        if dtype.hasobject:
            raise UsageError(
                path, "holds Python objects, not numbers; save a float array with numpy.save"
            )
        if len(shape) != 2:
            raise UsageError(
                path,
                f"holds an array of shape {shape}; need a 2-D array (num_points, "
                "num_features): reshape it, e.g. array.reshape(len(array), -1)",
            )
        if shape[1] == 0:
            raise UsageError(path, f"has no columns (shape {shape}); save the data's columns")
        size = os.fstat(f.fileno()).st_size - f.tell()
        if math.prod(shape) * dtype.itemsize > size:
            raise UsageError(
                path,
                f"is truncated: its header promises an array of shape {shape} ({dtype}), the "
                f"file holds {size} bytes of data; save it again with numpy.save",
            )
        try:
            f.seek(0)
            points = np.load(f, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise UsageError(
                path, f"cannot be read as a NumPy array ({err}); save it with numpy.save"
            ) from err
    return _as_float64(points, path)


def _read_csv(path: str, columns: list[str] | None, wanted_by: str) -> tuple[np.ndarray, list]:
    """Numeric columns of a CSV file with a header row: ``(values (n, d) float64, names)``.

    Errors name the file's line (1-based, as an editor counts them: the header, empty lines
    and every line of a quoted multi-line field count)."""
    try:
        with (
            _open_data(path) as binary,
            io.TextIOWrapper(binary, encoding="utf-8-sig", newline="") as f,
        ):
            reader, lines, first = csv.reader(f), [], 1
            for row in reader:
                if row:
                    lines.append((first, row))
                first = reader.line_num + 1
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UsageError(
            path, f"cannot be read as a CSV file ({err}); save it as UTF-8 text with commas"
        ) from err
    if not lines:
        raise UsageError(path, "is empty; need a header row with column names and data rows")
    header = [name.strip() for name in lines[0][1]]
    if len(header) == 1 and (";" in header[0] or "\t" in header[0]):
        raise UsageError(path, "separates fields with ';' or tabs; save it with commas")
    if all(_is_number(name) for name in header):
        raise UsageError(
            path,
            "has no header row (the first line holds numbers); add a first line with the "
            "column names, e.g. x,y",
        )
    if "" in header or len(set(header)) != len(header):
        raise UsageError(path, "has empty or repeated column names; give every column its name")
    names = header if columns is None else columns
    for name in names:
        if name not in header:
            subject, fix = (
                ("--columns", "pick from those")
                if wanted_by == "--columns"
                else (path, "pass a file with the run's columns")
            )
            raise UsageError(
                subject,
                f"{path} has no column {name!r} (its columns: {', '.join(header)}); {fix}",
            )
    rows = lines[1:]
    for number, row in rows:
        if len(row) != len(header):
            raise UsageError(
                path,
                f"line {number} has {len(row)} fields, the header has {len(header)}; fix or "
                "remove that line",
            )
    index = [header.index(name) for name in names]
    cells = np.char.strip(np.array([[row[i] for i in index] for _, row in rows], dtype=str))
    cells = cells.reshape(len(rows), len(index))
    try:
        values = cells.astype(np.float64)
    except ValueError:
        values = None
    if values is None:
        for j, name in enumerate(names):
            for (number, _), cell in zip(rows, cells[:, j], strict=True):
                if cell == "":
                    raise UsageError(
                        path,
                        f"column {name!r} has no value on line {number}; fill in or remove the "
                        "rows with missing values",
                    )
                if not _is_number(cell):
                    fix = (
                        "choose the numeric columns with --columns, e.g. --columns "
                        + ",".join(n for n in names if n != name)
                        if columns is None
                        else "fix or remove that line"
                    )
                    raise UsageError(
                        path,
                        f"column {name!r} holds {str(cell)!r} on line {number}, not a number; "
                        f"{fix}",
                    )
        # numbers that Python reads but NumPy does not (e.g. "1_000")
        values = np.vectorize(float, otypes=[np.float64])(cells)
    bad = ~np.isfinite(values)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise UsageError(
            path,
            f"column {names[j]!r} holds {str(cells[i, j])!r} on line {rows[i][0]}, not a finite "
            f"number (NaN or infinity; {int(bad.any(axis=1).sum())} such lines); remove or fill "
            "in those lines",
        )
    return values, list(names)


def _read_points(
    path: str, columns: list[str] | None = None, *, wanted_by: str = "--columns"
) -> tuple[np.ndarray, list | None]:
    """A user's data file as ``(points (n, d) float64, column names or None)``, checked."""
    kind = os.path.splitext(path)[1].lower()
    if kind not in (".npy", ".csv"):
        _check_regular_file(path)  # a missing file or a folder: say that first
        raise UsageError(
            path,
            f"unsupported file type {kind or '(none)'!r}; pass a .npy array of shape "
            "(num_points, num_features) or a .csv table with a header row",
        )
    if kind == ".npy":
        if columns is not None and wanted_by == "--columns":
            raise UsageError("--columns", "only applies to .csv files; leave it out for .npy")
        points, names = _read_npy(path), None
    else:
        points, names = _read_csv(path, columns, wanted_by)
    try:
        with np.errstate(over="ignore"):  # its float32 copy of huge values is not used
            validate_data(points, name="data")
    except ValueError as err:
        raise UsageError(path, str(err)) from err
    return points, names


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _num_heldout(num_points: int, fraction: float) -> int:
    return round(num_points * fraction)


def _split(seed: int, num_points: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The run's random split: ``(training row indices, held-out row indices)``."""
    key = jax.random.fold_in(jax.random.key(seed), _SPLIT)
    order = np.asarray(jax.random.permutation(key, num_points))
    num_heldout = _num_heldout(num_points, fraction)
    return order[num_heldout:], order[:num_heldout]


def _binary_scale(values: np.ndarray) -> np.ndarray:
    """Powers of two ``2**e`` with ``values / 2**e`` in [1, 2) (1/2 for 0 and inf): dividing
    by them is exact."""
    return np.ldexp(1.0, np.frexp(values)[1] - 1)


def _column_statistics(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (ddof 0) of each column of ``train`` (n, d), in float64.

    ``train.mean(0)`` and ``train.std(0)`` when every standard deviation is in [1e-100, 1e100]
    (no square comes near over- or underflow); otherwise the same computed on the columns
    divided by powers of two, which is exact: values such as 1e-300 or 1e307, whose squares
    over- or underflow, get the statistics of unit-scale values times their scale. A column
    whose deviations from its mean overflow float64 gets an infinite standard deviation.
    """
    train = np.asarray(train, np.float64)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        mean, std = train.mean(axis=0), train.std(axis=0)
        if np.all((std >= 1e-100) & (std <= 1e100)):
            return mean, std  # the usual case: no square comes near over- or underflow
        scale = _binary_scale(np.max(np.abs(train), axis=0))
        mean = scale * np.mean(train / scale, axis=0)
        deviation = train - mean
        spread = _binary_scale(np.max(np.abs(deviation), axis=0))
        std = spread * np.sqrt(np.mean(np.square(deviation / spread), axis=0))
    return mean, np.where(np.isfinite(std), std, np.inf)


def _check_columns(points: np.ndarray, names, path: str, seed: int, fraction: float) -> None:
    """Refuse a data file whose columns cannot be standardized with the statistics of the
    training rows of the run's split (``seed``, ``fraction``): a column with at most 2
    distinct values there (constant, or a flag: no continuous density), a spread float64
    cannot hold, or a value (in any row) that lands beyond float32's range in model
    coordinates."""
    train = points[_split(seed, len(points), fraction)[0]]
    drop = "leave it out with --columns" if names else "numpy.delete it (axis=1)"

    def column(j) -> str:
        return f"column {names[j]!r}" if names else f"column {j}"

    low, high = train.min(axis=0), train.max(axis=0)
    third_value = np.any((train > low) & (train < high), axis=0)
    for j in range(points.shape[1]):
        if low[j] == high[j]:
            raise UsageError(
                path,
                f"{column(j)} is constant in the training rows (all {low[j]:g}), it cannot "
                f"be standardized; {drop}",
            )
        if not third_value[j]:
            raise UsageError(
                path,
                f"{column(j)} takes only 2 distinct values in the training rows ({low[j]:g} "
                f"and {high[j]:g}: a flag?), it has no continuous density; {drop}",
            )
    mean, std = _column_statistics(train)
    for j in range(points.shape[1]):
        if std[j] == np.inf:
            raise UsageError(
                path,
                f"{column(j)} spans {low[j]:g} to {high[j]:g}: its deviations from the mean "
                "overflow float64; divide the column by a power of 10",
            )
        if std[j] < np.finfo(np.float64).tiny:
            raise UsageError(
                path,
                f"{column(j)} varies by {std[j]:g}, below float64's normal range (2.2e-308): "
                "its digits are lost; multiply the column by a power of 10",
            )
    _check_standardizable(points, mean, std, names, path)


def _check_standardizable(points: np.ndarray, mean, std, names, path: str) -> None:
    """Refuse ``points`` (n, d) with a value that ``(x − mean) / std`` puts beyond float32."""
    with np.errstate(over="ignore", invalid="ignore"):
        standardized = (points - mean) / std
    beyond = ~(np.abs(standardized) <= np.finfo(np.float32).max)
    if beyond.any():
        i, j = np.argwhere(beyond)[0]
        column = f"column {names[j]!r}" if names else f"column {j}"
        row = "" if names else f" in row {i}"
        raise UsageError(
            path,
            f"{column} holds {points[i, j]:g}{row}, beyond float32 in the model's coordinates "
            f"((x − mean) / std = {standardized[i, j]:g}); remove that outlier",
        )


def _file_to_model(data: _Data, points: np.ndarray, names, path: str) -> np.ndarray:
    """``data.to_model(points)`` for the points of a user's file, checked first."""
    mean, std = (np.zeros(points.shape[1]), 1.0) if data.mean is None else (data.mean, data.std)
    _check_standardizable(points, mean, np.broadcast_to(std, mean.shape), names, path)
    return data.to_model(points)


@dataclasses.dataclass
class _Data:
    """A run's data in model coordinates (standardized for user files) and the map back."""

    train: np.ndarray
    validation: np.ndarray
    toy: datasets.ToyDensity | None = None
    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    def to_model(self, points) -> np.ndarray:
        points = np.asarray(points, np.float64)
        if self.mean is not None:
            points = (points - self.mean) / self.std
        return points.astype(np.float32)

    def to_original(self, points) -> np.ndarray:
        points = np.asarray(points, np.float64)
        return points if self.mean is None else self.mean + self.std * points

    @property
    def log_jacobian(self) -> float:
        """``log |dz/dx| = −Σ log std``: add it to a model log-density to get the original
        units' one (float64 logs of float64 standard deviations, correctly rounded sum)."""
        return 0.0 if self.std is None else -math.fsum(np.log(self.std))


def _prepare(config: dict, points: np.ndarray | None, standardization: dict | None) -> _Data:
    """Sample/load, split and standardize the run's data (deterministic in ``config``)."""
    key = jax.random.key(config["seed"])
    name = config["data"]["name"]
    if name == "digits":
        digits = datasets.digits()
        return _Data(digits.train, digits.test)
    toy = None
    if name in TOYS:
        toy = datasets.toy(name)
        points = toy.sample(jax.random.fold_in(key, _DATA), config["data"]["num_points"])
    points = np.asarray(points)
    train_rows, heldout_rows = _split(config["seed"], len(points), config["validation_fraction"])
    train, validation = points[train_rows], points[heldout_rows]
    if not config["data"]["standardized"]:
        return _Data(train.astype(np.float32), validation.astype(np.float32), toy)
    if standardization is None:
        # in float64; columns that cannot be standardized were refused (_check_columns)
        mean, std = _column_statistics(train)
    else:
        mean = np.asarray(standardization["mean"], np.float64)
        std = np.asarray(standardization["std"], np.float64)
    data = _Data(train, validation, None, mean, std)
    data.train, data.validation = data.to_model(train), data.to_model(validation)
    return data


# -- the run folder ----------------------------------------------------------------------------


def _jsonable(value):
    """``value`` as JSON stores it, with non-finite floats as ``None`` (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    return value


def _write_json(path: str, obj) -> None:
    text = json.dumps(_jsonable(obj), indent=1, ensure_ascii=False, allow_nan=False)
    _io.atomic_write(path, lambda f: f.write(text + "\n"), mode="w")


def _checkpoint_step(folder: str) -> int | None:
    """The step of the run's last checkpoint (None when there is none); ``CheckpointError``
    naming the file when it is damaged."""
    return checkpoint_step(os.path.join(folder, CHECKPOINT_DIR))


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
        "negatives": lambda v: v in NEGATIVES,
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


def _existing_run(out: str) -> dict | None:
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


def _diverged_message(out: str, step: int) -> str:
    return (
        f"numpyro-ebm: error: {out}: training diverged at step {step} (non-finite energies or "
        "gradients many steps in a row); train into a new --out with a lower --learning-rate "
        "(e.g. a tenth) or another --sampler"
    )


def _load_run(folder: str) -> tuple[dict, np.ndarray | None]:
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
    step = _checkpoint_step(folder)
    if step is None or step < config["steps"]:
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
        if _sha256(path) != config["data"]["sha256"]:
            raise UsageError(
                path,
                "changed since the run was trained (different contents); restore the original "
                "file or train a new run",
            )
        points, _ = _read_points(path, config["data"]["columns"], wanted_by="the run")
    return run, points


def _fit(config: dict, data: _Data, folder: str, *, progress_bar=False, checkpoint_every=None):
    """``fit`` with the run's settings and checkpoints: trains, resumes, or (when the
    checkpoint is at the last step) returns the stored run without computing a step."""
    key = jax.random.key(config["seed"])
    energy = ebm.energies.MLPEnergy(
        data.train.shape[1], hidden=tuple(config["hidden"]), key=jax.random.fold_in(key, _ENERGY)
    )
    every = min(checkpoint_every or config["steps"], config["steps"])  # not part of the config
    return ebm.fit(
        energy,
        data.train,
        key=jax.random.fold_in(key, _FIT),
        num_steps=config["steps"],
        sampler=config["sampler"],
        negatives=config["negatives"],
        num_chains=config["chains"],
        num_mcmc_steps=config["mcmc_steps"],
        batch_size=config["batch_size"],
        learning_rate=config["learning_rate"],
        progress_bar=progress_bar,
        checkpoint_dir=os.path.join(folder, CHECKPOINT_DIR),
        checkpoint_every=every,
        steps_per_call=every,
        validation_data=data.validation,
    )


def _restore(folder: str) -> tuple[dict, _Data, ebm.FitResult]:
    run, points = _load_run(folder)
    data = _prepare(run["config"], points, run["standardization"])
    return run, data, _fit(run["config"], data, folder)


# -- evaluation --------------------------------------------------------------------------------


def _grid_log_z(energy, data: _Data) -> logz.LogZEstimate:
    """``logz.grid_covering`` from the data's box (the toy's bounds for a built-in toy)."""
    if data.toy is not None:
        bounds = np.asarray(data.toy.bounds, np.float64)
    else:
        bounds = np.stack([data.train.min(axis=0), data.train.max(axis=0)], axis=1)
    return logz.grid_covering(
        energy,
        bounds,
        _GRID_POINTS[data.train.shape[1]],
        edge_mass=_GRID_EDGE_MASS,
        max_doublings=_GRID_MAX_DOUBLINGS,
    )


def _log_z(res, data: _Data, method: str, key) -> logz.LogZEstimate:
    if method == "auto":
        method = "grid" if data.train.shape[1] <= 3 else "ais"
    if method == "grid":
        return _grid_log_z(res.energy, data)
    if method == "ais":
        return logz.ais(res.energy, res.event_shape, key=key, data=data.train)
    return res.log_z


def _heldout(res, data: _Data, points_model: np.ndarray, log_z: logz.LogZEstimate) -> dict:
    """Held-out log-likelihood per point in the original units, with what it used."""
    ll = evaluate.log_likelihood(res.energy, points_model, log_z)
    return {
        "num_points": len(points_model),
        "log_likelihood": ll.value + data.log_jacobian,
        "stderr": ll.stderr,
        "units": "original" if data.mean is not None else "data",
        "log_z": log_z.value,
        "log_z_stderr": log_z.stderr,
        "log_z_method": log_z.method,
        "log_z_info": {
            **({} if log_z.ess is None else {"ess": log_z.ess}),
            **{k: v for k, v in (log_z.info or {}).items() if k == "bounds" or np.ndim(v) == 0},
        },
        "log_jacobian": data.log_jacobian,
    }


def _update_metrics(folder: str, step: int, updates: dict) -> dict:
    """Merge ``updates`` (``{"heldout": {data: {method: entry}}, ...}``) into metrics.json."""
    path = os.path.join(folder, METRICS_FILE)
    metrics = _read_metrics(folder)
    if metrics.get("step") != step:
        metrics = {"step": step}
    for data_name, entries in updates.pop("heldout", {}).items():
        metrics.setdefault("heldout", {}).setdefault(data_name, {}).update(entries)
    metrics.update(updates)
    _write_json(path, metrics)
    return metrics


def _run_key(config: dict, purpose: int, seed: int | None = None):
    base = jax.random.key(config["seed"] if seed is None else seed)
    return jax.random.fold_in(base, purpose)


def _kl(res, data: _Data, key) -> dict:
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


def _split_name(config: dict) -> str:
    return "digits test split" if config["data"]["name"] == "digits" else "validation split"


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
    if entry["log_z_info"].get("outer_shell_mass", 0.0) > _GRID_EDGE_MASS:
        rows.append(("warning", "the model's mass reaches the grid's edge: try --log-z ais"))
    return rows


# -- commands ----------------------------------------------------------------------------------


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
_MAX_WIDTH = 2**14  # a 2**14-wide layer pair already holds 2**28 parameters (1 GiB, plus Adam's)
_MAX_LAYERS = 64


def _check_positive(args: argparse.Namespace, *names: str) -> None:
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


def _check_rows(num_points: int, fraction: float, subject: str) -> None:
    num_heldout = _num_heldout(num_points, fraction)
    if num_heldout < _MIN_HELDOUT_ROWS or num_points - num_heldout < _MIN_TRAIN_ROWS:
        raise UsageError(
            subject,
            f"{num_points} rows are too few to hold out {fraction:g} of them: need at least "
            f"{_MIN_TRAIN_ROWS} training and {_MIN_HELDOUT_ROWS} held-out rows; add rows or "
            "change --validation-fraction",
        )


def _check_seed(args: argparse.Namespace) -> None:
    if args.seed is not None and not 0 <= args.seed <= _MAX_VALUE["seed"]:
        raise UsageError(
            "--seed", f"must be between 0 and {_MAX_VALUE['seed']}, got {args.seed}; e.g. --seed 0"
        )


def _train_config(args: argparse.Namespace) -> tuple[dict, np.ndarray | None, str | None]:
    """Check the options and the data file: ``(config, points, data path)``. No JAX compute."""
    _check_positive(
        args,
        "steps",
        "chains",
        "mcmc_steps",
        "batch_size",
        "learning_rate",
        "checkpoint_every",
        "num_data",
    )
    _check_seed(args)
    hidden = _parse_hidden(args.hidden)
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
            data = {"name": "digits", "standardized": False}
        else:
            num_points = args.num_data or 50_000
            _check_rows(num_points, args.validation_fraction, "--num-data")
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
        points, names = _read_points(args.data, columns)
        _check_rows(len(points), args.validation_fraction, args.data)
        _check_columns(points, names, args.data, args.seed, args.validation_fraction)
        data = {
            "name": "file",
            "sha256": _sha256(path),
            "columns": names,
            "shape": list(points.shape),
            "standardized": True,
        }
    config = {
        "data": data,
        "steps": args.steps,
        "hidden": hidden,
        "sampler": args.sampler,
        "negatives": args.negatives,
        "chains": args.chains,
        "mcmc_steps": args.mcmc_steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "validation_fraction": None if args.data == "digits" else args.validation_fraction,
        "seed": args.seed,
    }
    return _jsonable(config), points, path


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


def _make_folders(out: str) -> list[str]:
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
        _remove_created(created, [])
        raise UsageError(
            "--out",
            f"{out} cannot be created ({err.strerror}: {err.filename}); pick a folder you can "
            "write to",
        ) from err
    return created


def _remove_created(folders: list[str], entries: list[str]) -> None:
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


def _check_settings(out: str, existing: dict | None, config: dict) -> None:
    if existing is not None and existing["config"] != config:
        raise UsageError(
            out,
            f"holds a run with other settings ({_config_differences(existing['config'], config)})"
            f"; pick another --out, or delete {out} to start again",
        )


def _started(out: str) -> bool:
    """Whether the run in ``out`` has a checkpoint (a damaged one counts: it is kept)."""
    try:
        return _checkpoint_step(out) is not None
    except ebm.CheckpointError:
        return True


def _train(args: argparse.Namespace, argv: list[str]) -> int:
    config, points, path = _train_config(args)
    _check_settings(args.out, _existing_run(args.out), config)
    created = _make_folders(args.out)
    before = set(os.listdir(args.out))
    # a FolderLockedError leaves even a folder created here: the holder writes into it now
    with _io.folder_lock(args.out):
        return _train_locked(args, argv, config, points, path, created, before)


def _train_locked(args, argv, config, points, path, created: list[str], before: set) -> int:
    """``train`` while this process holds ``--out``'s lock. What an error path removes is only
    what this invocation created, and only while the run has no checkpoint."""
    out = args.out
    existing = _existing_run(out)  # again: another writer may have finished meanwhile
    _check_settings(out, existing, config)
    if existing is not None and existing.get("diverged") is not None:
        print(_diverged_message(out, existing["diverged"]["step"]), file=sys.stderr)
        return EXIT_DIVERGED
    start_step = _checkpoint_step(out)

    def discard_unstarted():
        if existing is None and not _started(out):
            new = [os.path.join(out, name) for name in os.listdir(out) if name not in before]
            _remove_created(created, [] if created else new)

    # all checks done: compute from here on
    try:
        data = _prepare(config, points, existing and existing["standardization"])
        if existing is None:
            run = _new_run(config, data, argv, path)
            _write_json(os.path.join(out, RUN_FILE), run)
        else:
            run = existing
        source = run["data_path"] or config["data"]["name"]
        if start_step and start_step >= config["steps"]:
            print(f"{out} is trained already ({start_step} steps): recomputing its metrics")
        elif start_step:
            print(f"Resuming {out} from step {start_step} of {config['steps']}")
        else:
            print(
                f"Training an MLP energy on {source} ({len(data.train)} points, "
                f"{len(data.validation)} held out) for {config['steps']} steps -> {out}"
            )
        start = time.perf_counter()
        res = _fit(
            config,
            data,
            out,
            progress_bar=not args.quiet,
            checkpoint_every=args.checkpoint_every,
        )
    except KeyboardInterrupt:
        try:
            step = _checkpoint_step(out)
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
    except TrainingDivergedError as err:
        step = int(err.state.step)
        _write_json(os.path.join(out, RUN_FILE), {**run, "diverged": {"step": step}})
        print(_diverged_message(out, step), file=sys.stderr)
        return EXIT_DIVERGED
    except BaseException as err:
        discard_unstarted()
        if isinstance(err, ValueError) and not isinstance(err, ebm.CheckpointError):
            raise UsageError(out, f"{err}; change the settings") from err
        raise
    seconds = time.perf_counter() - start
    step = int(res.state.step)
    log_z = _log_z(res, data, "auto", _run_key(config, _LOG_Z))
    entry = _heldout(res, data, data.validation, log_z)
    updates = {"heldout": {"validation": {log_z.method: entry}}}
    if data.toy is not None:
        updates["kl_to_toy"] = _kl(res, data, _run_key(config, _KL))
    _update_metrics(out, step, updates)
    history = res.history
    rows = [
        ("data", f"{source} ({'standardized' if data.mean is not None else 'as is'})"),
        ("steps", f"{step}"),
        *_heldout_rows(entry, _split_name(config)),
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
    print()
    _print_table(rows)
    print(f"\nwrote {os.path.join(out, METRICS_FILE)}")
    report, density = os.path.join(out, REPORT_FILE), os.path.join(out, DENSITY_FILE)
    if not args.no_report:
        _write_or_warn(REPORT_FILE, lambda: _write_report(res, data, config, report))
        if data.train.shape[1] == 2:
            _write_or_warn(DENSITY_FILE, lambda: _density_plot(res, data, density))
    return EXIT_OK


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


def _new_run(config: dict, data: _Data, argv: list[str], path: str | None) -> dict:
    """The ``run.json`` of a new run."""
    return {
        "format": RUN_FORMAT,
        "command": shlex.join(["numpyro-ebm", *argv]),
        "config": config,
        "data_path": path,
        "standardization": None
        if data.mean is None
        else {"mean": data.mean.tolist(), "std": data.std.tolist()},
        "event_shape": list(data.train.shape[1:]),
        "split": {"train": len(data.train), "validation": len(data.validation)},
        "versions": {
            "numpyro_ebm": ebm.__version__,
            "jax": jax.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
    }


def _write_report(res, data: _Data, config: dict, path: str) -> str:
    coordinates = ", standardized coordinates" if data.mean is not None else ""
    title = (
        f"numpyro-ebm run on {config['data']['name']}: {config['negatives']} negatives, "
        f"{config['sampler']}{coordinates}"
    )
    key = _run_key(config, _KL) if data.toy is not None else None
    return diagnostics.report(res, path, data=data.train, toy=data.toy, key=key, title=title)


def _density_plot(res, data: _Data, path: str) -> str:
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


def _evaluate(args: argparse.Namespace) -> int:
    _check_seed(args)
    run, points = _load_run(args.dir)
    config = run["config"]
    dim = run["event_shape"][0]
    if args.log_z == "grid" and dim > 3:
        raise UsageError(
            "--log-z", f"grid quadrature works in up to 3 dimensions, the run has {dim}; use ais"
        )
    extra = None
    if args.data is not None:
        extra, _ = _read_points(args.data, config["data"].get("columns"), wanted_by="the run")
        if extra.shape[1] != dim:
            names = config["data"].get("columns")
            raise UsageError(
                args.data,
                f"has {extra.shape[1]} columns, the run was trained on {dim}"
                + (f" ({', '.join(names)})" if names else "")
                + "; pass data with the same columns",
            )
        if len(extra) < _MIN_HELDOUT_ROWS:
            raise UsageError(
                args.data, "has fewer than 2 rows; pass at least 2 (for a standard error)"
            )
    with _io.folder_lock(args.dir):
        return _evaluate_locked(args, run, points, extra)


def _evaluate_locked(args: argparse.Namespace, run: dict, points, extra) -> int:
    config = run["config"]
    data = _prepare(config, points, run["standardization"])
    res = _fit(config, data, args.dir)
    key = _run_key(config, _LOG_Z, args.seed)
    log_z = _log_z(res, data, args.log_z, key)
    if extra is None:
        name, what, points_model = "validation", _split_name(config), data.validation
    else:
        name = what = os.path.abspath(args.data)
        points_model = _file_to_model(data, extra, config["data"].get("columns"), args.data)
    entry = _heldout(res, data, points_model, log_z)
    updates = {"heldout": {name: {log_z.method: entry}}}
    rows = [("run", f"{args.dir} (step {int(res.state.step)})"), *_heldout_rows(entry, what)]
    if data.toy is not None and extra is None:
        kl = updates["kl_to_toy"] = _kl(res, data, _run_key(config, _KL, args.seed))
        rows.append(("KL(toy ‖ model) (nats)", f"{kl['kl']:.4f} ± {kl['kl_stderr']:.4f}"))
    _update_metrics(args.dir, int(res.state.step), updates)
    _print_table(rows)
    print(f"\nwrote {os.path.join(args.dir, METRICS_FILE)}")
    return EXIT_OK


def _check_output_file(path: str, example: str) -> None:
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


def _sample(args: argparse.Namespace) -> int:
    _check_positive(args, "num", "mcmc_steps")
    _check_seed(args)
    if not args.out.endswith(".npy"):
        raise UsageError("--out", f"{args.out!r} does not end in .npy; e.g. --out samples.npy")
    _check_output_file(args.out, "samples.npy")
    _, data, res = _restore(args.dir)
    model = ebm.EnergyDistribution(
        res.energy,
        res.event_shape,
        sampler=res.config.sampler,
        draws=samplers.DrawSettings(num_warmup=args.mcmc_steps),
        initializer=res.generator,
    )
    draws = data.to_original(model.sample(jax.random.key(args.seed), (args.num,)))
    _io.atomic_write(args.out, lambda f: np.save(f, draws))
    print(
        f"wrote {args.num} samples ({args.mcmc_steps} MCMC warm-up steps per chain; "
        f"approximate) to {args.out}"
    )
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    path = args.out or os.path.join(args.dir, REPORT_FILE)
    if os.path.splitext(path)[1].lower() not in (".html", ".md"):
        raise UsageError("--out", f"{path!r} must end in .html or .md; e.g. --out report.md")
    if args.out is not None:
        _check_output_file(path, "report.html")
    run, data, res = _restore(args.dir)
    print(f"wrote {_write_report(res, data, run['config'], path)}")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    _check_positive(args, "steps", "num_data")
    _check_seed(args)
    if os.path.lexists(args.out) and not os.path.isdir(args.out):
        raise UsageError("--out", f"{args.out} is a file; pass a folder for the plot")
    created = _make_folders(args.out)
    try:
        return _demo_run(args)
    except BaseException:
        _remove_created(created, [])
        raise


def _demo_run(args: argparse.Namespace) -> int:
    toy = datasets.toy(args.toy)
    key = jax.random.key(args.seed)
    k_data, k_energy, k_fit, k_test = jax.random.split(key, 4)
    data = toy.sample(k_data, args.num_data)
    energy = ebm.energies.MLPEnergy(2, key=k_energy)
    print(f"Training an MLP energy on {args.toy} ({args.num_data} points, {args.steps} steps)")
    start = time.perf_counter()
    res = ebm.fit(energy, data, key=k_fit, num_steps=args.steps, progress_bar=not args.quiet)
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="numpyro-ebm",
        description="Train, evaluate and sample energy-based models (numpyro_ebm).",
        epilog="Exit codes: 0 done, 1 training diverged, 2 bad input or settings (one line), "
        "3 internal error (traceback written to a file), 130 interrupted.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, help):
        return sub.add_parser(name, help=help, description=help)

    train = command("train", "train an MLP energy and write a run folder (rerun to resume)")
    train.add_argument(
        "--data",
        required=True,
        metavar="SOURCE",
        help=f"built-in data set ({', '.join(BUILTIN)}) or a .npy/.csv file of points",
    )
    train.add_argument("--out", required=True, metavar="DIR", help="run folder")
    train.add_argument(
        "--steps", type=int, default=2000, metavar="N", help="training steps (default: %(default)s)"
    )
    train.add_argument(
        "--hidden",
        default="128,128,128",
        metavar="W,W",
        help="MLP layer widths (default: %(default)s)",
    )
    train.add_argument(
        "--sampler",
        default="mala",
        choices=samplers.KERNELS,
        help="negative-phase kernel (default: %(default)s)",
    )
    train.add_argument(
        "--negatives",
        default="persistent",
        choices=NEGATIVES,
        help="where negatives come from (default: %(default)s)",
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
        help="steps between checkpoints (may change when resuming) (default: %(default)s)",
    )
    train.add_argument("--no-report", action="store_true", help="skip report.html and density.png")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    ev = command("evaluate", "held-out log-likelihood of a trained run")
    ev.add_argument("dir", metavar="DIR", help="run folder")
    ev.add_argument(
        "--data",
        metavar="PATH",
        help=".npy/.csv file with the run's columns (default: the validation split)",
    )
    ev.add_argument(
        "--log-z",
        default="auto",
        choices=("auto", "grid", "ais", "learned"),
        help="log Z estimator; auto: grid in up to 3 dimensions, else AIS (default: %(default)s)",
    )
    ev.add_argument(
        "--seed", type=int, metavar="S", help="seed of the AIS and KL keys (default: the run's)"
    )

    sample = command("sample", "draw approximate samples of a trained model into a .npy file")
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

    report = command("report", "re-render the report of a trained run")
    report.add_argument("dir", metavar="DIR", help="run folder")
    report.add_argument(
        "--out", metavar="PATH", help=".html or .md file (default: DIR/report.html)"
    )

    demo = command("demo", "train on a 2-D toy and print the evaluation table")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``numpyro-ebm``; returns the exit code (see the module docstring).

    No exception escapes except argparse's ``SystemExit`` (code 2, for a malformed option)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            return _train(args, argv)
        return {"evaluate": _evaluate, "sample": _sample, "report": _report, "demo": _demo}[
            args.command
        ](args)
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


if __name__ == "__main__":
    sys.exit(main())
