"""The command line's data files: what is read, how it is standardized, and one-line refusals.

Every refusal is checked the same way: exit code 2, ONE line ``numpyro-ebm: error: <file>: ...``
on stderr and nothing else, nothing on stdout, nothing created under ``--out``, and no warning
raised on the way (warnings are turned into errors around the call).
"""

import json
import math
import os
import subprocess
import sys
import threading
import warnings

import jax
import numpy as np
import pytest

import numpyro_ebm
from numpyro_ebm import cli

TINY = [
    "--steps", "40", "--chains", "64", "--batch-size", "64", "--mcmc-steps", "5",
    "--hidden", "16,16", "--checkpoint-every", "20", "--quiet", "--no-report",
]  # fmt: skip
NUM_ROWS = 300
FRACTION = 0.1  # the default --validation-fraction


def points(seed=0, n=NUM_ROWS, d=2):
    return np.random.default_rng(seed).normal(size=(n, d))


def heldout_rows(n=NUM_ROWS, seed=0):
    """The held-out row indices of a run with --seed ``seed``: the split's contract."""
    key = jax.random.fold_in(jax.random.key(seed), cli.data_files.KEY_SPLIT)
    return np.asarray(jax.random.permutation(key, n))[: round(n * FRACTION)]


def train_config(seed=0):
    return {
        "seed": seed,
        "data": {"name": "file", "standardized": True},
        "validation_fraction": FRACTION,
    }


def write_csv(path, header, rows):
    path.write_text(",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def run_cli(capsys, *argv):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning printed before the error line fails here
        code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(tmp_path, capsys, data, *options, what=()):
    """``train --data data`` exits 2 with one line naming ``data``; nothing is created."""
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--data", data, *options, "--out", out_dir, *TINY)
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"numpyro-ebm: error: {data}: "), err
    assert "; " in lines[0]  # what is wrong; what to do
    for text in (what,) if isinstance(what, str) else what:
        assert text in lines[0], err
    assert out == ""
    assert not out_dir.exists()
    return lines[0]


# -- C9: standardization ---------------------------------------------------------------------


def test_statistics_are_float64_over_the_training_rows():
    # float32 values far from 0: a float32 mean would be off by ~1e-4 of the spread
    x = (1e4 + points(1)).astype(np.float32)
    data = cli.data_files.prepare(train_config(), x, None)
    train = np.delete(x, heldout_rows(), axis=0).astype(np.float64)
    assert data.mean.dtype == np.float64 and data.std.dtype == np.float64
    np.testing.assert_allclose(data.mean, train.mean(axis=0), rtol=1e-15)
    np.testing.assert_allclose(data.std, train.std(axis=0), rtol=1e-13)


def test_a_column_constant_in_the_training_rows_is_refused(tmp_path, capsys):
    x = points()
    x[:, 1] = 3.0
    x[heldout_rows()[:2], 1] = [4.0, 5.0]  # three values in the file, one in the training rows
    path = write_csv(tmp_path / "data.csv", ["x", "y"], x)
    assert_refused(tmp_path, capsys, path, what=("column 'y'", "constant in the training rows"))


@pytest.mark.parametrize("kind", ["csv", "npy"])
def test_a_two_valued_column_off_any_grid_is_refused(tmp_path, capsys, kind):
    x = points()
    x[:, 0] = np.where(x[:, 0] > 0, 0.1234567, 0.7654321)  # 7 decimals: not on a grid
    if kind == "csv":
        path, column = write_csv(tmp_path / "data.csv", ["flag", "y"], x), "column 'flag'"
    else:
        path, column = tmp_path / "data.npy", "column 0"
        np.save(path, x)
    assert_refused(tmp_path, capsys, path, what=(column, "2 distinct values"))


