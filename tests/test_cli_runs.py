"""The run folder under faults: damaged files, a second writer, a diverged run, internal errors.

Every command on a damaged or busy run folder prints one line naming the file (or the holder's
pid), exits with its documented code, and changes nothing in the folder.
"""

import errno
import json
import os
import shutil

import numpy as np
import pytest
from files import snapshot

import numpyro_ebm
from numpyro_ebm import _io, cli

TINY = [
    "--steps", "40", "--chains", "64", "--batch-size", "64", "--mcmc-steps", "5",
    "--hidden", "16,16", "--checkpoint-every", "20", "--quiet",
]  # fmt: skip
COMMANDS = {
    "train": lambda run, tmp: ["train", "--data", tmp / "data.npy", "--out", run, *TINY],
    "evaluate": lambda run, tmp: ["evaluate", run],
    "sample": lambda run, tmp: ["sample", run, "--num", "10", "--out", tmp / "s.npy"],
    "report": lambda run, tmp: ["report", run, "--out", tmp / "r.html"],
}


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err, *words):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for word in words:
        assert str(word) in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run on a 2-D .npy file (data.npy next to the run folder)."""
    tmp = tmp_path_factory.mktemp("finished")
    np.save(tmp / "data.npy", np.random.default_rng(0).normal(size=(300, 2)))
    code = cli.main([str(a) for a in COMMANDS["train"](tmp / "run", tmp)] + ["--no-report"])
    assert code == 0
    return tmp


def _copy_run(finished, folder):
    """A copy of the finished run and its data file in ``folder``."""
    folder.mkdir()
    shutil.copy(finished / "data.npy", folder / "data.npy")
    shutil.copytree(finished / "run", folder / "run")
    # run.json stores the data file's absolute path: point it at the copy
    run_json = folder / "run" / "run.json"
    run = json.loads(run_json.read_text())
    run["data_path"] = str(folder / "data.npy")
    run_json.write_text(json.dumps(run, indent=1) + "\n")
    return folder


@pytest.fixture
def run_copy(finished, tmp_path):
    return _copy_run(finished, tmp_path / "copy")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garble(path):
    path.write_bytes(b"\x00garbage{" + path.read_bytes()[9:])


def _drop_key(key):
    def drop(path):
        run = json.loads(path.read_text())
        del run["config"][key]
        path.write_text(json.dumps(run))

    drop.__name__ = f"no_{key}"
    return drop


def _wrong_type(path):
    run = json.loads(path.read_text())
    run["config"]["steps"] = "40"
    path.write_text(json.dumps(run))


def _negative(name):
    def damage(path):
        run = json.loads(path.read_text())
        run["config"][name] = -0.1
        path.write_text(json.dumps(run))

    damage.__name__ = f"negative_{name}"
    return damage


def _damages(finished):
    """(file relative to the run folder, damage) for every run file the run has."""
    files = sorted(snapshot(finished / "run"))
    cases = []
    for name in files:
        if os.path.basename(name) == _io.LOCK_FILE:
            continue
        cases.append((name, _truncate))
        if name.endswith(".json"):
            cases.append((name, _garble))
    cases += [("run.json", _drop_key("seed")), ("run.json", _wrong_type)]
    cases += [("run.json", _negative("noise")), ("run.json", _negative("weight_decay"))]
    return cases


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_damaged_run_file_is_named_and_nothing_is_changed(finished, tmp_path, capsys, command):
    cases = _damages(finished)
    names = {name for name, _ in cases}
    assert {"run.json", "metrics.json"} < names and any(n.startswith("checkpoint") for n in names)
    for name, damage in cases:
        case = tmp_path / f"{name.replace('/', '-')}-{damage.__name__.strip('_')}"
        copy = _copy_run(finished, case)
        path = copy / "run" / name
        damage(path)
        before = snapshot(copy / "run")
        code, _, err = run_cli(capsys, *COMMANDS[command](copy / "run", copy))
        assert code == 2, (case.name, err)
        line = one_line(err, "numpyro-ebm: error: ", path)
        assert "; " in line, line
        assert snapshot(copy / "run") == before, case.name
        assert sorted(os.listdir(copy)) == ["data.npy", "run"], case.name


def test_a_second_writer_is_refused_naming_the_pid(run_copy, capsys):
    run = run_copy / "run"
    before = snapshot(run)
    with _io.folder_lock(run):  # this process holds the lock: the command is a second writer
        for command in ("train", "evaluate"):
            code, out, err = run_cli(capsys, *COMMANDS[command](run, run_copy))
            assert code == 2, (command, err)
            one_line(err, run, f"process {os.getpid()}")
            assert out == ""
        assert snapshot(run) == before


def test_a_diverged_run_stays_diverged(tmp_path, capsys):
    np.save(tmp_path / "data.npy", np.random.default_rng(0).normal(size=(300, 2)))
    run = tmp_path / "run"
    command = [*COMMANDS["train"](run, tmp_path), "--learning-rate", "1e30", "--no-report"]
    code, _, err = run_cli(capsys, *command)
    assert code == 1, err
    one_line(err, run, "diverged", "--learning-rate")
    step = cli.run_folder.checkpoint_step(str(run))
    assert json.loads((run / "run.json").read_text())["diverged"]["step"] == step
    for _ in range(3):  # the advice used to be to rerun: each rerun moved the step counter on
        code, _, err = run_cli(capsys, *command)
        assert code == 1, err
        one_line(err, "diverged", "--learning-rate")
        assert cli.run_folder.checkpoint_step(str(run)) == step
    assert not (run / "metrics.json").exists()
    for name in ("evaluate", "sample", "report"):
        code, _, err = run_cli(capsys, *COMMANDS[name](run, tmp_path))
        assert code == 2, (name, err)
        one_line(err, run, "diverged")


# -- exit codes --------------------------------------------------------------------------------


def test_internal_error_exits_3_and_writes_the_traceback_in_the_run(run_copy, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected fault")

    run = run_copy / "run"
    monkeypatch.setattr(cli.commands, "_heldout", broken)
    code, _, err = run_cli(capsys, "evaluate", run)
    assert code == 3
    line = one_line(err, "internal error", "injected fault", run / cli.TRACEBACK_FILE)
    assert "Traceback" in (run / cli.TRACEBACK_FILE).read_text()
    assert line.startswith("numpyro-ebm: internal error: RuntimeError")


def test_internal_error_before_a_checkpoint_leaves_no_folder(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected fault")

    np.save(tmp_path / "data.npy", np.random.default_rng(0).normal(size=(300, 2)))
    monkeypatch.setattr(numpyro_ebm, "fit", broken)
    out = tmp_path / "new" / "run"
    code, _, err = run_cli(capsys, *COMMANDS["train"](out, tmp_path))
    assert code == 3
    line = one_line(err, "internal error", "injected fault")
    where = line.rsplit("written to ", 1)[1]
    assert os.path.isfile(where) and "injected fault" in open(where).read()
    os.remove(where)
    assert os.listdir(tmp_path) == ["data.npy"]  # neither run nor its new parent folder


def test_an_interrupt_exits_130_and_changes_nothing(run_copy, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    run = run_copy / "run"
    before = snapshot(run)
    monkeypatch.setattr(cli.commands, "_heldout", interrupted)
    code, _, err = run_cli(capsys, "evaluate", run)
    assert code == 130
    one_line(err, "interrupted")
    assert snapshot(run) == before


def test_a_failed_start_in_a_users_empty_folder_leaves_it_empty(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected fault")

    np.save(tmp_path / "data.npy", np.random.default_rng(0).normal(size=(300, 2)))
    monkeypatch.setattr(numpyro_ebm, "fit", broken)
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, *COMMANDS["train"](empty, tmp_path))
    assert code == 3, err
    os.remove(one_line(err).rsplit("written to ", 1)[1])
    assert os.listdir(empty) == []


# -- options and output paths checked before any compute ---------------------------------------

BIG = str(2**64)
OPTION_LIMITS = [
    (["--seed", BIG], "--seed"),
    (["--steps", BIG], "--steps"),
    (["--chains", str(10**30)], "--chains"),
    (["--hidden", f"{10**30},4"], "--hidden"),
    (["--learning-rate", "inf"], "--learning-rate"),
    (["--batch-size", BIG], "--batch-size"),
    (["--noise", "-0.1"], "--noise"),
    (["--noise", "nan"], "--noise"),
    (["--noise", "some"], "--noise"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--weight-decay", "inf"], "--weight-decay"),
]


@pytest.mark.parametrize(("options", "subject"), OPTION_LIMITS, ids=[s for _, s in OPTION_LIMITS])
def test_train_options_beyond_their_limits(tmp_path, capsys, options, subject):
    np.save(tmp_path / "data.npy", np.random.default_rng(0).normal(size=(300, 2)))
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, *COMMANDS["train"](out, tmp_path), *options)
    assert code == 2, err
    one_line(err, f"error: {subject}")
    assert not out.exists() and stdout == ""


def test_num_data_beyond_its_limit(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", "rings", "--num-data", BIG, "--out", out)
    assert code == 2
    one_line(err, "--num-data")
    assert not out.exists()


def test_an_out_folder_that_cannot_be_created(tmp_path, capsys):
    np.save(tmp_path / "data.npy", np.random.default_rng(0).normal(size=(300, 2)))
    cases = [
        tmp_path / "data.npy" / "run",  # under a file
        tmp_path / "a" / "b" / ("x" * 300),  # a name too long, after two new parents
    ]
    for out in cases:
        code, stdout, err = run_cli(capsys, *COMMANDS["train"](out, tmp_path))
        assert code == 2, err
        one_line(err, "--out", "cannot be created")
        assert stdout == ""
        assert os.listdir(tmp_path) == ["data.npy"]  # no parent folders left behind


def test_grid_log_z_beyond_three_dimensions_is_refused_before_training(
    tmp_path, capsys, monkeypatch
):
    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking --log-z")

    monkeypatch.setattr(numpyro_ebm, "fit", no_training)
    np.save(tmp_path / "data.npy", np.random.default_rng(0).normal(size=(300, 4)))
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, *COMMANDS["train"](out, tmp_path), "--log-z", "grid")
    assert code == 2, err
    one_line(err, "--log-z", "up to 3 dimensions, the run has 4")
    assert not out.exists() and stdout == ""


def test_sample_and_report_refuse_an_existing_folder_as_out(run_copy, capsys, monkeypatch):
    def no_compute(*args, **kwargs):
        raise AssertionError("computed before checking --out")

    monkeypatch.setattr(cli.commands, "_restore", no_compute)
    run = run_copy / "run"
    for command, name in (("sample", "s.npy"), ("report", "r.html")):
        (run_copy / name).mkdir()
        code, _, err = run_cli(capsys, *COMMANDS[command](run, run_copy))
        assert code == 2, err
        one_line(err, "--out", "existing folder")
        assert os.listdir(run_copy / name) == []


def test_demo_checks_its_options_before_training(tmp_path, capsys, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking the options")

    monkeypatch.setattr(numpyro_ebm, "fit", no_training)
    a_file = tmp_path / "plot"
    a_file.write_text("mine")
    cases = [
        (["--num-data", "0"], "--num-data"),
        (["--seed", BIG], "--seed"),
        (["--steps", "0"], "--steps"),
        (["--out", a_file], "--out"),
    ]
    for options, subject in cases:
        code, _, err = run_cli(capsys, "demo", "--out", tmp_path / "demo", *options)
        assert code == 2, err
        one_line(err, subject)
    assert sorted(os.listdir(tmp_path)) == ["plot"] and a_file.read_text() == "mine"


def test_the_density_plot_box_holds_the_bulk_of_the_data_not_its_outliers():
    points = np.random.default_rng(0).normal(size=(1000, 2))
    points[0] = [1e20, -1e25]
    box = cli.commands._plot_box(points)
    # the N(0, 1) bulk: the 0.5% and 99.5% quantiles are near ∓2.58, and 15% padding is added
    assert box.shape == (2, 2)
    assert np.all((box[:, 0] < -2.5) & (box[:, 0] > -4.5))
    assert np.all((box[:, 1] > 2.5) & (box[:, 1] < 4.5))


def test_a_failing_density_plot_keeps_the_training_result(run_copy, capsys, monkeypatch):
    def singular(*args, **kwargs):
        raise np.linalg.LinAlgError("Singular matrix")

    monkeypatch.setattr(numpyro_ebm.plots, "density_figure", singular)
    run = run_copy / "run"
    # train on a finished run recomputes the metrics, the report and the plot
    code, _, err = run_cli(capsys, *COMMANDS["train"](run, run_copy))
    assert code == 0, err
    lines = err.strip().splitlines()  # the report draws the density too: it is skipped as well
    assert len(lines) == 2 and all(
        "warning" in line and "Singular matrix" in line for line in lines
    )
    assert cli.DENSITY_FILE in err and cli.REPORT_FILE in err
    assert (run / cli.METRICS_FILE).exists()
    assert not (run / cli.DENSITY_FILE).exists() and not (run / cli.REPORT_FILE).exists()


def test_a_run_made_before_dequantization_and_patience_resumes_as_it_started(run_copy, capsys):
    """A run.json without ``patience``, ``noise``, ``data.dequantize``, ``data.fresh_noise``
    and ``standardization.quantum`` (written before they existed): the same ``train`` command
    again is not refused as a run with other settings; the run stays without them."""
    run_json = run_copy / "run" / "run.json"
    run = json.loads(run_json.read_text())
    del run["config"]["patience"], run["config"]["noise"], run["config"]["data"]["dequantize"]
    del run["config"]["weight_decay"]
    del run["config"]["data"]["fresh_noise"]
    del run["standardization"]["quantum"]
    run_json.write_text(json.dumps(run))
    code, _, err = run_cli(capsys, *COMMANDS["train"](run_copy / "run", run_copy))
    assert code == 0, err
    stored = json.loads(run_json.read_text())
    assert "patience" not in stored["config"] and "quantum" not in stored["standardization"]
    assert "fresh_noise" not in stored["config"]["data"] and "noise" not in stored["config"]
    assert "weight_decay" not in stored["config"]
    # naming --patience on such a run is a change of settings, refused by name
    code, _, err = run_cli(
        capsys, *COMMANDS["train"](run_copy / "run", run_copy), "--patience", "200"
    )
    assert code == 2 and "--patience None -> 200" in one_line(err), err
    code, _, err = run_cli(
        capsys, *COMMANDS["train"](run_copy / "run", run_copy), "--weight-decay", "0.1"
    )
    assert code == 2 and "--weight-decay None -> 0.1" in one_line(err), err


def test_a_resumed_run_keeps_its_widths_and_new_runs_get_their_datas(run_copy, capsys, tmp_path):
    """Without ``--hidden`` a resumed run keeps the widths it started with (a run made before
    the widths followed the dimension included); naming others is refused by name. A new run
    on 40 columns gets ``energies.default_hidden(40)``."""
    train = [str(a) for a in COMMANDS["train"](run_copy / "run", run_copy)]
    at = train.index("--hidden")
    without_hidden = train[:at] + train[at + 2 :]
    code, _, err = run_cli(capsys, *without_hidden)
    assert code == 0, err
    stored = json.loads((run_copy / "run" / "run.json").read_text())
    assert stored["config"]["hidden"] == [16, 16]
    code, _, err = run_cli(capsys, *without_hidden, "--hidden", "8")
    assert code == 2 and "hidden" in one_line(err), err
    wide = tmp_path / "wide.npy"
    np.save(wide, np.random.default_rng(0).normal(size=(100, 40)))
    args = cli.parser.make_parser().parse_args(["train", "--data", str(wide), "--out", "unused"])
    config, _, _ = cli.parser.train_config(args)
    assert config["hidden"] == [256, 256] == list(numpyro_ebm.energies.default_hidden(40))


# -- what the user had next to the outputs, and folders that cannot be written -----------------


def test_a_markdown_report_keeps_a_users_files_under_its_figures_name(
    run_copy, capsys, monkeypatch
):
    def no_compute(*args, **kwargs):
        raise AssertionError("computed before checking --out")

    monkeypatch.setattr(cli.commands, "_restore", no_compute)
    (run_copy / "notes_files").mkdir()
    (run_copy / "notes_files" / "important.txt").write_text("my notes")
    (run_copy / "other_files").write_text("a user's file")
    before = snapshot(run_copy)
    for name, figures in (("notes.md", "notes_files"), ("other.md", "other_files")):
        code, out, err = run_cli(capsys, "report", run_copy / "run", "--out", run_copy / name)
        assert code == 2, err
        one_line(err, "--out", run_copy / figures, "move it away")
        assert out == ""
    assert snapshot(run_copy) == before
    # an earlier report's figures folder may be replaced
    (run_copy / "old_files").mkdir()
    (run_copy / "old_files" / "training.png").write_bytes(b"png")
    cli.run_folder.check_report_file(str(run_copy / "old.md"))


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder)``: ``folder`` refuses new files. By ``chmod 0o555``, and where that
    does not stop this process (root) by an ``os.open``/``os.mkdir`` that refuse them there."""
    folders = []
    real_open, real_mkdir = os.open, os.mkdir

    def inside(path):
        return os.path.dirname(os.path.abspath(os.fsdecode(path))) in folders

    def refusing_open(path, flags, *args, **kwargs):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR) and inside(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    def refusing_mkdir(path, *args, **kwargs):
        if inside(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real_mkdir(path, *args, **kwargs)

    def make(folder):
        os.chmod(folder, 0o555)
        try:
            (folder / ".probe").touch()
        except PermissionError:
            return
        os.remove(folder / ".probe")
        folders.append(str(folder.resolve()))
        monkeypatch.setattr(os, "open", refusing_open)
        monkeypatch.setattr(os, "mkdir", refusing_mkdir)

    yield make
    monkeypatch.undo()
    for folder in folders:
        os.chmod(folder, 0o755)


@pytest.mark.parametrize("command", ["train", "evaluate", "report", "report --out"])
def test_a_folder_that_cannot_be_written_is_a_usage_error(run_copy, capsys, read_only, command):
    run = run_copy / "run"
    argv = COMMANDS[command.split()[0]](run, run_copy)
    subject, folder = run, run
    if command == "report":
        argv = ["report", run]
    elif command == "report --out":
        subject, folder = "--out", run_copy / "out"
        folder.mkdir()
        argv = ["report", run, "--out", folder / "r.html"]
    before = snapshot(run_copy)
    read_only(folder)
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, err
    one_line(err, f"{subject}: ", "cannot be written", "--out" if "report" in command else "copy")
    assert out == ""
    assert snapshot(run_copy) == before


def test_metrics_that_cannot_be_written_are_a_usage_error(run_copy, capsys, monkeypatch):
    def refused(path, obj):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    run = run_copy / "run"
    before = snapshot(run)
    monkeypatch.setattr(cli.run_folder, "write_json", refused)
    code, _, err = run_cli(capsys, "evaluate", run)
    assert code == 2, err
    one_line(err, run / "metrics.json", "cannot be written", "copy the run folder")
    assert snapshot(run) == before
