"""Checkpoints: one atomic unit (a kill at any file boundary loses no run), damaged files named,
settings compared by name, finished runs extended, diverged runs kept diverged, one writer."""

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from files import snapshot

import numpyro_ebm as ebm
from numpyro_ebm import training
from numpyro_ebm._io import FolderLockedError, folder_lock
from numpyro_ebm.energies import GaussianEnergy
from numpyro_ebm.training import checkpoint, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# tiny settings: every test here is about files and trajectories, not about the fit's quality
# (nor its log Z: the tracker's compilation would double each test's time; the tracker's state
# through checkpoints is tested in test_training.py)
TINY = dict(
    track_log_z=False,
    num_steps=6,
    num_chains=16,
    num_mcmc_steps=2,
    batch_size=16,
    steps_per_call=2,
    checkpoint_every=2,
    progress_bar=False,
)


def tiny_data():
    return jax.random.normal(jax.random.key(0), (128, 2)) * jnp.array([1.0, 2.0]) + 1.0


def tiny_fit(folder=None, **kwargs):
    settings = {**TINY, **kwargs}
    return ebm.fit(
        GaussianEnergy(jnp.zeros(2)),
        tiny_data(),
        key=jax.random.key(1),
        checkpoint_dir=folder,
        **settings,
    )


def fit_until(folder, step, **kwargs):
    """``tiny_fit`` interrupted (KeyboardInterrupt) just after its checkpoint of ``step``."""
    real_save = checkpoint.save_checkpoint

    def save_then_stop(folder, state, history, meta):
        real_save(folder, state, history, meta)
        if meta["step"] == step:
            raise KeyboardInterrupt

    checkpoint.save_checkpoint = save_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            tiny_fit(folder, **kwargs)
    finally:
        checkpoint.save_checkpoint = real_save


def state_bytes(state) -> bytes:
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, state)
    return buffer.getvalue()


def assert_same_run(a, b):
    assert state_bytes(a.state) == state_bytes(b.state)
    assert sorted(a.history) == sorted(b.history)
    for name in a.history:
        np.testing.assert_array_equal(a.history[name], b.history[name], err_msg=name)


@pytest.fixture(scope="module")
def straight():
    """The uninterrupted run every resumed run must reproduce exactly."""
    return tiny_fit()


# -- B4: one atomic unit -----------------------------------------------------------------------

# Runs TINY's fit; during the checkpoint save of step 4 it counts every call that writes, syncs,
# renames or removes files, and SIGKILLs itself just before call number argv[2] (no kill when
# the save makes fewer calls: the child then finishes and exits 0).
KILLER = textwrap.dedent(
    """
    import os, shutil, signal, sys
    sys.path.insert(0, {tests!r})
    import test_checkpoint as t
    from numpyro_ebm.training import checkpoint

    folder, kill_at = sys.argv[1], int(sys.argv[2])
    calls = []
    armed = [False]

    def hooked(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            if armed[0]:
                if len(calls) == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                calls.append(name)
            return real(*args, **kwargs)

        setattr(module, name, wrapper)

    for module, name in [(os, "fsync"), (os, "replace"), (os, "rename"), (os, "remove"),
                         (os, "unlink"), (os, "rmdir"), (shutil, "rmtree")]:
        hooked(module, name)
    real_save = checkpoint.save_checkpoint

    def save(folder, state, history, meta):
        armed[0] = meta["step"] == 4
        try:
            real_save(folder, state, history, meta)
        finally:
            armed[0] = False

    checkpoint.save_checkpoint = save
    t.tiny_fit(folder)
    print("calls:", calls)
    """
)


