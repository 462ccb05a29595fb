"""Interleaved step timing shared by the speed benchmarks (imported by the scripts here)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(rows: dict[str, Callable[[], None]], repeats: int, steps: int) -> dict:
    """Seconds per step of each row: every row runs once to compile, then the rows take turns
    ``repeats`` times (so a slow phase of the machine hits them all). Returns name -> list."""
    for run in rows.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(repeats):
        for name, run in rows.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) / steps)
    return times


def print_table(times: dict, first_column: str, base: str, compare: Callable, header: str):
    """Markdown rows ``name | median ms | range | compare(median, base median)``."""
    reference = statistics.median(times[base])
    print(f"| {first_column} | ms / step (median) | range | {header} |")
    print("|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"| {name} | {1e3 * median:.2f} | {1e3 * min(values):.2f}–{1e3 * max(values):.2f} "
            f"| {compare(median, reference)} |"
        )
