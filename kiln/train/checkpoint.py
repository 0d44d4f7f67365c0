"""Training checkpoints: model, optimizer and per-rank RNG through torch.distributed.checkpoint (DCP),
plus a JSON record of the trainer's position.

Each checkpoint is written to a temporary folder. Under torchrun every rank writes its own shards there
and syncs them to disk; only after a barrier shows that all ranks have done so does rank 0 write the
JSON record and the COMPLETE marker and rename the folder into place. A process that dies mid-write
(any rank) therefore leaves the previous checkpoints untouched, and only complete ones are resumed from.
DCP stores every tensor with its global shape and the pieces each rank held, so a checkpoint saved under
one parallel layout loads under any other (FSDP -> one process, TP -> FSDP, ...). The newest K are kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from kiln.errors import KilnError
from kiln.train import faults
from kiln.train.distributed import Distributed

STATE_NAME = "trainer_state.json"
COMPLETE_NAME = "COMPLETE"
CRASH_ENV = faults.CRASH_DURING_CHECKPOINT  # kept for callers of the single-process fault test
# Optimizer state keyed by parameter name, hyperparameters included (optim.param_groups.<fqn>.lr): under
# pipeline parallelism each rank's param groups hold other parameters, and a group saved as a list
# (optim.param_groups.0.params) would be written by one rank only.
FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


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
    distributed: Distributed | None = None,
) -> Path:
    """Write checkpoint `step` atomically (a collective under torchrun: every rank calls it) and delete
    all but the newest `keep` complete ones. `trainer_state` is rank 0's."""
    distributed = distributed or Distributed.single()
    root = Path(directory)
    final = root / checkpoint_name(step)
    staging = root / f".tmp-{checkpoint_name(step)}"
    if distributed.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # the remains of a save that died
    distributed.barrier()
    model_state, optim_state = get_state_dict(model, optimizer, options=FLAT)
    # RNG states differ per rank in general, so each is its own entry (a shared key would be deduplicated).
    rng = {f"rank{distributed.rank}": _rng_state()}
    with _quiet():
        dcp.save({"model": model_state, "optim": optim_state, "rng": rng}, checkpoint_id=staging)
    faults.inject(faults.CRASH_DURING_CHECKPOINT, step, distributed.rank)
    _fsync_tree(staging)
    distributed.barrier()  # every rank's shards are on disk: only now may the checkpoint become complete
    if distributed.is_main:
        (staging / STATE_NAME).write_text(json.dumps(trainer_state, indent=2, sort_keys=True))
        _fsync_tree(staging)
        (staging / COMPLETE_NAME).write_text("")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
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


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    distributed: Distributed | None = None,
) -> dict[str, Any]:
    """Restore model, optimizer and RNG from checkpoint `path` into this layout (a collective under
    torchrun); return the trainer's JSON state."""
    distributed = distributed or Distributed.single()
    trainer_state = read_trainer_state(path)
    keys = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    # Checkpoints from before the flat format keep their param groups as a list (optim.param_groups.0.lr).
    options = StateDictOptions() if "optim.param_groups.0.lr" in keys else FLAT
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    rng_key = _rng_key(keys, distributed.rank)
    state = {"model": model_state, "optim": optim_state, "rng": {rng_key: _rng_state()}}
    with _quiet():
        dcp.load(state, checkpoint_id=Path(path))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options
    )
    rng = state["rng"][rng_key]
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return trainer_state


def _rng_key(keys, rank: int) -> str:
    """This rank's saved RNG entry, or rank 0's when the checkpoint came from fewer ranks."""
    return f"rank{rank}" if f"rng.rank{rank}.torch" in keys else "rank0"


def load_model_weights(path: str | Path, model: nn.Module) -> dict[str, Any]:
    """Only the model's weights (any saved layout) into an unsharded `model`; returns the JSON state.
    Reads in this process alone, even inside a torchrun job (no collective)."""
    trainer_state = read_trainer_state(path)
    state = {"model": model.state_dict()}
    with _quiet():
        dcp.load(state, checkpoint_id=Path(path), no_dist=True)
    model.load_state_dict(state["model"])
    return trainer_state
