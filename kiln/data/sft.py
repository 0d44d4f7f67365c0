"""Supervised finetuning data: chat or prompt/completion examples as token shards with a loss mask.

`prepare_sft` reads JSONL records, either `{"messages": [{"role", "content"}, ...]}` (rendered with the
tokenizer's chat template) or `{"prompt": ..., "completion": ...}`, and writes each split as token shards
(`train_00000.npy`, every example followed by EOS) with a same-length `train_00000.mask.npy` beside them:
1 where the token is one the model must learn to produce (assistant turns, completions), 0 elsewhere.
Each assistant turn is tokenized on its own after the rendered conversation before it, so its tokens are
exactly what generation produces after that prompt.

`SFTLoader` draws whole examples (seeded by (seed, step), like TokenLoader: resumable and
reshardable) and right-pads each to seq_len (longer ones are cut; `longest` tells a caller the seq_len
that cuts none); padding and masked tokens get the ignore index, so the loss covers completion tokens only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.data.shards import MANIFEST_NAME, read_manifest, save_array_atomic, token_dtype, write_json_atomic
from kiln.errors import KilnError
from kiln.tokenizer import Tokenizer

IGNORE_INDEX = -100  # torch's cross-entropy default, and kiln.train.losses.IGNORE_INDEX
_STREAM_TAG = 0x73667420  # "sft ": keeps these draws apart from TokenLoader's


def encode_example(record: dict[str, Any], tokenizer: Tokenizer, where: str) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of one JSONL record; the EOS separator is added by the caller."""
    if "messages" in record:
        return _encode_chat(record["messages"], tokenizer, where)
    if "prompt" in record and "completion" in record:
        prompt = tokenizer.encode(str(record["prompt"]))
        completion = tokenizer.encode(str(record["completion"]), add_special_tokens=False)
        return prompt + completion, [0] * len(prompt) + [1] * len(completion)
    raise KilnError(f"{where}: a record needs 'messages' or 'prompt' and 'completion'")


def _encode_chat(
    messages: list[dict[str, Any]], tokenizer: Tokenizer, where: str
) -> tuple[list[int], list[int]]:
    if not messages or not any(m.get("role") == "assistant" for m in messages):
        raise KilnError(f"{where}: the conversation has no assistant message to learn")
    ids: list[int] = []
    mask: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message.get("role") == "assistant":
            prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
            _append(ids, mask, tokenizer, prompt[len(rendered) :] if prompt.startswith(rendered) else None, 0)
            rendered = prompt
        full = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not full.startswith(rendered):
            raise KilnError(f"{where}: the chat template does not render this conversation incrementally")
        _append(ids, mask, tokenizer, full[len(rendered) :], int(message.get("role") == "assistant"))
        rendered = full
    return ids, mask


def _append(ids: list[int], mask: list[int], tokenizer: Tokenizer, text: str | None, value: int) -> None:
    if text is None:
        raise KilnError(
            "the chat template does not render conversations incrementally; use prompt/completion"
        )
    new = tokenizer.encode(text, add_special_tokens=False) if text else []
    ids.extend(new)
    mask.extend([value] * len(new))


def prepare_sft(
    inputs: list[str | Path], output_dir: str | Path, tokenizer_dir: str | Path, val_fraction: float = 0.05
) -> dict[str, Any]:
    """Tokenize JSONL examples into train/val shards with loss masks; returns the manifest."""
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise KilnError(f"{tokenizer_dir}: the tokenizer has no EOS token to separate examples")
    splits: dict[str, tuple[list[int], list[int], int]] = {"train": ([], [], 0), "val": ([], [], 0)}
    for path in map(Path, inputs):
        if not path.is_file():
            raise KilnError(f"{path}: no such JSONL file")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise KilnError(f"{where}: not valid JSON ({error.msg})") from None
            ids, mask = encode_example(record, tokenizer, where)
            split = "val" if _in_val(line, val_fraction) else "train"
            tokens, masks, count = splits[split]
            tokens.extend([*ids, eos])
            masks.extend([*mask, 1 if "completion" in record else 0])  # a completion learns to stop
            splits[split] = (tokens, masks, count + 1)
    return _write(Path(output_dir), splits, tokenizer, tokenizer_dir, val_fraction)


