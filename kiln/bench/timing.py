"""Wall-clock timing shared by the benchmark drivers."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

Result = TypeVar("Result")


def best_of(repeats: int, run: Callable[[], Result]) -> tuple[float, Result]:
    """The fastest of `repeats` calls of `run`, in seconds, and the last call's result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, result


def best_of_each(repeats: int, runs: dict[str, Callable[[], Result]]) -> dict[str, tuple[float, Result]]:
    """best_of for several sides at once, called round-robin (a, b, a, b, ...), so that a slow or fast
    phase of a shared machine lands on every side alike: name -> (fastest seconds, last call's result)."""
    best: dict[str, tuple[float, Result]] = {}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            result = run()
            seconds = time.perf_counter() - start
            best[name] = (min(seconds, best[name][0]) if name in best else seconds, result)
    return best
