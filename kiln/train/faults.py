"""Fault injection for tests: environment variables that make a chosen rank die or hang at a chosen step,
on the first attempt of a job only (torchrun's restarts then run clean, as after a real failure)."""

from __future__ import annotations

import os
import signal
import time

from kiln.train.distributed import restart_count

# SIGKILL halfway through writing the checkpoint of that step (after the shards, before it is complete).
CRASH_DURING_CHECKPOINT = "KILN_TEST_CRASH_DURING_CHECKPOINT"
CRASH_AFTER_STEP = "KILN_TEST_CRASH_AFTER_STEP"  # SIGKILL right after that optimizer step
HANG_AFTER_STEP = "KILN_TEST_HANG_AFTER_STEP"  # stop responding (sleep) after that optimizer step
FAULT_RANK = "KILN_TEST_FAULT_RANK"  # the rank that fails (default: every rank)


def inject(variable: str, step: int, rank: int) -> None:
    """Fail as `variable` says if it names this step (and FAULT_RANK, if set, names this rank)."""
    if os.environ.get(variable) != str(step) or restart_count() > 0:
        return
    if os.environ.get(FAULT_RANK, str(rank)) != str(rank):
        return
    if variable == HANG_AFTER_STEP:
        time.sleep(3600)
    os.kill(os.getpid(), signal.SIGKILL)