def test_gridded_columns_are_dequantized_a_flag_included(tmp_path, capsys):
    """A 0/1 flag, a count and lengths in 0.1 are dequantized (each value spread over its
    cell), a continuous column is not; evaluate adds the bound on the recorded values'
    probability; samples come back on the columns' grids."""
    rng = np.random.default_rng(11)
    x = np.column_stack(
        [
            rng.integers(0, 2, NUM_ROWS),
            rng.poisson(4.0, NUM_ROWS),
            np.round(rng.normal(size=NUM_ROWS), 1),
            rng.normal(size=NUM_ROWS),
        ]
    )
    path = write_csv(tmp_path / "data.csv", ["flag", "count", "length", "z"], x)
    out = tmp_path / "run"
    code, printed, err = run_cli(capsys, "train", "--data", path, "--out", out, *TINY)
    assert code == 0, err
    assert "3 gridded column(s) dequantized, standardized" in printed
    run = json.loads((out / "run.json").read_text())
    assert run["standardization"]["quantum"] == [1.0, 1.0, 0.1, 0.0]
    assert run["config"]["patience"] == 100  # the default: a quarter of --steps, at least 100
    assert run["config"]["data"]["fresh_noise"]  # new noise for every training batch
    assert run["config"]["noise"] == 0.1  # 270 training rows, under 100 per column
    checkpoints = out / cli.CHECKPOINT_DIR
    meta = json.loads(next(checkpoints.glob("*/meta.json")).read_text())
    assert meta["augment"] == "numpyro_ebm.tables.with_noise.<locals>.noisy"
    data = cli.data_files.prepare(run["config"], x, run["standardization"])
    # the training rows in original units lie in their cells [v, v + q); z is untouched
    train = x[cli.data_files._split(0, NUM_ROWS, FRACTION)[0]]  # in the split's order
    back = data.to_original(data.train)
    q = np.array([1.0, 1.0, 0.1, 0.0])
    assert np.all(back >= train - 1e-5) and np.all(back <= train + q + 1e-5)
    np.testing.assert_allclose(back[:, 3], train[:, 3], atol=1e-5)
    assert np.all(np.abs(back - train)[:, :3].max(axis=0) > 0.5 * q[:3])  # noise was added
    # the same run's data again: the same noise (resuming sees the same training rows)
    again = cli.data_files.prepare(run["config"], x, run["standardization"])
    np.testing.assert_array_equal(again.train, data.train)
    code, printed, err = run_cli(capsys, "evaluate", out)
    assert code == 0, err
    (entry,) = json.loads((out / "metrics.json").read_text())["heldout"]["validation"].values()
    assert entry["log_cell_volume"] == pytest.approx(math.log(0.1), rel=1e-12)
    assert f"{entry['log_likelihood'] + math.log(0.1):.4f} nats per point" in printed
    assert "log P(recorded values) ≥" in printed
    code, _, err = run_cli(capsys, "sample", out, "--num", 50, "--out", tmp_path / "s.npy")
    assert code == 0, err
    draws = np.load(tmp_path / "s.npy")
    np.testing.assert_array_equal(draws[:, :2], np.round(draws[:, :2]))
    np.testing.assert_allclose(draws[:, 2] * 10, np.round(draws[:, 2] * 10), atol=1e-9)
    assert len(np.unique(draws[:, 3])) == 50  # the continuous column stays continuous


@pytest.mark.parametrize(
    ("rows", "columns", "option", "expected"),
    [
        (300, 6, None, 0.1),  # 270 training rows < 600
        (300, 6, "auto", 0.1),
        (300, 2, None, 0.0),  # 270 >= 200: no noise
        (221, 2, None, 0.1),  # 22 held out: 199 training rows (the rule's edge)
        (222, 2, None, 0.0),  # 22 held out: 200 training rows
        (300, 6, "0", 0.0),
        (300, 2, "0.25", 0.25),
    ],
)
@pytest.mark.parametrize("name", ["noise", "weight_decay"])
def test_noise_and_weight_decay_follow_the_training_rows_per_column(
    tmp_path, rows, columns, option, expected, name
):
    """``--noise`` and ``--weight-decay`` by default: ``tables.default_noise`` and
    ``tables.default_weight_decay`` of the training split (checked before any compute; the
    rule's edge at 100 rows per column of the rows left after holding out)."""
    path = tmp_path / "data.npy"
    np.save(path, points(n=rows, d=columns))
    argv = ["train", "--data", str(path), "--out", str(tmp_path / "run")]
    argv += [] if option is None else ["--" + name.replace("_", "-"), option]
    config, _, _ = cli.parser.train_config(cli.parser.make_parser().parse_args(argv))
    assert config[name] == expected


