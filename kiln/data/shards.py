"""Token shards: flat `.npy` arrays of token ids, every document followed by the EOS token.

A shard holds whole documents (a document never spans two shards) and is written to a temporary name,
fsynced and renamed, so a shard file either is complete or does not exist. `manifest.json` beside the shards
describes them; see `kiln.data.prepare` for its fields.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import KilnError

MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32: half the disk and page cache."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON to `path` so a reader sees either the old or the new file, never half of one."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def save_array_atomic(path: Path, values: np.ndarray) -> None:
    """np.save to `path` via a temporary file, fsync and rename: the file is complete or absent."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        np.save(handle, values)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.npy"


class ShardWriter:
    """Buffers one split's documents and commits a shard once it holds >= shard_size_tokens tokens.

    `shards` lists the shards committed before (one dict per shard: path, num_tokens, num_documents); a
    resumed run passes what its progress record says and continues numbering after them.
    """

    def __init__(
        self,
        directory: Path,
        split: str,
        *,
        dtype: np.dtype,
        eos_token_id: int,
        shard_size_tokens: int,
        shards: Sequence[dict[str, Any]] = (),
    ) -> None:
        self.directory = Path(directory)
        self.split = split
        self.dtype = np.dtype(dtype)
        self.eos_token_id = eos_token_id
        self.shard_size_tokens = shard_size_tokens
        self.shards: list[dict[str, Any]] = [dict(shard) for shard in shards]
        self._buffer: list[np.ndarray] = []
        self._buffered_tokens = 0

    def add(self, token_ids: Sequence[int]) -> bool:
        """Append one document (its ids, then EOS). True when this committed a shard."""
        document = np.empty(len(token_ids) + 1, dtype=self.dtype)
        document[:-1] = token_ids
        document[-1] = self.eos_token_id
        self._buffer.append(document)
        self._buffered_tokens += document.size
        if self._buffered_tokens >= self.shard_size_tokens:
            self._commit()
            return True
        return False

    def finish(self) -> bool:
        """Commit the partly filled last shard, if any. True when this committed a shard."""
        if not self._buffer:
            return False
        self._commit()
        return True

    def _commit(self) -> None:
        name = shard_name(self.split, len(self.shards))
        tokens = np.concatenate(self._buffer)
        save_array_atomic(self.directory / name, tokens)
        self.shards.append({"path": name, "num_tokens": int(tokens.size), "num_documents": len(self._buffer)})
        self._buffer.clear()
        self._buffered_tokens = 0


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise KilnError(
            f"No {MANIFEST_NAME} in {directory}: run `kiln data prepare` with this output folder."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def open_shards(directory: str | Path, split: str) -> list[np.ndarray]:
    """Memory-mapped token arrays of one split, in shard order (read-only, nothing loaded up front)."""
    manifest = read_manifest(directory)
    if split not in manifest["splits"]:
        raise KilnError(f"Split {split!r} is not in {directory}; choose one of {sorted(manifest['splits'])}.")
    return [
        np.load(Path(directory) / shard["path"], mmap_mode="r")
        for shard in manifest["splits"][split]["shards"]
    ]


def split_documents(tokens: np.ndarray, eos_token_id: int) -> list[np.ndarray]:
    """Cut a shard back into documents (without their EOS); the inverse of ShardWriter.add."""
    ends = np.flatnonzero(tokens == eos_token_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokens[start:end] for start, end in zip(starts, ends, strict=True)]
