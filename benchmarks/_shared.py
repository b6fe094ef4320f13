"""Helpers shared by the benchmarks (not a benchmark): timing and combining runs' summaries."""

from __future__ import annotations

import json
import time
from collections.abc import Callable


def best_rate(function: Callable[[], object], items: int, repeats: int = 3) -> float:
    """Items per second of ``function`` (which handles ``items`` items): one warm-up call,
    then the best of ``repeats`` timed calls (the least disturbed by other processes)."""
    function()
    best = float("inf")
    for _ in range(max(1, int(repeats))):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return items / best


def combine_summaries(paths: list[str], summary: Callable[..., dict]) -> dict:
    """One summary of several runs' logs: their cases and trainings joined and passed to the
    benchmark's own ``summary(cases, trainings, settings)``."""
    parts = last_json_lines(paths)
    return summary(
        [c for p in parts for c in p["cases"]],
        [t for p in parts for t in p["training"]],
        {"combined_from": paths, "runs": [p["settings"] for p in parts]},
    )


def last_json_lines(paths: list[str]) -> list[dict]:
    """The last line starting with ``{`` of each log (a benchmark's summary), parsed."""
    parts = []
    for path in paths:
        with open(path) as handle:
            lines = [line for line in handle.read().splitlines() if line.startswith("{")]
        if not lines:
            raise SystemExit(f"{path} holds no JSON summary line; did that run finish?")
        parts.append(json.loads(lines[-1]))
    return parts
