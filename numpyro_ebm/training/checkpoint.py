"""Checkpoints: one atomic unit per save, verified on reading, one writer per folder.

Layout of a checkpoint folder: one sub-folder per checkpoint, ``step-00000080/`` holding
``state.eqx``, ``history.npz`` and ``meta.json`` (which records the other two files' sizes and
SHA-256), and the pointer file ``latest`` naming the current one. A save writes a complete new
sub-folder under a temporary name, renames it, then replaces the pointer (the one atomic
switch), and only then removes older sub-folders: a crash at any point leaves the pointer on
a complete checkpoint, the new one or the previous one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import numpy as np

from numpyro_ebm import _io
from numpyro_ebm._io import LOCK_FILE, folder_lock
from numpyro_ebm.logz.tracking import TrackerState

__all__ = [
    "FORMAT",
    "RECORDED_PREFIX",
    "CheckpointError",
    "checkpoint_step",
    "init_or_shapes",
    "latest_checkpoint",
    "load_checkpoint",
    "meta_path",
    "one_writer",
    "read_meta",
    "resume",
    "save_checkpoint",
    "saver",
    "shapes_of",
    "stored_meta",
]

# The state's layout: checkpoints of another format cannot be read into this version's state,
# except format 2 (before the log Z tracker): its state is this version's without a tracker,
# format 3 (before the floor released its raises): its trackers lack ``raised`` and what
# follows, and format 4 (before the floor fused its importance estimate): they lack
# ``importance_variance`` and ``importance_ess``.
FORMAT = 5
UNFUSED_FORMAT = 4
UNRELEASED_FORMAT = 3
UNTRACKED_FORMAT = 2
READABLE_FORMATS = (FORMAT, UNFUSED_FORMAT, UNRELEASED_FORMAT, UNTRACKED_FORMAT)
STATE_FILE = "state.eqx"
RECORDED_PREFIX = "recorded."  # recorded-chain arrays share history.npz under this prefix
HISTORY_FILE = "history.npz"
META_FILE = "meta.json"
_POINTER_FILE = "latest"
_STEP_FOLDER = re.compile(r"step-\d{8,}(\.\d+)?")  # the only sub-folders a save ever removes
_TMP_FOLDER = ".tmp-step-"
_TMP_POINTER = ".tmp-latest-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: a file is damaged, truncated or inconsistent with the
    others, or written by a version whose state this one cannot read. ``path`` names the file
    (or the folder); ``problem`` says what is wrong with it. Nothing is deleted when it is
    raised."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def _manifest_entry(data: bytes) -> dict:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def save_checkpoint(folder: str, state, history: dict, meta: dict) -> None:
    """Write ``state``, ``history`` and ``meta`` (JSON-able; must hold ``"step"``) as one new
    checkpoint of ``folder``, atomically as a set.

    The three files go into a new sub-folder ``step-<step>/`` (fsynced, under a temporary name
    until complete); then the pointer file ``latest`` is replaced to name it (the switch), and
    only then are older ``step-*`` sub-folders removed. A crash at any point leaves ``latest``
    on a complete checkpoint. Nothing else in ``folder`` is touched.
    """
    os.makedirs(folder, exist_ok=True)
    state_buffer, history_buffer = io.BytesIO(), io.BytesIO()
    eqx.tree_serialise_leaves(state_buffer, state)
    np.savez(history_buffer, **history)
    files = {STATE_FILE: state_buffer.getvalue(), HISTORY_FILE: history_buffer.getvalue()}
    files_meta = {name: _manifest_entry(data) for name, data in files.items()}
    meta = {**meta, "format": FORMAT, "files": files_meta}
    files[META_FILE] = (json.dumps(meta, indent=1) + "\n").encode()  # last: it vouches for all
    tmp = tempfile.mkdtemp(dir=folder, prefix=_TMP_FOLDER)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes the folder private; checkpoints are not
        for name, data in files.items():
            _io.write_synced(os.path.join(tmp, name), data)
        _io.fsync_folder(tmp)
        name = _free_step_name(folder, int(meta["step"]))
        os.rename(tmp, os.path.join(folder, name))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _io.fsync_folder(folder)
    _io.atomic_write(
        os.path.join(folder, _POINTER_FILE), lambda f: f.write(name + "\n"), "w", _TMP_POINTER
    )
    _remove_older(folder, keep=name)


def _free_step_name(folder: str, step: int) -> str:
    """``step-<step>``, or ``step-<step>.<n>`` when a checkpoint of that step exists already
    (a run that diverged is saved again at its last accepted step)."""
    name = f"step-{step:08d}"
    n = 0
    while os.path.lexists(os.path.join(folder, name if n == 0 else f"{name}.{n}")):
        n += 1
    return name if n == 0 else f"{name}.{n}"


def _remove_older(folder: str, keep: str) -> None:
    """Remove the sub-folders and temporary files of earlier saves (the library's own names
    only), all but ``keep``."""
    for entry in os.listdir(folder):
        path = os.path.join(folder, entry)
        if entry == keep or os.path.islink(path):
            continue
        if os.path.isdir(path) and (_STEP_FOLDER.fullmatch(entry) or entry.startswith(_TMP_FOLDER)):
            shutil.rmtree(path)
        elif entry.startswith(_TMP_POINTER) and os.path.isfile(path):
            os.remove(path)


def latest_checkpoint(folder: str) -> str | None:
    """The folder holding the current checkpoint of ``folder`` (``folder/step-<step>``; a
    checkpoint of the previous layout, with the files directly in ``folder``: ``folder``
    itself), or None when there is none.

    Raises:
        CheckpointError: the pointer file is damaged or names no checkpoint.
    """
    pointer = os.path.join(folder, _POINTER_FILE)
    if not os.path.lexists(pointer):
        return folder if os.path.lexists(os.path.join(folder, META_FILE)) else None
    try:
        with open(pointer, encoding="utf-8") as f:
            name = f.read(4096).strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(pointer, f"cannot be read ({err})") from err
    if not _STEP_FOLDER.fullmatch(name) or not os.path.isdir(os.path.join(folder, name)):
        raise CheckpointError(
            pointer, f"does not name a checkpoint folder of {folder} (it holds {name[:40]!r})"
        )
    return os.path.join(folder, name)


def read_meta(checkpoint: str) -> dict:
    path = os.path.join(checkpoint, META_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise TypeError(f"a JSON object was expected, not {type(meta).__name__}")
        if not (isinstance(meta["step"], int) and meta["step"] >= 0):
            raise ValueError(f"step {meta['step']!r} is not a step number")
        if not isinstance(meta.get("files", {}), dict):
            raise TypeError("its 'files' entry is not a JSON object")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(path, f"cannot be read ({type(err).__name__}: {err})") from err
    if meta.get("format") == UNTRACKED_FORMAT and isinstance(meta.get("config"), dict):
        # written before the log Z tracker existed: the run had none, and resumes without one
        meta["config"].setdefault("track_log_z", False)
    return meta


def _read_verified(checkpoint: str, name: str, meta: dict) -> bytes:
    """A checkpoint file's bytes, checked against the size and hash ``meta`` recorded."""
    path = os.path.join(checkpoint, name)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise CheckpointError(path, f"cannot be read ({err})") from err
    entry = meta.get("files", {}).get(name)
    if entry is not None and _manifest_entry(data) != entry:
        raise CheckpointError(
            path,
            f"is damaged or truncated ({len(data)} bytes; {entry.get('bytes')} were written, "
            "and its SHA-256 differs)",
        )
    return data


