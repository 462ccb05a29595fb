"""The user's data file: reading ``.npy`` and ``.csv`` files, checking their columns, the run's
random split and the map to model coordinates (columns recorded on a grid are dequantized as
in ``numpyro_ebm.tables``, then every column is standardized).

Every check raises ``UsageError`` naming the file (and line or column) before any training;
``prepare`` turns a run's settings into its data.

Example:
    >>> points, names = read_points("data.csv")            # (n, d) floats, column names
    >>> check_columns(points, names, "data.csv", seed=0, fraction=0.1)
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import math
import os
import stat

import jax
import numpy as np

from numpyro_ebm import bounded, datasets, tables
from numpyro_ebm.cli._common import (
    KEY_DATA,
    KEY_DEQUANTIZE,
    KEY_SPLIT,
    MIN_HELDOUT_ROWS,
    MIN_TRAIN_ROWS,
    TOYS,
    UsageError,
)
from numpyro_ebm.validation import validate_data


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


def _as_floats(points: np.ndarray, path: str) -> np.ndarray:
    """Floats in their own precision (whose grid ``tables.quantum`` judges in it) and integers
    as float64 (as a CSV's numbers are read), in native byte order; others refused."""
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
    return points.astype(points.dtype.newbyteorder("=") if kind == "f" else np.float64)


def _read_npy(path: str) -> np.ndarray:
    """A ``.npy`` file's 2-D array as floats (``_as_floats``), its header checked against the
    file's size before any array is allocated."""
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
    return _as_floats(points, path)


def _read_csv(path: str, columns: list[str] | None, wanted_by: str) -> tuple[np.ndarray, list]:
    """Numeric columns of a CSV file with a header row: ``(values (n, d) float64, names)``.

    Errors name the file's line (1-based, as an editor counts them: the header, empty lines
    and every line of a quoted multi-line field count)."""
    lines = _csv_lines(path)
    header = _csv_header(path, lines)
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
    return _csv_values(path, [number for number, _ in rows], cells, names, columns), list(names)


def _csv_lines(path: str) -> list[tuple[int, list[str]]]:
    """The non-empty rows of a CSV file, each with the number of the line it starts on
    (spaces after a comma are skipped, so that ``1, "2"`` holds the number 2)."""
    try:
        with (
            _open_data(path) as binary,
            io.TextIOWrapper(binary, encoding="utf-8-sig", newline="") as f,
        ):
            reader, lines, first = csv.reader(f, skipinitialspace=True), [], 1
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
    return lines


def _csv_header(path: str, lines: list[tuple[int, list[str]]]) -> list[str]:
    """The column names of the first row, checked: commas, a header, distinct names."""
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
    return header


def _csv_values(path: str, numbers: list[int], cells: np.ndarray, names, columns) -> np.ndarray:
    """``cells`` (n, d) strings, on lines ``numbers``, as finite float64 values."""
    try:
        values = cells.astype(np.float64)
    except ValueError:
        values = None
    if values is None:
        for j, name in enumerate(names):
            for number, cell in zip(numbers, cells[:, j], strict=True):
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
            f"column {names[j]!r} holds {str(cells[i, j])!r} on line {numbers[i]}, not a finite "
            f"number (NaN or infinity; {int(bad.any(axis=1).sum())} such lines); remove or fill "
            "in those lines",
        )
    return values


def read_points(
    path: str, columns: list[str] | None = None, *, wanted_by: str = "--columns"
) -> tuple[np.ndarray, list | None]:
    """A user's data file as ``(points (n, d), column names or None)``, checked: float64, or
    a ``.npy`` file's float32 or float16 values as they are."""
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


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _heldout_count(num_points: int, fraction: float) -> int:
    return round(num_points * fraction)


def check_rows(num_points: int, fraction: float, subject: str) -> None:
    num_heldout = _heldout_count(num_points, fraction)
    if num_heldout < MIN_HELDOUT_ROWS or num_points - num_heldout < MIN_TRAIN_ROWS:
        raise UsageError(
            subject,
            f"{num_points} rows are too few to hold out {fraction:g} of them: need at least "
            f"{MIN_TRAIN_ROWS} training and {MIN_HELDOUT_ROWS} held-out rows; add rows or "
            "change --validation-fraction",
        )