@pytest.mark.slow
def test_a_kill_at_every_file_boundary_of_a_checkpoint_loses_no_run(tmp_path, straight):
    """Killed (SIGKILL) before each file operation of a save, then resumed: the run finishes
    with exactly the uninterrupted run's state and history."""
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(tests=os.path.join(ROOT, "tests")))
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        # the children compile the same training step: the first one's compilation is reused
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    kill_at = 0
    while True:
        folder = tmp_path / f"run-{kill_at}"
        proc = subprocess.run(
            [sys.executable, str(script), str(folder), str(kill_at)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
        )
        if proc.returncode == 0:  # the save made fewer calls than kill_at: every one was hit
            break
        assert proc.returncode == -9, proc.stderr
        step = training.checkpoint_step(str(folder))
        assert step in (2, 4), f"kill before call {kill_at}: checkpoint step {step}"
        resumed = tiny_fit(folder)
        assert_same_run(resumed, straight)
        kill_at += 1
    assert kill_at >= 4, proc.stdout  # three files and the pointer at least


def test_a_checkpoint_is_one_folder_named_by_a_pointer_and_older_ones_are_removed(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "step-data").mkdir()  # not the library's naming pattern: never touched
    tiny_fit(tmp_path)
    current = training.latest_checkpoint(str(tmp_path))
    assert os.path.basename(current) == "step-00000006"
    assert sorted(os.listdir(current)) == ["history.npz", "meta.json", "state.eqx"]
    names = set(os.listdir(tmp_path)) - {".lock"}
    assert names == {"latest", "step-00000006", "notes.txt", "step-data"}
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert training.checkpoint_step(str(tmp_path)) == 6
    assert training.checkpoint_step(str(tmp_path / "nothing-here")) is None


def test_a_checkpoint_of_an_earlier_format_is_refused_by_name_and_kept(tmp_path):
    """Checkpoints written before the training core's state layout (format 2) cannot be read
    into this version's state: resuming or loading one raises a CheckpointError naming its
    meta data file and saying what to do, and nothing in the folder changes."""
    fit_until(tmp_path, 4)
    meta_path = os.path.join(training.latest_checkpoint(str(tmp_path)), "meta.json")
    meta = json.loads(open(meta_path).read())
    assert meta.pop("format") == checkpoint.FORMAT
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    before = snapshot(tmp_path)
    for attempt in (
        lambda: tiny_fit(tmp_path),
        lambda: ebm.load(tmp_path, GaussianEnergy(jnp.zeros(2))),
    ):
        with pytest.raises(ebm.CheckpointError, match="earlier numpyro_ebm") as info:
            attempt()
        assert info.value.path == meta_path
    assert snapshot(tmp_path) == before


def test_a_checkpoint_records_the_weight_decay_and_one_from_before_it_resumes(tmp_path):
    """``load`` rebuilds the run's ``weight_decay``; a run resumed with another one is refused
    by name with nothing changed; a checkpoint written before the setting existed (no entry)
    resumes as one without decay."""
    fit_until(tmp_path, 4, weight_decay=0.1)
    assert ebm.load(tmp_path, GaussianEnergy(jnp.zeros(2))).config.weight_decay == 0.1
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"weight_decay: 0\.1 -> 0\.0"):
        tiny_fit(tmp_path)
    assert snapshot(tmp_path) == before
    meta_path = os.path.join(training.latest_checkpoint(str(tmp_path)), "meta.json")
    meta = json.loads(open(meta_path).read())
    del meta["config"]["weight_decay"], meta["defaults"]["weight_decay"]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    resumed = tiny_fit(tmp_path)
    assert int(resumed.state.step) == TINY["num_steps"]


def test_a_checkpoint_from_before_the_log_z_tracker_resumes_without_one(tmp_path):
    """Format 2 (before the tracker) is this version's state without a tracker: such a run
    resumes with ``track_log_z=False`` (with the default, a clear settings error says so, and
    nothing changes), and ``ebm.load`` rebuilds it with the noise-contrastive log Z."""
    fit_until(tmp_path, 4)  # TINY: track_log_z=False
    meta_path = os.path.join(training.latest_checkpoint(str(tmp_path)), "meta.json")
    meta = json.loads(open(meta_path).read())
    meta["format"] = 2  # as the previous version wrote it: no tracker settings recorded
    for name in ("track_log_z", "log_z_particles", "log_z_groups"):
        del meta["config"][name], meta["defaults"][name]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="track_log_z: False -> True"):
        tiny_fit(tmp_path, track_log_z=True)
    assert snapshot(tmp_path) == before
    loaded = ebm.load(tmp_path, GaussianEnergy(jnp.zeros(2)))
    assert int(loaded.state.step) == 4 and loaded.log_z.method == "nce-learned"
    resumed = tiny_fit(tmp_path)
    assert int(resumed.state.step) == TINY["num_steps"]


