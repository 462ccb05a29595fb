"""What the modules of ``numpyro_ebm.cli`` share: file names, exit codes, the run's key tags,
``UsageError`` and strict JSON writing."""

from __future__ import annotations

import json
import math

import numpy as np

from numpyro_ebm import _io, datasets

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
KEY_DATA, KEY_SPLIT, KEY_ENERGY, KEY_FIT, KEY_LOG_Z, KEY_KL, KEY_DEQUANTIZE, KEY_LAG = range(8)

MIN_TRAIN_ROWS = 10
MIN_HELDOUT_ROWS = 2  # a standard error needs two points


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


def jsonable(value):
    """``value`` as JSON stores it, with non-finite floats as ``None`` (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    return value


def write_json(path: str, obj) -> None:
    text = json.dumps(jsonable(obj), indent=1, ensure_ascii=False, allow_nan=False)
    _io.atomic_write(path, lambda f: f.write(text + "\n"), mode="w")
