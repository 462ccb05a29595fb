"""The command line on the built-in digits: trained off their box on three splits, scored on
the test split in the box's units (a separate file so that it runs beside tests/test_cli.py)."""

import importlib
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_cli import TINY, assert_user_error, run_cli

import numpyro_ebm
from numpyro_ebm import cli


@pytest.mark.optimized  # the log Z tracker's start in 64-D: 38 s unoptimised, 6 s optimised
@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="needs scikit-learn")
def test_train_on_digits_off_the_box_reports_the_test_split_on_the_box(tmp_path, capsys):
    """Digits are trained off their box (logit map, standardized, fresh dequantization noise),
    selected on the last 300 training images, and scored on the test split in the box's units
    (each image's log-Jacobian added)."""
    run = tmp_path / "run"
    # the tracked log Z for the table (an AIS in 64-D would take most of the test's time)
    code, out, err = run_cli(
        capsys,
        "train",
        "--data",
        "digits",
        "--out",
        run,
        *TINY,
        "--no-report",
        "--log-z",
        "learned",
    )
    assert code == 0, err
    stored = json.loads((run / "run.json").read_text())
    assert stored["config"]["data"]["space"] == "logit"
    assert stored["config"]["data"]["fresh_noise"] is True
    assert stored["split"] == {"train": 1197, "validation": 300, "test": 300}
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["heldout"]) == {"test"}
    (entry,) = metrics["heldout"]["test"].values()
    assert entry["units"] == "box" and entry["num_points"] == 300
    assert entry["log_z_method"] == "tracked"
    assert "digits test split" in out and "also used to select" not in out
    assert "off its box by the logit map" in out

    # the same number from the pieces: the energy at each test image's model coordinates,
    # the log Z used, and each image's log |dz/dx| (logit map and standardization)
    digits = numpyro_ebm.datasets.digits()
    box = numpyro_ebm.bounded.logit_box(-1.0, 1.0)
    y_train = np.asarray(numpyro_ebm.bounded.unbounded(digits.train[:-300], box)[0], np.float64)
    y_test, jac = numpyro_ebm.bounded.unbounded(digits.test, box)
    mean, std = y_train.mean(axis=0), y_train.std(axis=0)
    z = (np.asarray(y_test, np.float64) - mean) / std
    energy = cli.commands.fit_result(str(run)).energy
    energies = np.asarray(jax.vmap(energy)(jnp.asarray(z, jnp.float32)), np.float64)
    expected = -energies - entry["log_z"] + np.asarray(jac, np.float64) - np.log(std).sum()
    assert entry["log_likelihood"] == pytest.approx(expected.mean(), abs=2e-3)
    points_stderr = expected.std(ddof=1) / math.sqrt(300)  # and log Z's, which moves all
    assert entry["stderr"] == pytest.approx(math.hypot(points_stderr, entry["log_z_stderr"]), 1e-3)

    samples_path = tmp_path / "samples.npy"
    code, _, err = run_cli(
        capsys, "sample", run, "--num", 50, "--out", samples_path, "--mcmc-steps", 20
    )
    assert code == 0, err
    samples = np.load(samples_path)
    # on the box widened by the logit map's margin (0.01 of its width on each side)
    assert samples.shape == (50, 64) and np.all(np.abs(samples) < 1 / 0.98 + 1e-6)

    # a file of points on the box is scored like the test split (the tracked log Z: no AIS
    # again); one off the box is refused
    test_file, bad_file = tmp_path / "test.npy", tmp_path / "bad.npy"
    np.save(test_file, digits.test)
    code, _, err = run_cli(capsys, "evaluate", run, "--log-z", "learned", "--data", test_file)
    assert code == 0, err
    again = json.loads((run / "metrics.json").read_text())["heldout"][str(test_file)]["tracked"]
    expected = -energies - again["log_z"] + np.asarray(jac, np.float64) - np.log(std).sum()
    assert again["log_likelihood"] == pytest.approx(expected.mean(), abs=2e-3)
    np.save(bad_file, np.where(np.arange(64) == 5, 1.5, digits.test[:3]))
    code, _, err = run_cli(capsys, "evaluate", run, "--data", bad_file)
    assert_user_error(code, err, bad_file)
    assert "outside the run's box" in err and "column 5" in err


def test_a_digits_run_from_before_the_logit_map_keeps_its_box_and_splits():
    """A run.json without ``"space"`` trained on the box and selected on the test split: its
    data are prepared as they were, so it resumes and evaluates as before."""
    data = cli.data_files.prepare(
        {"data": {"name": "digits", "standardized": False}, "seed": 0}, None, None
    )
    digits = numpyro_ebm.datasets.digits()
    assert data.box is None and data.test is None
    np.testing.assert_array_equal(data.train, digits.train)
    np.testing.assert_array_equal(data.validation, digits.test)
    assert data.heldout[0] == "validation" and data.units == "data"