@pytest.mark.parametrize("format_", [3, 4])
def test_a_checkpoint_of_an_older_tracker_layout_resumes(tmp_path, monkeypatch, format_):
    """Format 3 stored the tracker's state without ``raised`` and what follows it, format 4
    without the importance fusion's running means: both resume (nothing raised to release,
    the running means start afresh). Without the fusion, and where the floor had raised
    nothing, the run continues exactly as a straight one; with it, it runs to the end and
    its running means are set."""
    tracked = dict(track_log_z=True, log_z_particles=64, log_z_groups=4, log_z_fuse_ess=None)
    real_save = checkpoint.save_checkpoint

    def save_as_older(folder, state, history, meta):
        real_save(folder, checkpoint._legacy(state, format_), history, meta)

    for fuse in (None, 0.2):
        folder = tmp_path / str(fuse)
        tracked["log_z_fuse_ess"] = fuse
        with monkeypatch.context() as patch:
            patch.setattr(checkpoint, "FORMAT", format_)
            patch.setattr(checkpoint, "save_checkpoint", save_as_older)
            fit_until(folder, 4, **tracked)
        meta_path = os.path.join(training.latest_checkpoint(str(folder)), "meta.json")
        assert json.loads(open(meta_path).read())["format"] == format_
        resumed = tiny_fit(folder, **tracked)
        assert int(resumed.state.step) == TINY["num_steps"]
        if fuse is None:
            straight = tiny_fit(None, **tracked)
            assert all(float(t.raised) == 0.0 for t in straight.state.log_z_tracker.values())
            assert_same_run(resumed, straight)
        else:
            for t in resumed.state.log_z_tracker.values():
                assert float(t.importance_variance) > 0 and float(t.importance_ess) > 0


@pytest.mark.parametrize("damaged", ["state.eqx", "history.npz", "meta.json", "latest"])
@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_a_damaged_checkpoint_file_is_named_and_nothing_is_deleted(tmp_path, damaged, how):
    fit_until(tmp_path, 4)
    current = training.latest_checkpoint(str(tmp_path))
    path = tmp_path / damaged if damaged == "latest" else os.path.join(current, damaged)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2] if how == "truncated" else b"\x00garbage{" * 3)
    before = snapshot(tmp_path)
    for attempt in (
        lambda: tiny_fit(tmp_path),
        lambda: training.checkpoint_step(str(tmp_path)),
    ):
        with pytest.raises(ebm.CheckpointError) as info:
            attempt()
        assert info.value.path == str(path), info.value
    assert snapshot(tmp_path) == before


# -- B8: settings compared by name; runs extended -----------------------------------------------


def test_draw_settings_are_not_training_settings(tmp_path, straight):
    """Warm-up, thinning, chains and init scale of ``sample`` are ``DrawSettings``, not fields
    of the training ``Sampler``: they cannot block resuming."""
    with pytest.raises(TypeError, match="num_warmup"):
        ebm.samplers.Sampler(num_warmup=7)
    fit_until(tmp_path, 4)
    assert_same_run(tiny_fit(tmp_path, sampler=ebm.samplers.Sampler()), straight)


def test_a_differing_setting_is_named_with_both_values(tmp_path):
    fit_until(tmp_path, 4)
    sampler = ebm.samplers.Sampler(step_size=0.1)
    with pytest.raises(ValueError, match=r"sampler\.step_size: 0\.05 .*0\.1"):
        tiny_fit(tmp_path, sampler=sampler)
    with pytest.raises(ValueError, match=r"learning_rate: 0\.005 .*0\.001"):
        tiny_fit(tmp_path, learning_rate=1e-3)
    with pytest.raises(ValueError, match=r"num_chains: 16 .*32"):
        tiny_fit(tmp_path, num_chains=32)


def test_a_setting_missing_from_an_old_checkpoint_matches_its_default(tmp_path, straight):
    """A library upgrade adds a setting: old checkpoints lack it, and resume if the run uses
    its default."""
    fit_until(tmp_path, 4)
    meta_path = os.path.join(training.latest_checkpoint(str(tmp_path)), "meta.json")
    meta = json.loads(open(meta_path).read())
    del meta["config"]["negatives"]["sampler"]["step_size_jitter"], meta["config"]["record_every"]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match=r"record_every: .*10.* 5"):
        tiny_fit(tmp_path, record_every=5)
    assert_same_run(tiny_fit(tmp_path), straight)


def test_a_finished_run_is_extended_on_its_schedule(tmp_path):
    """``num_steps=10`` on a finished 6-step run continues it; the default optimizer keeps
    the cosine schedule the run started with (after its end: 10% of the peak rate), so the
    extended run is the 10-step run with ``default_optimizer(6, ...)``."""
    tiny_fit(tmp_path)
    extended = tiny_fit(tmp_path, num_steps=10)
    reference = tiny_fit(num_steps=10, optimizer=training.default_optimizer(6, 5e-3))
    assert int(extended.state.step) == 10
    assert state_bytes(extended.state) == state_bytes(reference.state)
    for name in ("loss", "energy_gap", "step_size"):
        np.testing.assert_array_equal(extended.history[name], reference.history[name])
    with pytest.raises(ValueError, match=r"step 10.*num_steps=8"):
        tiny_fit(tmp_path, num_steps=8)


