"""Deterministic, resumable sampling of fixed-length token windows from prepared shards.

`batch(step)` is a pure function of (seed, step, rank) and the shards: the global batch of
batch_size * world_size window starts is drawn uniformly (with replacement) over every start whose
seq_len + 1 tokens lie inside one shard, by a generator seeded with (seed, step), and each rank takes its
own contiguous rows. No iteration order or worker state exists, so the loader's whole position is
the next step, and resuming a checkpoint reproduces the exact batches an uninterrupted run would have seen.
Windows may span document boundaries (documents are separated by EOS); they never cross a shard's end.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.data.shards import open_shards, read_manifest
from kiln.errors import KilnError

_STREAM_TAG = 0x6B696C6E  # "kiln": keeps these seeds apart from other SeedSequence uses of the same seed


class TokenLoader:
    """Batches of (inputs, targets), int64 tensors of shape (batch_size, seq_len); targets are inputs shifted
    by one token. Ranks draw independent windows, so data parallelism needs no sharding of the files."""

    def __init__(
        self,
        manifest_dir: str | Path,
        split: str = "train",
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if seq_len < 1 or batch_size < 1:
            raise KilnError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}.")
        if not 0 <= rank < world_size:
            raise KilnError(f"rank must be in [0, world_size={world_size}), got {rank}.")
        if seed < 0:
            raise KilnError(f"seed must be >= 0, got {seed}.")
        self.manifest = read_manifest(manifest_dir)
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.step = 0
        self._shards = open_shards(manifest_dir, split)
        if not self._shards:
            raise KilnError(
                f"Split {split!r} in {manifest_dir} has no tokens: prepare with a larger val_fraction "
                "or more data, or load another split."
            )
        window = seq_len + 1
        num_starts = np.array([max(len(shard) - window + 1, 0) for shard in self._shards], dtype=np.int64)
        if num_starts.sum() == 0:
            raise KilnError(
                f"No shard of split {split!r} in {manifest_dir} holds {window} tokens: lower seq_len, "
                "prepare more data, or raise shard_size_tokens."
            )
        self._start_ends = np.cumsum(num_starts)  # (num_shards,) exclusive end of each shard's start range
        self._start_offsets = self._start_ends - num_starts

    def window_starts(self, step: int) -> list[tuple[int, int]]:
        """(shard index, token offset) of each row of batch `step` on this rank."""
        # Draw the whole global batch from (seed, step) and take this rank's rows: the samples of a step
        # depend only on the global batch size, so a run resharded to another world size (same global
        # batch) sees exactly the samples an uninterrupted run would.
        rng = np.random.default_rng([self.seed, step, _STREAM_TAG])
        draws = rng.integers(0, self._start_ends[-1], size=self.batch_size * self.world_size)
        global_starts = draws[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        shard_indices = np.searchsorted(self._start_ends, global_starts, side="right")
        offsets = global_starts - self._start_offsets[shard_indices]
        return list(zip(shard_indices.tolist(), offsets.tolist(), strict=True))

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch for `step` on this rank; does not move the loader's position."""
        if step < 0:
            raise KilnError(f"step must be >= 0, got {step}.")
        window = self.seq_len + 1
        rows = [self._shards[shard][offset : offset + window] for shard, offset in self.window_starts(step)]
        tokens = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T + 1)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at the loader's position, then advance the position by one step."""
        inputs_and_targets = self.batch(self.step)
        self.step += 1
        return inputs_and_targets

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """The loader's position (next step) plus the arguments that must match on resume."""
        return {"step": self.step, "seed": self.seed, "split": self.split, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "split", "seq_len"):
            if state[key] != getattr(self, key):
                raise KilnError(
                    f"Loader checkpoint has {key}={state[key]!r} but this loader has {getattr(self, key)!r}: "
                    "build the loader with the checkpoint's arguments to resume exactly."
                )
        self.step = int(state["step"])
