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