def _fit_arguments(tmp_path, monkeypatch):
    """``(run config, its data, the keyword arguments its ``fit`` got)`` for a 300 × 6 table."""
    path = tmp_path / "data.npy"
    np.save(path, points(n=300, d=6))
    argv = ["train", "--data", str(path), "--out", str(tmp_path / "run")]
    config, rows, _ = cli.parser.train_config(cli.parser.make_parser().parse_args(argv))
    data = cli.data_files.prepare(config, rows, None)
    seen = {}
    monkeypatch.setattr(numpyro_ebm, "fit", lambda *args, **kwargs: seen.update(kwargs))
    cli.commands._fit(config, data, str(tmp_path / "run"))
    return config, data, seen


def test_the_weight_decay_reaches_fit(tmp_path, monkeypatch):
    """The run's ``fit`` gets the stored decay (``TrainConfig.weight_decay``), and a run made
    before ``--weight-decay`` existed (no entry) gets none."""
    config, data, seen = _fit_arguments(tmp_path, monkeypatch)
    assert seen["weight_decay"] == config["weight_decay"] == 0.1
    del config["weight_decay"]
    cli.commands._fit(config, data, str(tmp_path / "run"))  # the monkeypatched fit
    assert seen["weight_decay"] == 0.0


def test_the_noise_reaches_fit_as_gaussian_noise_on_every_batch(tmp_path, monkeypatch):
    """The run's ``fit`` gets ``tables.with_noise`` of the stored scale: on continuous columns
    (nothing dequantized) it adds noise of that standard deviation and no other change."""
    _, _, seen = _fit_arguments(tmp_path, monkeypatch)
    batch = jax.numpy.full((20_000, 6), 3.0)
    moved = np.asarray(seen["augment"](jax.random.key(0), batch), np.float64) - 3.0
    n = moved.size  # the sample sd's standard error is about 0.1 / sqrt(2n)
    assert abs(moved.mean()) < 5 * 0.1 / math.sqrt(n)
    assert abs(moved.std() - 0.1) < 5 * 0.1 / math.sqrt(2 * n)