def _split(seed: int, num_points: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The run's random split: ``(training row indices, held-out row indices)``."""
    key = jax.random.fold_in(jax.random.key(seed), KEY_SPLIT)
    order = np.asarray(jax.random.permutation(key, num_points))
    num_heldout = _heldout_count(num_points, fraction)
    return order[num_heldout:], order[:num_heldout]


def training_shape(data: dict, points: np.ndarray | None, fraction: float) -> tuple:
    """``(rows, columns)`` the model trains on, from the config's ``data`` entry (``prepare``
    makes the same split; nothing is computed; digits' split is fixed, ``fraction`` unused)."""
    if data["name"] == "digits":
        rows = len(datasets.digits().train)
        return (rows - DIGITS_VALIDATION if data.get("space") == "logit" else rows), 64
    num_points, dim = (data["num_points"], 2) if points is None else points.shape
    return num_points - _heldout_count(num_points, fraction), dim


def check_columns(points: np.ndarray, names, path: str, seed: int, fraction: float) -> None:
    """Refuse a data file whose columns cannot be standardized with the statistics of the
    training rows of the run's split (``seed``, ``fraction``): a constant column, a column with
    2 distinct values not on a grid (a gridded one, such as a 0/1 flag, is dequantized into a
    continuous density), a spread float64
    cannot hold, or a value (in any row) that lands beyond float32's range in model
    coordinates."""
    train = points[_split(seed, len(points), fraction)[0]]
    drop = "leave it out with --columns" if names else "numpy.delete it (axis=1)"

    def column(j) -> str:
        return f"column {names[j]!r}" if names else f"column {j}"

    low, high = train.min(axis=0), train.max(axis=0)
    third_value = np.any((train > low) & (train < high), axis=0)
    quanta = tables.column_quanta(train)
    for j in range(points.shape[1]):
        if low[j] == high[j]:
            raise UsageError(
                path,
                f"{column(j)} is constant in the training rows (all {low[j]:g}), it cannot "
                f"be standardized; {drop}",
            )
        if not third_value[j] and quanta[j] == 0:
            raise UsageError(
                path,
                f"{column(j)} takes only 2 distinct values in the training rows ({low[j]:g} "
                f"and {high[j]:g}), not on a grid of whole numbers or decimals that could be "
                f"dequantized: it has no continuous density; {drop}",
            )
    mean, std = tables.dequantized_moments(train, quanta)
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


def file_to_model(data: Data, points: np.ndarray, names, path: str, *, key) -> np.ndarray:
    """``data.to_model(points, key=key)`` for the points of a user's file, checked first."""
    if data.box is not None:
        outside = ~np.isfinite(np.asarray(data.box.box.inv(np.asarray(points, np.float32))))
        if outside.any():
            i, j = np.argwhere(outside)[0]
            raise UsageError(
                path,
                f"holds {points[i, j]:g} in row {i}, column {j}, outside the run's box (digits' "
                "scaled pixels lie in (-1, 1)); pass points scaled like datasets.digits()",
            )
        return data.to_model(points)
    mean, std = (np.zeros(points.shape[1]), 1.0) if data.mean is None else (data.mean, data.std)
    _check_standardizable(points, mean, np.broadcast_to(std, mean.shape), names, path)
    return data.to_model(points, key=key)


@dataclasses.dataclass
class Data:
    """A run's data in model coordinates (dequantized and standardized for user files; for
    digits, off its box by the logit map and standardized) and the map back. ``quantum``
    (d,): each column's recording grid, 0 for a continuous column (None for a run that does
    not dequantize); ``box``: digits' ``bounded.BoxCoordinates``; ``test``: a split neither
    trained on nor used to select the model (digits' test split), reported instead of
    ``validation`` when there is one."""

    train: np.ndarray
    validation: np.ndarray
    toy: datasets.ToyDensity | None = None
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    quantum: np.ndarray | None = None
    box: bounded.BoxCoordinates | None = None
    test: np.ndarray | None = None

    @property
    def heldout(self) -> tuple[str, np.ndarray]:
        """``(name, points)`` of the split the held-out score is reported on."""
        return ("validation", self.validation) if self.test is None else ("test", self.test)

    @property
    def dequantizes(self) -> bool:
        return self.quantum is not None and bool(np.any(self.quantum > 0))

    def to_model(self, points, *, key=None) -> np.ndarray:
        """Recorded points (n, d) to model coordinates; ``key`` draws the dequantization
        noise ``U[0, q)`` of the gridded columns (needed when there are any)."""
        if self.box is not None:  # digits: dequantized on its box already
            return self.box.to_model(points)[0]
        if self.dequantizes:
            if key is None:
                raise ValueError("dequantizing needs a key")
            points = tables.dequantize(points, self.quantum, key=key)  # in their precision
        points = np.asarray(points, np.float64)
        if self.mean is not None:
            points = (points - self.mean) / self.std
        return points.astype(np.float32)

    def to_original(self, points, *, on_grid: bool = False) -> np.ndarray:
        """Model coordinates to the original units; ``on_grid``: gridded columns are put back
        on their grid (the cell ``[v, v + q)`` a value falls in gives ``v``)."""
        if self.box is not None:
            return self.box.to_original(points)
        if on_grid and self.dequantizes:  # dequantized data is standardized
            transform = tables.TableTransform(self.quantum, self.mean, self.std)
            return transform.to_original(points, on_grid=True)
        points = np.asarray(points, np.float64)
        return points if self.mean is None else self.mean + self.std * points

    def redequantizer(self):
        """``fit``'s ``augment`` drawing new dequantization noise for every training batch
        (``tables.TableTransform.redequantizer``), or None when nothing is dequantized."""
        if self.box is not None:
            return self.box.redequantizer()
        if not self.dequantizes:
            return None
        return tables.TableTransform(self.quantum, self.mean, self.std).redequantizer()

    @property
    def log_cell_volume(self) -> float:
        """``Σ log q`` over the gridded columns: the recorded values' log-probability is at
        least the dequantized log-density plus this (Jensen)."""
        q = np.zeros(0) if self.quantum is None else self.quantum[self.quantum > 0]
        return math.fsum(np.log(q))

    @property
    def log_jacobian(self) -> float:
        """``log |dz/dx| = −Σ log std``: add it to a model log-density to get the original
        units' one (float64 logs of float64 standard deviations, correctly rounded sum)."""
        return 0.0 if self.std is None else -math.fsum(np.log(self.std))

    def log_jacobian_at(self, points) -> float | np.ndarray:
        """``log_jacobian``, or per point ``(n,)`` for model coordinates ``points`` off a box
        (``bounded.BoxCoordinates.log_jacobian``)."""
        return self.log_jacobian if self.box is None else self.box.log_jacobian(points)

    @property
    def units(self) -> str:
        """The units held-out scores are reported in."""
        if self.box is not None:
            return "box"
        return "original" if self.mean is not None else "data"


DIGITS_VALIDATION = 300
"""Digits' validation split: the last rows of ``datasets.digits().train`` (as in
benchmarks/real_data.py)."""


def _digits(entry: dict) -> Data:
    """Digits off its box (``"space": "logit"``): the training split less its last
    ``DIGITS_VALIDATION`` rows, which select the model, the test split reported. Runs made
    before that (no ``"space"``) trained on the box and selected on the test split."""
    digits = datasets.digits()
    if entry.get("space") != "logit":
        return Data(digits.train, digits.test)
    train = digits.train[:-DIGITS_VALIDATION]
    box = bounded.BoxCoordinates.fit(train, bounded.logit_box(-1.0, 1.0), grid=datasets.DIGITS_GRID)
    train, validation, test = (
        box.to_model(rows)[0] for rows in (train, digits.train[-DIGITS_VALIDATION:], digits.test)
    )
    return Data(train, validation, box=box, test=test)


def prepare(config: dict, points: np.ndarray | None, standardization: dict | None) -> Data:
    """Sample/load, split, dequantize and standardize the run's data (deterministic in
    ``config``: the dequantization noise comes from the run's seed)."""
    key = jax.random.key(config["seed"])
    name = config["data"]["name"]
    if name == "digits":
        return _digits(config["data"])
    toy = None
    if name in TOYS:
        toy = datasets.toy(name)
        points = toy.sample(jax.random.fold_in(key, KEY_DATA), config["data"]["num_points"])
    points = np.asarray(points)
    train_rows, heldout_rows = _split(config["seed"], len(points), config["validation_fraction"])
    train, validation = points[train_rows], points[heldout_rows]
    if not config["data"]["standardized"]:
        return Data(train.astype(np.float32), validation.astype(np.float32), toy)
    if standardization is None:
        # grids in the file's precision, moments in float64; columns that cannot be
        # standardized were refused (check_columns)
        dequantize = config["data"].get("dequantize", False)
        quanta = tables.column_quanta(train) if dequantize else np.zeros(train.shape[1])
        mean, std = tables.dequantized_moments(train, quanta)
    else:
        mean = np.asarray(standardization["mean"], np.float64)
        std = np.asarray(standardization["std"], np.float64)
        # a run made before dequantization existed has no "quantum": it does not dequantize
        quanta = np.asarray(standardization.get("quantum", np.zeros(len(mean))), np.float64)
    data = Data(train, validation, None, mean, std, quanta)
    noise = jax.random.fold_in(key, KEY_DEQUANTIZE)
    data.train = data.to_model(train, key=jax.random.fold_in(noise, 0))
    data.validation = data.to_model(validation, key=jax.random.fold_in(noise, 1))
    return data
