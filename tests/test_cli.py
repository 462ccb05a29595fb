"""The `numpyro-ebm` command line end to end (tiny runs) and its one-line user errors.

The training runs share one data shape and one set of settings, so that `fit`'s compiled step
is reused across them (the command line hands `fit` the same optimizer object for the same
settings).
"""

import importlib
import json
import math
import os
import pathlib
import types

import numpy as np
import pytest

import numpyro_ebm
from numpyro_ebm import cli, training

TINY = [
    "--steps", "40", "--chains", "64", "--batch-size", "64", "--mcmc-steps", "5",
    "--hidden", "16,16", "--checkpoint-every", "20", "--quiet",
]  # fmt: skip
MEAN = np.array([1000.0, -500.0])
SCALE = np.array([100.0, 50.0])
NUM_ROWS = 300  # 270 training rows, 30 held out


def checkpoint_file(run, name):
    """A file of the run folder's current checkpoint."""
    return pathlib.Path(training.latest_checkpoint(str(run / "checkpoint"))) / name


def gaussian(seed, n=NUM_ROWS, mean=MEAN, scale=SCALE):
    return np.random.default_rng(seed).normal(mean, scale, (n, len(mean)))


def gaussian_entropy(scale):
    """Differential entropy of independent normals: the best expected log-likelihood is −H."""
    return float(np.sum(0.5 * np.log(2 * math.pi * math.e * np.asarray(scale) ** 2)))


def write_csv(path, header, rows):
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def user_csv(path, seed=0):
    """x and y numeric (offset and scaled far from unit scale), a text column between them."""
    points = gaussian(seed)
    return write_csv(path, ["x", "label", "y"], [(x, "cat", y) for x, y in points])


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, subject):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("numpyro-ebm: error: ")
    assert str(subject) in lines[0]
    assert "; " in lines[0]  # what is wrong; what to do


def heldout(folder, data="validation", method="grid"):
    metrics = json.loads((folder / "metrics.json").read_text())
    return metrics["heldout"][data][method]