def _in_val(line: str, fraction: float) -> bool:
    digest = int.from_bytes(hashlib.sha256(line.encode()).digest()[:8], "little")
    return digest / 2**64 < fraction


def _write(
    directory: Path, splits, tokenizer: Tokenizer, tokenizer_dir, val_fraction: float
) -> dict[str, Any]:
    if splits["train"][2] == 0:
        raise KilnError("no training examples were read; check the JSONL files")
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(directory / "tokenizer")
    dtype = token_dtype(tokenizer.vocab_size)
    manifest: dict[str, Any] = {
        "format": "sft",
        "format_version": 1,
        "tokenizer": "tokenizer",
        "vocab_size": tokenizer.vocab_size,
        "eos_token_id": tokenizer.eos_token_id,
        "dtype": dtype.name,
        "val_fraction": val_fraction,
        "splits": {},
    }
    for split, (tokens, masks, count) in splits.items():
        if count == 0:
            continue
        name = f"{split}_00000.npy"
        save_array_atomic(directory / name, np.asarray(tokens, dtype=dtype))
        save_array_atomic(directory / name.replace(".npy", ".mask.npy"), np.asarray(masks, dtype=np.uint8))
        shard = {"path": name, "mask": name.replace(".npy", ".mask.npy"), "num_tokens": len(tokens)}
        manifest["splits"][split] = {
            "num_documents": count,
            "num_tokens": len(tokens),
            "num_target_tokens": int(sum(masks)),
            "shards": [{**shard, "num_documents": count}],
        }
    write_json_atomic(directory / MANIFEST_NAME, manifest)
    return manifest


class SFTLoader:
    """Batches (inputs, targets) of whole examples, right-padded to the batch's longest (<= seq_len);
    targets are the next tokens where the mask marks them, IGNORE_INDEX elsewhere."""

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
        self.manifest = read_manifest(manifest_dir)
        if self.manifest.get("format") != "sft":
            raise KilnError(f"{manifest_dir} holds pretraining shards; prepare SFT data with --format chat")
        if split not in self.manifest["splits"]:
            raise KilnError(f"{manifest_dir} has no {split!r} examples")
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.step = 0
        self.pad_token_id = int(self.manifest["eos_token_id"])
        self.examples: list[tuple[np.ndarray, np.ndarray]] = []
        for shard in self.manifest["splits"][split]["shards"]:
            tokens = np.load(Path(manifest_dir) / shard["path"])
            masks = np.load(Path(manifest_dir) / shard["mask"])
            ends = np.flatnonzero(tokens == self.pad_token_id) + 1
            for start, end in zip(np.concatenate([[0], ends[:-1]]), ends, strict=True):
                self.examples.append((tokens[start:end].astype(np.int64), masks[start:end]))

    @property
    def longest(self) -> int:
        """The longest example's input length (its tokens but the last)."""
        return max(len(tokens) - 1 for tokens, _ in self.examples)

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, _STREAM_TAG])
        draws = rng.integers(0, len(self.examples), size=self.batch_size * self.world_size)
        rows = draws[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return self.collate([self.examples[i] for i in rows])

    def collate(self, examples: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
        length = self.seq_len
        inputs = torch.full((len(examples), length), self.pad_token_id, dtype=torch.int64)
        targets = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.int64)
        for row, (tokens, mask) in enumerate(examples):
            n = min(length, len(tokens) - 1)
            inputs[row, :n] = torch.from_numpy(tokens[:n])
            next_tokens = torch.from_numpy(tokens[1 : n + 1])
            targets[row, :n] = next_tokens.masked_fill(torch.from_numpy(mask[1 : n + 1] == 0), IGNORE_INDEX)
        return inputs, targets

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed, "split": self.split, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "split", "seq_len"):
            if state[key] != getattr(self, key):
                raise KilnError(
                    f"the checkpoint's loader has {key}={state[key]!r}, this one {getattr(self, key)!r}"
                )
        self.step = int(state["step"])
