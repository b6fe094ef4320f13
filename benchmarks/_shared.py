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