# the tracker's start (4096 particles, up to 1000 sub-steps) runs for 30 s unoptimised, 10 s
# optimised: 57 s against 40 s in a CI run
@pytest.mark.optimized
def test_demo_prints_the_table_and_writes_the_plot(tmp_path, capsys):
    code = cli.main(
        ["demo", "--steps", "20", "--num-data", "2000", "--quiet", "--out", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert code == 0
    for row in ("test NLL", "entropy bound", "KL(data ‖ model)", "training time"):
        assert row in out
    png = tmp_path / "8gaussians_density.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["8gaussians_density.png"]  # no temp files


def test_demo_rejects_bad_arguments(capsys):
    code, _, err = run_cli(capsys, "demo", "--steps", "0")
    assert_user_error(code, err, "--steps")
    with pytest.raises(SystemExit):
        cli.main(["demo", "--toy", "moons"])


def test_demo_exits_1_when_training_diverges(tmp_path, capsys, monkeypatch):
    def diverge(*args, **kwargs):
        raise training.TrainingDivergedError("diverged", types.SimpleNamespace(step=3), {})

    monkeypatch.setattr(numpyro_ebm, "fit", diverge)
    out = tmp_path / "demo"
    code, _, err = run_cli(capsys, "demo", "--steps", 5, "--num-data", 50, "--out", out)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "diverged at step 3" in err and not out.exists()
    code, _, err = run_cli(capsys, "demo", "--num-data", 1, "--out", out)
    assert_user_error(code, err, "--num-data")


def test_train_evaluate_sample_report_on_a_user_csv(tmp_path, capsys):
    data = user_csv(tmp_path / "data.csv")
    run = tmp_path / "run"
    command = ["train", "--data", data, "--columns", "x,y", "--out", run, *TINY]
    code, out, err = run_cli(capsys, *command)
    assert code == 0, err
    assert "log-likelihood (original units)" in out
    assert sorted(os.listdir(run)) == [
        ".lock", "checkpoint", "density.png", "metrics.json", "report.html", "run.json",
    ]  # fmt: skip
    stored = json.loads((run / "run.json").read_text())
    assert stored["config"]["data"]["columns"] == ["x", "y"]
    assert stored["split"] == {"train": 270, "validation": 30}
    # standardization from the 270 training rows: mean within 4 standard errors, std within 20%
    mean, std = (np.array(stored["standardization"][k]) for k in ("mean", "std"))
    assert np.all(np.abs(mean - MEAN) < 4 * SCALE / np.sqrt(270))
    assert np.all(np.abs(std / SCALE - 1) < 0.2)
    assert (run / "density.png").read_bytes()[:4] == b"\x89PNG"

    # The held-out log-likelihood is in the CSV's units: no model beats the true density's
    # −H in expectation (Gibbs); in standardized units it would be about −H + Σ log SCALE.
    val = heldout(run)
    bound = -gaussian_entropy(SCALE)
    assert val["units"] == "original"
    assert val["log_jacobian"] == pytest.approx(-np.sum(np.log(std)))
    assert bound - 5 < val["log_likelihood"] < bound + 4 * val["stderr"] + 0.05

    code, out, err = run_cli(capsys, "evaluate", run)
    assert code == 0, err
    assert heldout(run)["log_likelihood"] == pytest.approx(val["log_likelihood"])
    assert f"{val['log_likelihood']:.4f}" in out

    # another file with the same columns in another order, plus one more: picked by name
    test = gaussian(1, n=200)
    test_csv = write_csv(tmp_path / "test.csv", ["y", "extra", "x"], [(y, 7, x) for x, y in test])
    code, out, err = run_cli(capsys, "evaluate", run, "--data", test_csv)
    assert code == 0, err
    other = heldout(run, str(test_csv))
    assert other["num_points"] == 200
    gap = abs(other["log_likelihood"] - val["log_likelihood"])
    assert gap < 4 * math.hypot(other["stderr"], val["stderr"]) + 0.1
    assert heldout(run)["log_likelihood"] == val["log_likelihood"]  # kept, not replaced

    metrics_before = (run / "metrics.json").read_bytes()
    wide = tmp_path / "wide.npy"
    np.save(wide, gaussian(2, n=50, mean=np.zeros(3), scale=np.ones(3)))
    code, _, err = run_cli(capsys, "evaluate", run, "--data", wide)
    assert_user_error(code, err, wide)
    assert "3 columns" in err and "trained on 2" in err
    assert (run / "metrics.json").read_bytes() == metrics_before

    samples_path = tmp_path / "samples.npy"
    code, _, err = run_cli(
        capsys, "sample", run, "--num", 300, "--out", samples_path, "--mcmc-steps", 200
    )
    assert code == 0, err
    samples = np.load(samples_path)
    assert samples.shape == (300, 2) and np.all(np.isfinite(samples))
    # samples in the CSV's units: centred within one data standard deviation of the data's mean
    # and spread within a factor 3 of its scale (unmapped samples sit near 0 with scale ~1)
    assert np.all(np.abs(samples.mean(axis=0) - MEAN) < SCALE)
    assert np.all((samples.std(axis=0) > SCALE / 3) & (samples.std(axis=0) < 3 * SCALE))

    for bad in (["--num", 0, "--out", tmp_path / "a.npy"], ["--num", 5, "--out", tmp_path / "a"]):
        code, _, err = run_cli(capsys, "sample", run, *bad)
        assert_user_error(code, err, "--")
        assert not (tmp_path / "a.npy").exists() and not (tmp_path / "a").exists()

    code, out, err = run_cli(capsys, "report", run, "--out", tmp_path / "report.md")
    assert code == 0, err
    assert (tmp_path / "report.md").read_text().startswith("# numpyro-ebm run on file")
    assert (tmp_path / "report_files" / "training.png").exists()
    code, _, err = run_cli(capsys, "report", run, "--out", tmp_path / "report.pdf")
    assert_user_error(code, err, "--out")
    assert not (tmp_path / "report.pdf").exists()
    assert not [p for p in os.listdir(run) if p.startswith(".tmp")]


def test_resume_after_an_interruption_repeats_the_uninterrupted_run(tmp_path, capsys, monkeypatch):
    data = user_csv(tmp_path / "data.csv")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    command = ["train", "--data", data, "--columns", "x,y", "--out", resumed, *TINY, "--no-report"]
    code, _, err = run_cli(capsys, *[full if a == resumed else a for a in command])
    assert code == 0, err

    checkpoint = importlib.import_module("numpyro_ebm.training.checkpoint")
    save = checkpoint.save_checkpoint

    def save_then_interrupt(folder, state, history, meta):
        save(folder, state, history, meta)
        if meta["step"] == 20:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_interrupt)
    code, _, err = run_cli(capsys, *command)
    assert code == 130
    assert "step 20" in err and "same command" in err
    assert "metrics.json" not in os.listdir(resumed)
    code, _, err = run_cli(capsys, "evaluate", resumed)
    assert_user_error(code, err, resumed)
    assert "step 20 of 40" in err

    monkeypatch.undo()
    code, out, err = run_cli(capsys, *command)
    assert code == 0, err
    assert "Resuming" in out and "step 20" in out
    with (
        np.load(checkpoint_file(full, "history.npz")) as a,
        np.load(checkpoint_file(resumed, "history.npz")) as b,
    ):
        assert sorted(a.files) == sorted(b.files)
        assert len(b["loss"]) == 40
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    state = checkpoint_file(full, "state.eqx").read_bytes()
    assert checkpoint_file(resumed, "state.eqx").read_bytes() == state
    assert heldout(resumed) == heldout(full)

    stored = (resumed / "run.json").read_bytes()
    other = [a if a != "40" else "60" for a in map(str, command)]
    code, _, err = run_cli(capsys, *other)
    assert_user_error(code, err, resumed)
    assert "--steps 40 -> 60" in err and "another --out" in err
    assert (resumed / "run.json").read_bytes() == stored
    assert checkpoint_file(resumed, "state.eqx").read_bytes() == state


def test_interrupt_before_the_first_checkpoint_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(numpyro_ebm, "fit", interrupted)
    data = user_csv(tmp_path / "data.csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    for run in (tmp_path / "run", empty):
        command = ["train", "--data", data, "--columns", "x,y", "--out", run, *TINY]
        code, _, err = run_cli(capsys, *command)
        assert code == 130
        assert "before the first checkpoint" in err
    assert not (tmp_path / "run").exists()
    assert os.listdir(empty) == []  # the user's empty folder stays, empty


def test_train_on_a_npy_file_of_tiny_scale(tmp_path, capsys):
    scale = np.array([1e-3, 2e-3])
    path = tmp_path / "points.npy"
    np.save(path, gaussian(3, mean=np.array([0.5, 0.0]), scale=scale).astype(np.float32))
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", path, "--out", run, *TINY, "--no-report")
    assert code == 0, err
    stored = json.loads((run / "run.json").read_text())
    assert stored["config"]["data"]["columns"] is None
    assert stored["config"]["data"]["shape"] == [NUM_ROWS, 2]
    # the log-Jacobian is now positive (+13.1 nats): the same bound as for the CSV
    val = heldout(run)
    bound = -gaussian_entropy(scale)
    assert val["log_jacobian"] > 13
    assert bound - 5 < val["log_likelihood"] < bound + 4 * val["stderr"] + 0.05


def test_train_on_a_builtin_toy_reports_the_kl(tmp_path, capsys):
    run = tmp_path / "run"
    command = ["train", "--data", "8gaussians", "--num-data", NUM_ROWS, "--out", run, *TINY]
    code, out, err = run_cli(capsys, *command, "--no-report")
    assert code == 0, err
    assert "KL(toy ‖ model)" in out
    stored = json.loads((run / "run.json").read_text())
    assert stored["standardization"] is None and stored["data_path"] is None
    metrics = json.loads((run / "metrics.json").read_text())
    kl = metrics["kl_to_toy"]
    # Gibbs: KL ≥ 0 and no test NLL below the toy's entropy, up to Monte Carlo error
    assert kl["kl"] > -3 * kl["kl_stderr"]
    assert kl["test_nll"] > kl["entropy"] - 3 * kl["test_nll_stderr"]
    val = heldout(run)
    assert val["units"] == "data" and val["log_jacobian"] == 0
    assert val["log_likelihood"] < -kl["entropy"] + 4 * val["stderr"] + 0.05

    code, out, err = run_cli(capsys, "evaluate", run, "--log-z", "learned")
    assert code == 0, err
    learned = heldout(run, method="tracked")
    # tracked through training, with an error bar that covers the grid's value
    assert learned["log_z_stderr"] > 0
    assert abs(learned["log_z"] - val["log_z"]) <= 4 * learned["log_z_stderr"] + 0.01
    assert set(heldout(run)) == set(learned)


def test_train_with_a_score_matching_objective_runs_no_chains(tmp_path, capsys):
    run = tmp_path / "run"
    command = ["train", "--data", "8gaussians", "--num-data", NUM_ROWS, "--out", run, *TINY]
    code, _, err = run_cli(capsys, *command, "--objective", "ssm", "--no-report")
    assert code == 0, err
    stored = json.loads((run / "run.json").read_text())
    assert stored["config"]["objective"] == "ssm" and stored["config"]["negatives"] == "auto"
    val = heldout(run)
    assert np.isfinite(val["log_likelihood"])
    energy = cli.commands._energy(stored["config"], 2)
    res = numpyro_ebm.load(str(run / "checkpoint"), energy=energy)
    assert res.config.negatives_name == "none"
    assert np.isfinite(res.history["score_matching_loss"]).all()
    assert np.isnan(res.history["acceptance_rate"]).all()
    # the same folder with another objective is another run: refused, the setting named
    code, _, err = run_cli(capsys, *command, "--objective", "dsm", "--no-report")
    assert_user_error(code, err, "objective")


# -- user errors: one line, exit code 2, nothing written -------------------------------------


def _csv(tmp_path, text, name="data.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _npy(tmp_path, array, name="data.npy"):
    path = tmp_path / name
    np.save(path, array)
    return path


def _good_rows(n=30):
    return "".join(f"{i},{i * i % 7}\n" for i in range(n))


def _missing(tmp_path):
    return tmp_path / "nope.csv", [], "no such file"


def _folder(tmp_path):
    (tmp_path / "data.csv").mkdir()
    return tmp_path / "data.csv", [], "is a folder"


def _extension(tmp_path):
    return _csv(tmp_path, "x,y\n" + _good_rows(), "data.txt"), [], "unsupported file type"


def _not_npy(tmp_path):
    path = tmp_path / "data.npy"
    path.write_bytes(b"these are not numbers")
    return path, [], "not a NumPy .npy file"


def _empty_csv(tmp_path):
    return _csv(tmp_path, ""), [], "is empty"


def _semicolons(tmp_path):
    return _csv(tmp_path, "x;y\n" + _good_rows().replace(",", ";")), [], "';' or tabs"


def _no_header(tmp_path):
    return _csv(tmp_path, _good_rows()), [], "no header row"


def _text_column(tmp_path):
    rows = "".join(f"{i},cat,{i % 5}\n" for i in range(30))
    return _csv(tmp_path, "x,label,y\n" + rows), [], "--columns x,y"


def _missing_value(tmp_path):
    return _csv(tmp_path, "x,y\n" + _good_rows() + "3,\n"), [], "no value on line 32"


def _ragged(tmp_path):
    return _csv(tmp_path, "x,y\n1,2,3\n" + _good_rows()), [], "line 2 has 3 fields"


def _absent_column(tmp_path):
    return _csv(tmp_path, "x,y\n" + _good_rows()), ["--columns", "x,z"], "no column 'z'"


def _nan_csv(tmp_path):
    return _csv(tmp_path, "x,y\n" + _good_rows() + "nan,1\n"), [], "NaN"


def _inf_npy(tmp_path):
    points = np.ones((30, 2)) * np.arange(30)[:, None]
    points[4, 1] = np.inf
    return _npy(tmp_path, points), [], "inf"


def _one_d_npy(tmp_path):
    return _npy(tmp_path, np.arange(30.0)), [], "shape (30,)"


def _three_d_npy(tmp_path):
    return _npy(tmp_path, np.zeros((30, 2, 2))), [], "shape (30, 2, 2)"


def _bool_npy(tmp_path):  # integers are read as numbers, like a CSV's (test_cli_data.py)
    return _npy(tmp_path, np.arange(60).reshape(30, 2) % 3 == 0), [], "bool values, not numbers"


def _few_rows(tmp_path):
    return _csv(tmp_path, "x,y\n" + _good_rows(5)), [], "too few"


def _constant_column(tmp_path):
    rows = "".join(f"{i},3\n" for i in range(30))
    return _csv(tmp_path, "x,y\n" + rows), [], "column 'y' is constant"


FILE_ERRORS = [
    _missing, _folder, _extension, _not_npy, _empty_csv, _no_header, _semicolons, _text_column,
    _missing_value, _ragged, _absent_column, _nan_csv, _inf_npy, _one_d_npy, _three_d_npy,
    _bool_npy, _few_rows, _constant_column,
]  # fmt: skip


@pytest.mark.parametrize("make", FILE_ERRORS, ids=lambda f: f.__name__.strip("_"))
def test_train_rejects_bad_data_files_in_one_line(tmp_path, capsys, make):
    path, options, what = make(tmp_path)
    code, out, err = run_cli(
        capsys, "train", "--data", path, *options, "--out", tmp_path / "run", *TINY
    )
    subject = "--columns" if options else path
    assert_user_error(code, err, subject)
    assert what in err
    assert not (tmp_path / "run").exists()
    assert out == ""


OPTION_ERRORS = [
    (["--steps", "0"], "--steps"),
    (["--chains", "-3"], "--chains"),
    (["--learning-rate", "0"], "--learning-rate"),
    (["--hidden", "16,x"], "--hidden"),
    (["--validation-fraction", "1.5"], "--validation-fraction"),
    (["--seed", "-1"], "--seed"),
    (["--num-data", "100"], "--num-data"),
]


@pytest.mark.parametrize(("options", "subject"), OPTION_ERRORS, ids=[s for _, s in OPTION_ERRORS])
def test_train_rejects_bad_options_in_one_line(tmp_path, capsys, options, subject):
    data = _csv(tmp_path, "x,y\n" + _good_rows())
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", data, "--out", out, *TINY, *options)
    assert_user_error(code, err, subject)
    assert not out.exists()


def test_train_rejects_options_that_do_not_fit_the_data(tmp_path, capsys):
    npy = _npy(tmp_path, np.ones((30, 2)) * np.arange(30)[:, None])
    cases = [
        (["--data", npy, "--columns", "x"], "--columns"),
        (["--data", "8gaussians", "--columns", "x"], "--columns"),
        (["--data", "8gaussians", "--num-data", "5"], "--num-data"),
        (["--data", "moons"], "--data"),
    ]
    for options, subject in cases:
        code, _, err = run_cli(capsys, "train", *options, "--out", tmp_path / "run", *TINY)
        assert_user_error(code, err, subject)
        assert not (tmp_path / "run").exists()


def test_train_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    data = _csv(tmp_path, "x,y\n" + _good_rows())
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "train", "--data", data, "--out", folder, *TINY)
    assert_user_error(code, err, folder)
    assert os.listdir(folder) == ["notes.txt"]
    code, _, err = run_cli(capsys, "train", "--data", data, "--out", folder / "notes.txt", *TINY)
    assert_user_error(code, err, "notes.txt")


@pytest.mark.parametrize(
    "command",
    [["evaluate"], ["sample", "--num", "5", "--out", "SAMPLES"], ["report"]],
    ids=["evaluate", "sample", "report"],
)
def test_commands_on_a_folder_that_is_not_a_run(tmp_path, capsys, command):
    command = [str(tmp_path / "s.npy") if a == "SAMPLES" else a for a in command]
    for folder in (tmp_path / "missing", tmp_path):
        code, _, err = run_cli(capsys, command[0], folder, *command[1:])
        assert_user_error(code, err, folder)
    assert os.listdir(tmp_path) == []


def test_a_run_stopped_early_by_patience_is_finished(tmp_path, capsys):
    """A run that ``--patience`` stopped before ``--steps`` is over: ``evaluate`` and
    ``sample`` use it, and ``train`` again only recomputes its metrics."""
    data = user_csv(tmp_path / "data.csv")
    run = tmp_path / "run"
    command = ["train", "--data", data, "--columns", "x,y", "--out", run, *TINY]
    command += ["--steps", 400, "--patience", 10, "--checkpoint-every", 10, "--no-report"]
    code, out, err = run_cli(capsys, *command)
    assert code == 0, err
    assert "stopped early: --patience 10" in out
    step = training.checkpoint_step(str(run / "checkpoint"))
    best = training.checkpoint_best_step(str(run / "checkpoint"))
    assert step < 400 and step - best >= 10

    code, out, err = run_cli(capsys, "evaluate", run)
    assert code == 0, err
    samples_path = tmp_path / "samples.npy"
    code, _, err = run_cli(capsys, "sample", run, "--num", 20, "--out", samples_path)
    assert code == 0, err
    assert np.load(samples_path).shape == (20, 2)
    code, out, err = run_cli(capsys, *command)
    assert code == 0, err
    assert f"is trained already (stopped early at step {step}" in out
    assert training.checkpoint_step(str(run / "checkpoint")) == step

    # a hand-edited kept step is named, not trusted
    meta_path = checkpoint_file(run, "meta.json")
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "best_step": "880"}))
    code, _, err = run_cli(capsys, "evaluate", run)
    assert_user_error(code, err, "meta.json")
    assert "best_step" in err