@pytest.mark.parametrize("scale", [1e200, 1e-300, 1e307])
def test_extreme_scales_standardize_exactly(scale):
    x = points(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reference = cli.data_files.prepare(train_config(), x, None)
        scaled = cli.data_files.prepare(train_config(), x * scale, None)
    # the same model data (float32 rounding of the same float64 values, up to a few ulps)
    np.testing.assert_allclose(scaled.train, reference.train, rtol=0, atol=1e-6)
    np.testing.assert_allclose(scaled.validation, reference.validation, rtol=0, atol=1e-6)
    np.testing.assert_allclose(scaled.std, reference.std * scale, rtol=1e-14)
    # the log-Jacobian −Σ log σ moves by exactly −d log(scale)
    expected = reference.log_jacobian - 2 * math.log(scale)
    assert scaled.log_jacobian == pytest.approx(expected, rel=1e-14, abs=1e-12)


def test_values_whose_spread_overflows_are_refused(tmp_path, capsys):
    # most values near +1.7e308, every fifth near -1.7e308: x − mean overflows float64
    x = points()
    x[:, 1] = 1.7e308 * (1 - 0.01 * np.random.default_rng(7).uniform(size=NUM_ROWS))
    x[::5, 1] *= -1
    path = write_csv(tmp_path / "data.csv", ["x", "y"], x)
    assert_refused(tmp_path, capsys, path, what="column 'y'")


def test_a_heldout_outlier_beyond_float32_is_refused(tmp_path, capsys):
    x = points()
    row = int(heldout_rows()[0])
    x[row, 0] = 1e50  # 1e50 standard deviations away: float32 infinity in model coordinates
    path = tmp_path / "data.npy"
    np.save(path, x)
    assert_refused(tmp_path, capsys, path, what=("column 0", f"row {row}"))


def test_evaluate_refuses_a_file_beyond_float32_in_model_coordinates(tmp_path, capsys):
    x = points(8)
    np.save(tmp_path / "data.npy", x)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", tmp_path / "data.npy", "--out", run, *TINY)
    assert code == 0, err
    other = x[:20].copy()
    other[3, 1] = 1e50
    path = tmp_path / "other.npy"
    np.save(path, other)
    metrics = (run / "metrics.json").read_text()
    code, out, err = run_cli(capsys, "evaluate", run, "--data", path)
    assert code == 2 and out == "", err
    assert err.splitlines() == [err.strip()] and "column 1" in err and "row 3" in err, err
    assert err.startswith(f"numpyro-ebm: error: {path}: ")
    assert (run / "metrics.json").read_text() == metrics


def test_scaling_the_data_by_1e_300_shifts_the_log_likelihood_by_the_jacobian(tmp_path, capsys):
    x = points(4)
    results = {}
    for name, scale in (("reference", 1.0), ("tiny", 1e-300)):
        path = tmp_path / f"{name}.npy"
        np.save(path, x * scale)
        code, _, err = run_cli(capsys, "train", "--data", path, "--out", tmp_path / name, *TINY)
        assert code == 0, err
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        (entry,) = metrics["heldout"]["validation"].values()
        results[name] = entry
        run = json.loads((tmp_path / name / "run.json").read_text())
        results[name]["data"] = cli.data_files.prepare(
            run["config"], x * scale, run["standardization"]
        )
    ref, tiny = results["reference"], results["tiny"]
    np.testing.assert_array_equal(tiny["data"].train, ref["data"].train)
    shift = tiny["log_jacobian"] - ref["log_jacobian"]
    assert shift == pytest.approx(2 * 300 * math.log(10), rel=1e-12)
    # the same standardized data trains the same model: the model log-likelihood is identical
    assert tiny["log_likelihood"] - ref["log_likelihood"] == pytest.approx(shift, rel=1e-12)
    assert tiny["stderr"] == ref["stderr"] and math.isfinite(tiny["log_likelihood"])


# -- C10: .npy files and what is not a regular file ------------------------------------------


def test_big_endian_npy_is_trained_on(tmp_path, capsys):
    x = points(5)
    path = tmp_path / "big_endian.npy"
    np.save(path, x.astype(">f8"))
    read, names = cli.data_files.read_points(str(path))
    assert names is None and read.dtype == np.dtype("=f8")
    np.testing.assert_array_equal(read, x)
    code, _, err = run_cli(capsys, "train", "--data", path, "--out", tmp_path / "run", *TINY)
    assert code == 0, err


@pytest.mark.parametrize("dtype", [np.int64, np.int16, np.uint8])
def test_integer_npy_is_read_like_an_integer_csv(tmp_path, dtype):
    x = np.random.default_rng(6).integers(0, 100, (NUM_ROWS, 2)).astype(dtype)
    np.save(tmp_path / "data.npy", x)
    write_csv(tmp_path / "data.csv", ["a", "b"], x)
    from_npy, _ = cli.data_files.read_points(str(tmp_path / "data.npy"))
    from_csv, _ = cli.data_files.read_points(str(tmp_path / "data.csv"))
    assert from_npy.dtype == from_csv.dtype == np.float64
    np.testing.assert_array_equal(from_npy, from_csv)


def test_csv_with_spaces_after_commas_and_quoted_fields(tmp_path):
    x = np.random.default_rng(7).normal(size=(20, 2))
    text = 'a, "b, in cm"\n' + "".join(f'{u!r}, "{v!r}"\n' for u, v in x.tolist())
    (tmp_path / "data.csv").write_text(text)
    read, names = cli.data_files.read_points(str(tmp_path / "data.csv"))
    assert names == ["a", "b, in cm"]
    np.testing.assert_array_equal(read, x)


def _train_config(tmp_path, path):
    """``(config, points)`` of ``train --data path`` (the file read and its columns checked)."""
    argv = ["train", "--data", str(path), "--out", str(tmp_path / "run")]
    config, rows, _ = cli.parser.train_config(cli.parser.make_parser().parse_args(argv))
    return config, rows


@pytest.mark.parametrize(("dtype", "high"), [(np.float32, 8.0), (np.float16, 2.0)])
def test_a_narrow_float_npy_has_the_grids_of_the_same_csv(tmp_path, dtype, high):
    """Grids are found in the file's own precision: a float32 or float16 .npy of values
    recorded to 0.1 and 1 is dequantized as the CSV of those values is (in the cells of the
    recorded values, though float16 holds 1.9 as 1.900390625 and 1.3 as 1.2998046875), and its
    rows go back on the grid."""
    rng = np.random.default_rng(8)
    # float16 holds 2 to 1/512: 4 roundings are 0.08 of 0.1 (at 8, too many: continuous)
    recorded = np.column_stack(
        [np.round(rng.uniform(0, high, NUM_ROWS), 1), rng.integers(0, 9, NUM_ROWS)]
    )
    np.save(tmp_path / "data.npy", recorded.astype(dtype))
    write_csv(tmp_path / "data.csv", ["a", "b"], recorded)
    quanta = {}
    for suffix in ("npy", "csv"):
        config, rows = _train_config(tmp_path, tmp_path / f"data.{suffix}")
        data = cli.data_files.prepare(config, rows, None)
        quanta[suffix] = data.quantum.tolist()
        train = recorded[cli.data_files._split(0, NUM_ROWS, FRACTION)[0]]
        np.testing.assert_array_equal(data.to_original(data.train, on_grid=True), train)
    assert quanta["npy"] == quanta["csv"] == [0.1, 1.0]


def test_a_float32_npy_flag_column_on_the_grid_is_accepted(tmp_path):
    x = points(9).astype(np.float32)
    x[:, 0] = np.where(x[:, 0] > 0, np.float32(0.1), np.float32(0.2))
    np.save(tmp_path / "data.npy", x)
    config, rows = _train_config(tmp_path, tmp_path / "data.npy")
    assert rows.dtype == np.float32
    assert cli.data_files.prepare(config, rows, None).quantum.tolist() == [0.1, 0.0]


def test_float128_npy_is_refused(tmp_path, capsys):
    if np.dtype(np.longdouble).itemsize <= 8:
        pytest.skip("long double is float64 on this platform")
    path = tmp_path / "data.npy"
    np.save(path, points().astype(np.longdouble))
    assert_refused(tmp_path, capsys, path, what=("float128", "astype('float64')"))


def test_bool_npy_is_refused(tmp_path, capsys):
    path = tmp_path / "data.npy"
    np.save(path, points() > 0)
    assert_refused(tmp_path, capsys, path, what="bool")


def test_a_npy_header_claiming_1e12_rows_is_refused_before_reading(tmp_path, capsys):
    path = tmp_path / "data.npy"
    with open(path, "wb") as f:
        header = {"descr": "<f8", "fortran_order": False, "shape": (10**12, 2)}
        np.lib.format.write_array_header_1_0(f, header)
        f.write(np.zeros(8).tobytes())
    assert_refused(tmp_path, capsys, path, what="(1000000000000, 2)")


def test_a_npy_of_zero_columns_blames_the_data_file(tmp_path, capsys):
    path = tmp_path / "data.npy"
    np.save(path, np.zeros((200, 0)))
    assert_refused(tmp_path, capsys, path, what="no columns")


@pytest.mark.parametrize("suffix", [".npy", ".csv"])
def test_a_fifo_is_refused_without_opening_it(tmp_path, capsys, suffix):
    path = tmp_path / f"pipe{suffix}"
    os.mkfifo(path)
    # a writer that unblocks a reader (old code would block in open() forever without it)
    writer = threading.Thread(target=lambda: open(path, "wb").close(), daemon=True)
    writer.start()
    try:
        assert_refused(tmp_path, capsys, path, what="not a regular file")
    finally:
        if writer.is_alive():  # nobody opened the pipe: release the writer
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
        writer.join(5)


def test_dev_zero_is_refused(tmp_path, capsys):
    path = tmp_path / "zeros.npy"
    path.symlink_to("/dev/zero")
    assert_refused(tmp_path, capsys, path, what="not a regular file")


# -- C11: messages ---------------------------------------------------------------------------


def _csv_with_a_two_line_record(tmp_path, bad_row):
    """x,note,y with a quoted two-line note on line 2, one empty line (4), then ``bad_row``
    on line 9: record 7 of the file, data row 6."""
    text = 'x,note,y\n1,"two\nlines",2\n\n' + "".join(f"{i},n,{i * i % 7}\n" for i in range(4))
    text += bad_row + "\n" + "".join(f"{i},n,{i % 5}.5\n" for i in range(30))
    path = tmp_path / "data.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "bad_row, what",
    [
        ("3,n,", "no value on line 9"),
        ("3,n,abc", "on line 9"),
        ("3,n,nan", "line 9"),
        ("3,n,1e400", "line 9"),
        ("3,n", "line 9 has 2 fields"),
    ],
    ids=["missing", "text", "nan", "overflow", "ragged"],
)
def test_csv_errors_give_the_line_number(tmp_path, capsys, bad_row, what):
    path = _csv_with_a_two_line_record(tmp_path, bad_row)
    line = assert_refused(tmp_path, capsys, path, "--columns", "x,y", what=what)
    assert "index" not in line


