"""Helpers for tests about files on disk (imported by test modules; pytest puts tests/ on the
path)."""

import os


def snapshot(folder) -> dict:
    """Every file under ``folder`` with its bytes (to show that nothing changed)."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out