def checkpoint_step(folder: str | os.PathLike) -> int | None:
    """The step of the current checkpoint in ``folder`` (None when there is none).

    Checks the whole checkpoint (pointer, meta data and the recorded size and SHA-256 of the
    state and history files) without building the state.

    Raises:
        CheckpointError: a damaged, truncated or missing checkpoint file (named).
    """
    checkpoint = latest_checkpoint(os.fspath(folder))
    if checkpoint is None:
        return None
    meta = read_meta(checkpoint)
    for name in (STATE_FILE, HISTORY_FILE):
        _read_verified(checkpoint, name, meta)
    return meta["step"]


def checkpoint_best_step(folder: str | os.PathLike) -> int | None:
    """The step of the selected energy (``FitResult.best_step``) in ``folder``'s current
    checkpoint, without building the state: None when there is no checkpoint, nothing was
    selected yet (no validation data, or before the first held-out score), or the checkpoint
    was written before the step was recorded. With ``checkpoint_step`` it says whether a
    run with ``patience`` is over before ``num_steps``.

    Raises:
        CheckpointError: a damaged or truncated ``meta.json`` (named).
    """
    checkpoint = latest_checkpoint(os.fspath(folder))
    if checkpoint is None:
        return None
    best = read_meta(checkpoint).get("best_step")
    if not (best is None or (type(best) is int and best >= 0)):
        raise CheckpointError(
            os.path.join(checkpoint, META_FILE), f"has a wrong 'best_step' entry ({best!r})"
        )
    return best