@pytest.mark.parametrize("suffix", [".npy", ".csv"])
def test_permission_denied_says_so(tmp_path, capsys, monkeypatch, suffix):
    path = tmp_path / f"data{suffix}"
    if suffix == ".npy":
        np.save(path, points())
    else:
        write_csv(path, ["x", "y"], points())
    if os.geteuid() != 0:
        path.chmod(0)
    else:  # root reads any file: refuse it the way the kernel would
        real_open = open

        def denied(file, *args, **kwargs):
            if os.fspath(file) == str(path):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr("builtins.open", denied)
    line = assert_refused(tmp_path, capsys, path, what="permission denied")
    assert "not a NumPy" not in line and "CSV" not in line


def test_no_warning_reaches_stderr_before_the_error_line(tmp_path):
    """In a fresh interpreter (warnings printed as Python does): stderr is the one line."""
    x = points()
    x[:, 1] *= 1e200
    x[0, 1] = 1e50 * 1e200  # an overflow in the squares of the old standardization
    x[:, 0] = 1.0  # a constant column: refused after the statistics are computed
    path = tmp_path / "data.npy"
    np.save(path, x)
    out_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "numpyro_ebm.cli", "train", "--data", path, "--out", out_dir],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(numpyro_ebm.__file__)),
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith(f"numpyro-ebm: error: {path}: column 0 ")
    assert not out_dir.exists()


def test_a_log_z_whose_grid_misses_mass_gives_a_score_with_an_infinite_error():
    """``grid_covering``'s infinite error: the score is shown with it and the warning row
    (``evaluate.log_likelihood`` refuses such a log Z outright)."""
    energy = numpyro_ebm.energies.GaussianEnergy(jax.numpy.zeros(2))
    res = type("Run", (), {"energy": energy})()
    data = cli.data_files.Data(points(0)[:10], points(1)[:10])
    info = {"outer_shell_mass": 0.5}
    missed = numpyro_ebm.logz.LogZEstimate(float(energy.log_z), math.inf, "grid", None, info)
    entry = cli.commands._heldout(res, data, points(2)[:20], missed)
    assert entry["stderr"] == math.inf and math.isfinite(entry["log_likelihood"])
    rows = dict(cli.commands._heldout_rows(entry, "validation"))
    assert "± inf" in rows["log-likelihood (data units)"] and "grid's edge" in rows["warning"]