# -- B5: a diverged run stays diverged -----------------------------------------------------------


def test_a_diverged_run_never_finishes_however_often_it_is_rerun(tmp_path):
    settings = dict(learning_rate=1e30, max_nonfinite=3, num_steps=10)
    energy = ebm.energies.MLPEnergy(2, hidden=(8,), key=jax.random.key(2))
    steps = []
    for attempt in range(6):
        with (
            pytest.warns(RuntimeWarning) if attempt == 0 else contextlib.nullcontext(),
            pytest.raises(ebm.TrainingDivergedError) as info,
        ):
            ebm.fit(
                energy,
                tiny_data(),
                key=jax.random.key(1),
                checkpoint_dir=tmp_path,
                **{**TINY, **settings},
            )
        steps.append(int(info.value.state.step))
        assert "learning_rate" in str(info.value) and "energy_l2" in str(info.value)
        assert training.checkpoint_step(str(tmp_path)) == steps[0]
    assert steps == [steps[0]] * 6 and steps[0] < settings["num_steps"]
    # the last accepted step: every row after it in the history was rejected
    history = info.value.history
    accepted = np.asarray(history["is_finite"], bool)
    assert accepted.sum() == steps[0] and not accepted[steps[0] :].any()


def test_a_rejected_step_does_not_advance_training_and_is_retried_with_a_new_key():
    key = jax.random.key(3)
    first = training.attempt_key(key, jnp.int32(5), jnp.int32(0))
    retry = training.attempt_key(key, jnp.int32(5), jnp.int32(1))
    assert jnp.array_equal(
        jax.random.key_data(first), jax.random.key_data(jax.random.fold_in(key, 5))
    )  # runs without rejections keep their trajectory
    assert not jnp.array_equal(jax.random.key_data(first), jax.random.key_data(retry))
    fields = dict.fromkeys(training.TrainState._fields)
    state = training.TrainState(
        **{**fields, "step": jnp.int32(5), "consecutive_nonfinite": jnp.int32(0)}
    )
    proposed = state._replace(step=jnp.int32(6))
    rejected = training.keep_if_finite(jnp.asarray(False), proposed, state)
    assert int(rejected.step) == 5 and int(rejected.consecutive_nonfinite) == 1


# -- one writer ---------------------------------------------------------------------------------


def test_a_second_writer_is_refused_before_any_compute(tmp_path, monkeypatch):
    def no_compute(*args, **kwargs):
        raise AssertionError("computed before taking the lock")

    monkeypatch.setattr(loop, "run_steps", no_compute)
    with folder_lock(tmp_path):
        with pytest.raises(FolderLockedError, match=f"process {os.getpid()}"):
            tiny_fit(tmp_path)
    assert os.listdir(tmp_path) == [".lock"]


def test_a_run_that_wrote_no_checkpoint_leaves_no_folder(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "run_steps", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny_fit(tmp_path / "new")
    assert not (tmp_path / "new").exists()


def _jitter(key, points):
    return points + 0.01 * jax.random.normal(key, points.shape)


def test_augment_is_recorded_by_name_and_an_old_checkpoint_had_none(tmp_path, straight):
    fit_until(tmp_path, 4)
    with pytest.raises(ValueError, match=r"augment: None -> .*_jitter"):
        tiny_fit(tmp_path, augment=_jitter)
    meta_path = os.path.join(training.latest_checkpoint(str(tmp_path)), "meta.json")
    meta = json.loads(open(meta_path).read())
    del meta["augment"]  # written before augment existed: its batches were not augmented
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match=r"augment: None -> .*_jitter"):
        tiny_fit(tmp_path, augment=_jitter)
    assert_same_run(tiny_fit(tmp_path), straight)


def test_a_checkpoint_is_read_into_inits_shapes_without_running_init():
    """``load`` and a resumed ``fit`` read the state into ``shapes_of(init)``: its arrays are
    shapes, and nothing ``init`` computes runs (the tracker's start is an AIS)."""
    ran = []

    def init(x, scale):
        jax.debug.callback(lambda: ran.append(True))  # runs only if init is computed
        return {"twice": scale * x, "sum": jnp.sum(x)}, "static"

    shapes, static = checkpoint.shapes_of(init)(jnp.ones(3), scale=2.0)
    jax.effects_barrier()
    assert ran == [] and static == "static"
    assert shapes["twice"] == jax.ShapeDtypeStruct((3,), jnp.float32)
    assert shapes["sum"] == jax.ShapeDtypeStruct((), jnp.float32)
    init(jnp.ones(3), 2.0)
    jax.effects_barrier()
    assert ran == [True]  # the callback does report a computed init