def load_checkpoint(
    folder: str, like, expected: dict | None = None
) -> tuple[object, dict, dict] | None:
    """Read the current checkpoint of ``folder`` (``None`` if it has none).

    Args:
        folder: a folder written by ``save_checkpoint`` (or by the previous version, with the
            files directly in it).
        like: a ``TrainState`` of the same structure (e.g. ``init``'s).
        expected: the run's settings (``{"config": TrainConfig.describe(), ...}``); they are
            compared by name with the stored ones before the state is read (``ValueError``
            naming each differing setting with both values; a setting the checkpoint does
            not record matches its default).

    Returns:
        ``(state, history, meta)``.

    Raises:
        CheckpointError: a damaged, truncated or inconsistent file (named); nothing is deleted.
    """
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        return None
    meta = read_meta(checkpoint)
    if meta.get("format", 1) not in READABLE_FORMATS:
        raise CheckpointError(
            os.path.join(checkpoint, META_FILE),
            f"was written by an earlier numpyro_ebm (state format {meta.get('format', 1)}; this "
            f"version reads format {FORMAT}): resume it with that version, or train into a new "
            "checkpoint_dir",
        )
    if expected is not None:
        differences = _setting_differences(meta, expected)
        if differences:
            raise ValueError(
                f"{folder} holds a checkpoint of a run with different settings "
                f"({'; '.join(differences)}); use the same settings to resume it, or another "
                "checkpoint_dir"
            )
    state_path = os.path.join(checkpoint, STATE_FILE)
    data = _read_verified(checkpoint, STATE_FILE, meta)
    try:
        if meta.get("format") in _LEGACY_TRACKERS:
            legacy = _legacy(like, meta["format"])
            state = _completed(eqx.tree_deserialise_leaves(io.BytesIO(data), legacy))
        else:
            state = eqx.tree_deserialise_leaves(io.BytesIO(data), like)
    except Exception as err:  # truncated or foreign file: equinox/numpy raise various types
        raise CheckpointError(state_path, f"cannot be read ({type(err).__name__}: {err})") from err
    history_path = os.path.join(checkpoint, HISTORY_FILE)
    data = _read_verified(checkpoint, HISTORY_FILE, meta)
    try:
        with np.load(io.BytesIO(data)) as npz:
            history = {k: npz[k] for k in npz.files}
    except Exception as err:  # truncated zip, bad header: numpy raises various types
        raise CheckpointError(
            history_path, f"cannot be read ({type(err).__name__}: {err})"
        ) from err
    columns = [v for k, v in history.items() if not k.startswith(RECORDED_PREFIX)]
    rows = meta.get("history_rows", meta["step"])  # the previous version: one row per step
    if int(state.step) != meta["step"] or any(len(v) != rows for v in columns):
        raise CheckpointError(
            checkpoint,
            f"inconsistent checkpoint (state step {int(state.step)}, meta step {meta['step']}, "
            f"{rows} history rows expected)",
        )
    return state, history, meta


def _tracker_before(field: str):
    """``TrackerState``'s layout up to ``field`` (excluded), as an older format stored it."""
    fields = TrackerState._fields[: TrackerState._fields.index(field)]
    return NamedTuple(f"_TrackerStateBefore_{field}", [(name, jax.Array) for name in fields])


