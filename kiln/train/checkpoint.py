"""Training checkpoints: model, optimizer and RNG through torch.distributed.checkpoint (DCP), plus a JSON
record of the trainer's position. A checkpoint is written to a temporary folder and renamed into place
only once complete, so a crash mid-write leaves the previous checkpoints untouched; the newest K are kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from kiln.errors import KilnError

STATE_NAME = "trainer_state.json"
COMPLETE_NAME = "COMPLETE"
# Fault injection for tests: SIGKILL this process halfway through writing the checkpoint of that step.
CRASH_ENV = "KILN_TEST_CRASH_DURING_CHECKPOINT"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / COMPLETE_NAME).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


@contextlib.contextmanager
def _quiet():
    """DCP warns on every call made without a process group; one process is a supported layout here."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
        )
        yield


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(
    directory: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep` complete ones."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    staging = root / f".tmp-{checkpoint_name(step)}"
    shutil.rmtree(staging, ignore_errors=True)
    model_state, optim_state = get_state_dict(model, optimizer)
    with _quiet():
        dcp.save({"model": model_state, "optim": optim_state, "rng": _rng_state()}, checkpoint_id=staging)
    if os.environ.get(CRASH_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    (staging / STATE_NAME).write_text(json.dumps(trainer_state, indent=2, sort_keys=True))
    _fsync_tree(staging)
    (staging / COMPLETE_NAME).write_text("")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    state_file = Path(path) / STATE_NAME
    if not (Path(path) / COMPLETE_NAME).is_file() or not state_file.is_file():
        raise KilnError(f"{path} is not a complete kiln checkpoint (no {COMPLETE_NAME} marker)")
    return json.loads(state_file.read_text())


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and RNG from checkpoint `path`; return the trainer's JSON state."""
    trainer_state = read_trainer_state(path)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state, "rng": _rng_state()}
    with _quiet():
        dcp.load(state, checkpoint_id=Path(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return trainer_state