# what each older format's trackers lack, and the value they start from
_MISSING = {"raised": 0.0, "importance_variance": 0.0, "importance_ess": -1.0}
_LEGACY_TRACKERS = {
    UNRELEASED_FORMAT: _tracker_before("raised"),
    UNFUSED_FORMAT: _tracker_before("importance_variance"),
}


def _is_tracker(x) -> bool:
    return isinstance(x, (TrackerState, *_LEGACY_TRACKERS.values()))


def _legacy(like, format_):
    """``like`` with each tracker in ``format_``'s layout (to read such a checkpoint into)."""
    layout = _LEGACY_TRACKERS[format_]

    def old(x):
        if not isinstance(x, TrackerState):
            return x
        return layout(*x[: len(layout._fields)])

    return jax.tree.map(old, like, is_leaf=_is_tracker)


def _completed(state):
    """An older format's state in this version's layout: nothing raised is released (the
    raises it holds stay, as that version kept them), and the importance fusion's running
    means start afresh."""

    def new(x):
        if isinstance(x, TrackerState) or not _is_tracker(x):
            return x
        dtype = x.group_log_z.dtype
        missing = TrackerState._fields[len(x) :]
        return TrackerState(*x, **{k: jax.numpy.full((), _MISSING[k], dtype) for k in missing})

    return jax.tree.map(new, state, is_leaf=_is_tracker)


def _flat_settings(settings: dict, prefix: str = "") -> dict:
    """``{"config": {"sampler": {"kernel": ...}}}`` -> ``{"sampler.kernel": ...}`` (the
    ``config`` level is dropped: its settings are named as ``fit``'s arguments are)."""
    out = {}
    for key, value in settings.items():
        name = key if key == "config" and not prefix else f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_settings(value, "" if name == "config" else f"{name}."))
        else:
            out[name] = value
    return out


def _named_settings(meta: dict, config_key: str = "config") -> dict:
    """The settings in a checkpoint's meta data (or in a run's expected meta data), by name."""
    names = (config_key, "event_shape", "select_best", "augment")
    settings = {k: meta[k] for k in names if k in meta}
    if config_key != "config" and config_key in settings:
        settings["config"] = settings.pop(config_key)
    if config_key != "config" and "select_best" in settings:
        settings["select_best"] = False  # a checkpoint from before selection kept no best
    if config_key != "config" and "augment" in settings:
        settings["augment"] = None  # nor did one from before augment augment its batches
    rates = meta.get("learning_rates")
    if isinstance(rates, list) and len(rates) == 2:
        settings["learning_rate"], settings["generator_learning_rate"] = rates
    return _flat_settings(settings)


def _setting_differences(meta: dict, expected: dict) -> list[str]:
    """``"name: stored -> wanted"`` for each setting the run has otherwise than the
    checkpoint. A setting the checkpoint does not record (written before the setting
    existed) counts as its default (``expected["defaults"]``)."""
    stored = _named_settings(meta)
    expected = json.loads(json.dumps(expected))  # tuples -> lists, as stored
    wanted = _named_settings(expected)
    defaults = _named_settings(expected, "defaults") if "defaults" in expected else {}
    differences = []
    for name in sorted(set(stored) | set(wanted)):
        old = stored.get(name, defaults.get(name, "(not set)"))
        new = wanted.get(name, "(not set)")
        if old != new:
            differences.append(f"{name}: {old} -> {new}")
    return differences


@contextlib.contextmanager
def _checkpoint_lock(folder: str):
    """Hold ``folder``'s lock (``_io.folder_lock``), creating the folder if needed; if it was
    created here and no checkpoint was written, remove it again (and the parents created with
    it) on the way out."""
    created = []
    path = os.path.abspath(folder)
    while not os.path.lexists(path):
        created.append(path)
        path = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    try:
        with folder_lock(folder):
            try:
                yield
            finally:
                if created and os.listdir(folder) == [LOCK_FILE]:
                    os.remove(os.path.join(folder, LOCK_FILE))  # safe while held (folder_lock)
    finally:
        for path in created:  # innermost first; a folder someone else filled stays
            try:
                os.rmdir(path)
            except OSError:
                break


def one_writer(fit_function):
    """``fit`` holding ``checkpoint_dir``'s lock for the whole run (process 0 only: the one
    that writes), so a second writer fails before any compute."""

    @functools.wraps(fit_function)
    def locked(*args, checkpoint_dir=None, **kwargs):
        if checkpoint_dir is None or jax.process_index() != 0:
            return fit_function(*args, checkpoint_dir=checkpoint_dir, **kwargs)
        with _checkpoint_lock(os.fspath(checkpoint_dir)):
            return fit_function(*args, checkpoint_dir=checkpoint_dir, **kwargs)

    return locked


def meta_path(folder: str) -> str:
    """The meta-data file of ``folder``'s current checkpoint."""
    return os.path.join(latest_checkpoint(folder) or folder, META_FILE)


def stored_meta(folder: str | os.PathLike) -> dict | None:
    """The meta data of ``folder``'s current checkpoint (None when there is none)."""
    checkpoint = latest_checkpoint(os.fspath(folder))
    return None if checkpoint is None else read_meta(checkpoint)


def _with_records(history: dict, recorded: dict) -> dict:
    out = dict(history)
    for site, records in recorded.items():
        out.update({f"{RECORDED_PREFIX}{site}.{k}": v for k, v in records.items()})
    return out


def _split_records(stored: dict) -> tuple[dict, dict]:
    history, recorded = {}, {}
    for key, value in stored.items():
        if key.startswith(RECORDED_PREFIX):
            site, _, name = key.removeprefix(RECORDED_PREFIX).partition(".")
            recorded.setdefault(site, {})[name] = value
        else:
            history[key] = value
    return history, recorded


def shapes_of(init: Callable) -> Callable:
    """``init`` returning its state as ``jax.ShapeDtypeStruct`` leaves, computing nothing:
    what a checkpoint is read into. ``init`` may run costly set-up that the checkpoint's state
    replaces (``core.init`` runs the ``log Z`` tracker's start: on 64-D digits an AIS of half a
    minute on a CPU, once per ``load``)."""
    # the arguments are closed over, not traced: init's checks of its data stay concrete
    return lambda *args, **kwargs: eqx.filter_eval_shape(lambda: init(*args, **kwargs))


def init_or_shapes(init: Callable, stored: dict | None) -> Callable:
    """``init`` for a new run; for one resumed from a checkpoint (``stored``, its meta, not
    None) ``shapes_of(init)``: the state is read from the checkpoint."""
    return init if stored is None else shapes_of(init)


def resume(folder, like, expected: dict | None, stored: dict | None):
    """``(state, history, recorded)`` to start from: ``like`` with empty history when
    ``folder`` holds no checkpoint (``stored`` is None), else the checkpoint's (its settings
    compared with ``expected``, when given).

    Raises:
        TrainingDivergedError: the checkpoint holds a run that diverged with these settings.
    """
    if folder is None or stored is None:
        return like, {}, {}
    state, history, meta = load_checkpoint(os.fspath(folder), like, expected=expected)
    history, recorded = _split_records(history)
    if expected is not None and meta.get("diverged"):
        from numpyro_ebm.training.loop import DIVERGED_ADVICE, TrainingDivergedError

        raise TrainingDivergedError(
            f"{folder} holds a run that diverged after step {int(state.step)} with these "
            f"settings. {DIVERGED_ADVICE}",
            state,
            history,
        )
    return state, history, recorded


def saver(folder, meta: dict):
    """``save(state, history, recorded, diverged)`` writing checkpoints of a run to
    ``folder`` (process 0 only: multi-host runs share the folder), or None without a folder."""
    if folder is None:
        return None
    folder = os.fspath(folder)

    def save(state, history, recorded, diverged):
        if jax.process_index() != 0:
            return
        rows = len(history["is_finite"])  # accepted and rejected steps
        best = getattr(state, "best", None)
        best_step = None if best is None or int(best.step) < 0 else int(best.step)
        info = {
            "step": int(state.step),
            "history_rows": rows,
            "diverged": diverged,
            "best_step": best_step,
        }
        save_checkpoint(folder, state, _with_records(history, recorded), {**meta, **info})

    return save
