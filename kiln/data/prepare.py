"""`kiln data prepare`: read documents, filter, dedup, tokenize, and write token shards plus a manifest.

The run has three stages, each committed to the output folder before the next starts, so a killed run
restarted with the same arguments redoes at most the stage (or the shard) it was in:
1. select: stream every document through the filters, exact dedup and near dedup (in that order, keeping
   first occurrences) and assign kept documents to train/val by content hash. Commits `kept.npy`
   ((num_kept, 3) int64 rows of source index, record index, split index) and the counts in `progress.json`.
   An interrupted selection restarts from the first document: it is deterministic and cheap next to
   tokenizing.
2. tokenizer: copy the given tokenizer, or train a byte-level BPE on kept train documents, into `tokenizer/`
   (written under a temporary name, then renamed).
3. shards: tokenize kept documents in batches (HF `encode_batch`, multi-threaded in Rust) and write each
   split's shards. After every committed shard `progress.json` records, per split, the shards so far and
   a cursor: every document of that split before the cursor (in kept order) is in a committed shard.
   A restart skips those documents and rebuilds the rest identically, so nothing is lost or duplicated.
Finally `manifest.json` is written; a rerun of a finished folder returns it without doing any work.

Manifest fields: format_version, tokenizer (folder relative to the manifest), vocab_size, eos_token_id,
dtype ("uint16" | "uint32"), splits.{train,val}.{num_documents, num_tokens, shards[{path, num_tokens,
num_documents}]}, documents.{read, kept, dropped{reason: count}}, val_fraction, text_field, sources,
filters, dedup (config plus the LSH bands and rows), fingerprint (hash of the arguments and input files).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from array import array
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from kiln.data.dedup import (
    DEDUP_REASONS,
    EXACT_DUPLICATE,
    NEAR_DUPLICATE,
    DedupConfig,
    ExactDeduplicator,
    NearDeduplicator,
    content_hash,
    lsh_bands,
)
from kiln.data.filters import FILTER_REASONS, FilterConfig, filter_reason
from kiln.data.report import progress_bar
from kiln.data.shards import (
    MANIFEST_NAME,
    SPLITS,
    ShardWriter,
    save_array_atomic,
    token_dtype,
    write_json_atomic,
)
from kiln.data.sources import Document, iter_source, resolve_sources
from kiln.errors import KilnError
from kiln.tokenizer import Tokenizer
from kiln.tokenizer_training import train_bpe_from_iterator

FORMAT_VERSION = 1
PROGRESS_NAME = "progress.json"
KEPT_NAME = "kept.npy"
TOKENIZER_DIR = "tokenizer"
_RUNTIME_ONLY_FIELDS = ("inputs", "output_dir", "batch_documents", "overwrite", "show_progress")


@dataclass(kw_only=True, slots=True)
class PrepareConfig:
    """Arguments of `kiln data prepare`. Everything except the runtime-only fields (batch_documents,
    overwrite, show_progress) is part of the run's fingerprint: a restart must repeat it exactly."""

    inputs: list[str]
    """Text files (one document each), folders (searched recursively), globs, JSONL or Parquet files."""
    output_dir: str
    """Folder for shards, tokenizer/, manifest.json and the progress record; rerun it to resume."""
    text_field: str = "text"
    """JSONL field / Parquet column holding the document text."""
    tokenizer: str | None = None
    """Folder with a tokenizer.json to use; None trains a byte-level BPE on the kept train documents."""
    vocab_size: int = 32768
    """Vocabulary size of the BPE trained when no tokenizer is given (<= 65536 gives uint16 shards)."""
    tokenizer_training_documents: int = 100_000
    """Train the BPE on at most this many kept train documents (the first ones, in input order)."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    """Quality-filter thresholds (minimum words, line length, symbol ratio, repeated lines)."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    """Exact and near (MinHash-LSH, Jaccard >= 0.8 on 5-word shingles) deduplication settings."""
    val_fraction: float = 0.01
    """Fraction of kept documents held out for validation, chosen by content hash (stable across runs)."""
    shard_size_tokens: int = 50_000_000
    """A shard is committed once it holds at least this many tokens (whole documents only)."""
    batch_documents: int = 1000
    """Documents per `encode_batch` call; the encoder parallelises within a batch."""
    overwrite: bool = False
    """Replace the outputs of a different earlier run in output_dir instead of refusing."""
    show_progress: bool = True
    """Show a progress bar with documents/s and tokens/s."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise KilnError(f"val_fraction must be in [0, 1), got {self.val_fraction}.")
        if self.shard_size_tokens < 1 or self.batch_documents < 1 or self.tokenizer_training_documents < 1:
            raise KilnError(
                "shard_size_tokens, batch_documents and tokenizer_training_documents must be >= 1."
            )
        if self.tokenizer is None and self.vocab_size < 256 + 3:
            raise KilnError(f"vocab_size must be >= 259 for a byte-level BPE, got {self.vocab_size}.")


def split_index(digest: bytes, val_fraction: float) -> int:
    """0 (train) or 1 (val): the first 8 digest bytes as a uniform number in [0, 1) against val_fraction."""
    return int(int.from_bytes(digest[:8], "little") / 2.0**64 < val_fraction)


def _fingerprint(config: PrepareConfig, sources: list[Path]) -> str:
    settings = {k: v for k, v in asdict(config).items() if k not in _RUNTIME_ONLY_FIELDS}
    settings["sources"] = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sources]
    if config.tokenizer is not None:
        tokenizer_file = Path(config.tokenizer) / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise KilnError(
                f"{config.tokenizer} has no tokenizer.json: pass a Hugging Face tokenizer folder."
            )
        settings["tokenizer"] = hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _clear_outputs(out: Path) -> None:
    """Remove what prepare writes (and nothing else a user may keep in the folder)."""
    for pattern in (
        PROGRESS_NAME,
        MANIFEST_NAME,
        KEPT_NAME,
        ".*.tmp",
        *(f"{split}_*.npy" for split in SPLITS),
    ):
        for path in out.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(out / TOKENIZER_DIR, ignore_errors=True)


def _start_or_resume(out: Path, fingerprint: str, overwrite: bool) -> dict[str, Any]:
    """The progress record of this run: resumed when output_dir holds the same run, else started fresh."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / PROGRESS_NAME
    if path.is_file():
        state = json.loads(path.read_text(encoding="utf-8"))
        if state["fingerprint"] == fingerprint:
            for stale in out.glob(".*.tmp"):  # left by a kill mid-write; never part of a commit
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
            return state
        if not overwrite:
            raise KilnError(
                f"{out} holds a prepare run with other arguments or changed inputs: choose another output "
                "folder, or pass --overwrite to replace it."
            )
    elif any(out.iterdir()) and not overwrite:
        raise KilnError(f"{out} is not empty: choose an empty output folder, or pass --overwrite.")
    _clear_outputs(out)
    state = {"fingerprint": fingerprint, "splits": {split: {"cursor": 0, "shards": []} for split in SPLITS}}
    write_json_atomic(path, state)
    return state


def _drop_reason(
    text: str, digest: bytes, config: PrepareConfig, exact: ExactDeduplicator, near: NearDeduplicator
) -> str | None:
    reason = filter_reason(text, config.filters)
    if reason is None and config.dedup.exact and exact.is_duplicate(digest):
        reason = EXACT_DUPLICATE
    if reason is None and config.dedup.near and near.is_duplicate(text):
        reason = NEAR_DUPLICATE
    return reason


def _select(config: PrepareConfig, sources: list[Path], bar: Progress) -> tuple[np.ndarray, dict[str, Any]]:
    """Stage 1: kept rows (num_kept, 3) of (source index, record index, split index) and the counts."""
    exact, near = ExactDeduplicator(), NearDeduplicator(config.dedup)
    dropped = dict.fromkeys(FILTER_REASONS + DEDUP_REASONS, 0)
    kept = array("q")
    num_read = 0
    task = bar.add_task("filter/dedup", total=None)
    for source_index, path in enumerate(sources):
        for index, text in enumerate(iter_source(path, config.text_field)):
            num_read += 1
            digest = content_hash(text)
            reason = _drop_reason(text, digest, config, exact, near)
            if reason is None:
                kept.extend((source_index, index, split_index(digest, config.val_fraction)))
            else:
                dropped[reason] += 1
            bar.update(task, advance=1)
    bar.stop_task(task)
    rows = np.frombuffer(kept, dtype=np.int64).reshape(-1, 3).copy()
    return rows, {"read": num_read, "kept": len(rows), "dropped": dropped}


def _iter_kept(sources: list[Path], rows: np.ndarray, text_field: str, offset: int = 0) -> Iterator[Document]:
    """Documents named by `rows` (sorted by source, then record), yielded with `index` = offset + row number.
    Sources without a wanted row are not opened."""
    position = 0
    while position < len(rows):
        source_index = int(rows[position, 0])
        end = int(np.searchsorted(rows[:, 0], source_index, side="right"))
        wanted = rows[position:end, 1]
        found = 0
        for index, text in enumerate(iter_source(sources[source_index], text_field)):
            if index == wanted[found]:
                yield Document(source_index, offset + position + found, str(sources[source_index]), text)
                found += 1
                if found == len(wanted):
                    break
        if found != len(wanted):
            raise KilnError(f"{sources[source_index]} changed during the run: rerun with --overwrite.")
        position = end


def _ensure_tokenizer(config: PrepareConfig, sources: list[Path], rows: np.ndarray, out: Path) -> Tokenizer:
    """Stage 2: the run's tokenizer, saved in out/tokenizer (renamed into place once complete)."""
    directory = out / TOKENIZER_DIR
    if (directory / "tokenizer.json").is_file():
        return Tokenizer.from_dir(directory)
    temporary = out / f".{TOKENIZER_DIR}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    if config.tokenizer is not None:
        tokenizer = Tokenizer.from_dir(config.tokenizer)
        if tokenizer.eos_token_id is None:
            raise KilnError(
                f"The tokenizer in {config.tokenizer} has no eos_token, which separates documents in shards: "
                "set eos_token in its tokenizer_config.json."
            )
    else:
        train_rows = rows[rows[:, 2] == 0][: config.tokenizer_training_documents]
        if len(train_rows) == 0:
            raise KilnError(
                "No kept train documents to train a tokenizer on: relax the filters or pass --tokenizer."
            )
        texts = (document.text for document in _iter_kept(sources, train_rows, config.text_field))
        tokenizer = train_bpe_from_iterator(
            texts, config.vocab_size, show_progress=config.show_progress, length=len(train_rows)
        )
    tokenizer.save(temporary)
    temporary.rename(directory)
    return Tokenizer.from_dir(directory)


class _ShardStage:
    """Stage 3 state: one ShardWriter per split and the progress record they keep current."""

    def __init__(self, out: Path, state: dict[str, Any], tokenizer: Tokenizer, config: PrepareConfig) -> None:
        self.out, self.state, self.tokenizer = out, state, tokenizer
        # Raw text spelling "<|endoftext|>" must stay text: an EOS from the data would forge a document
        # boundary (and chat tokens would forge turns). Affects this in-memory copy only, not the saved file.
        tokenizer.backend.encode_special_tokens = True
        self.writers = {
            split: ShardWriter(
                out,
                split,
                dtype=token_dtype(tokenizer.vocab_size),
                eos_token_id=tokenizer.eos_token_id,
                shard_size_tokens=config.shard_size_tokens,
                shards=state["splits"][split]["shards"],
            )
            for split in SPLITS
        }

    def cursor(self, split: str) -> int:
        return self.state["splits"][split]["cursor"]

    def _record(self, split: str, cursor: int) -> None:
        self.state["splits"][split] = {"cursor": cursor, "shards": self.writers[split].shards}
        write_json_atomic(self.out / PROGRESS_NAME, self.state)

    def write_batch(self, batch: list[tuple[int, str, str]]) -> int:
        """Tokenize (kept position, split, text) triples and add them; returns the tokens written."""
        encoded = self.tokenizer.encode_batch([text for _, _, text in batch], add_special_tokens=False)
        num_tokens = 0
        for (position, split, _), token_ids in zip(batch, encoded, strict=True):
            num_tokens += len(token_ids) + 1
            if self.writers[split].add(token_ids):
                self._record(split, position + 1)
        return num_tokens

    def finish(self, num_kept: int) -> None:
        for split, writer in self.writers.items():
            writer.finish()
            self._record(split, num_kept)


def _write_shards(
    config: PrepareConfig, sources: list[Path], rows: np.ndarray, stage: _ShardStage, bar: Progress
) -> None:
    """Stage 3: tokenize every kept document not yet in a committed shard, in batches."""
    start = min(stage.cursor(split) for split in SPLITS)
    task = bar.add_task("tokenize", total=len(rows), completed=start, tokens=0)
    batch: list[tuple[int, str, str]] = []
    num_tokens = 0
    for document in _iter_kept(sources, rows[start:], config.text_field, offset=start):
        split = SPLITS[rows[document.index, 2]]
        if document.index >= stage.cursor(split):
            batch.append((document.index, split, document.text))
        if len(batch) == config.batch_documents:
            num_tokens += stage.write_batch(batch)
            bar.update(task, completed=document.index + 1, tokens=num_tokens)
            batch = []
    if batch:
        num_tokens += stage.write_batch(batch)
    stage.finish(len(rows))
    bar.update(task, completed=len(rows), tokens=num_tokens)
    bar.stop_task(task)


def _manifest(
    config: PrepareConfig, sources: list[Path], state: dict[str, Any], tokenizer: Tokenizer
) -> dict[str, Any]:
    splits = {}
    for split in SPLITS:
        shards = state["splits"][split]["shards"]
        splits[split] = {
            "num_documents": sum(shard["num_documents"] for shard in shards),
            "num_tokens": sum(shard["num_tokens"] for shard in shards),
            "shards": shards,
        }
    bands, rows = lsh_bands(config.dedup.num_permutations, config.dedup.jaccard_threshold)
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": TOKENIZER_DIR,
        "vocab_size": tokenizer.vocab_size,
        "eos_token_id": tokenizer.eos_token_id,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "splits": splits,
        "documents": state["selection"],
        "val_fraction": config.val_fraction,
        "text_field": config.text_field,
        "sources": [str(path) for path in sources],
        "filters": asdict(config.filters),
        "dedup": {**asdict(config.dedup), "lsh_bands": bands, "lsh_rows": rows},
        "fingerprint": state["fingerprint"],
    }


def prepare(config: PrepareConfig) -> dict[str, Any]:
    """Run (or resume) the data pipeline into config.output_dir and return the manifest."""
    sources = resolve_sources(config.inputs)
    out = Path(config.output_dir)
    state = _start_or_resume(out, _fingerprint(config, sources), config.overwrite)
    if state.get("done"):
        return json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    with progress_bar(enabled=config.show_progress) as bar:
        if "selection" not in state:
            rows, state["selection"] = _select(config, sources, bar)
            save_array_atomic(out / KEPT_NAME, rows)
            write_json_atomic(out / PROGRESS_NAME, state)
        rows = np.load(out / KEPT_NAME)
        if len(rows) == 0:
            selection = state["selection"]
            raise KilnError(
                f"All {selection['read']} documents were dropped {selection['dropped']}: relax the filters "
                "(e.g. a lower minimum word count) or check --text-field."
            )
        tokenizer = _ensure_tokenizer(config, sources, rows, out)
        _write_shards(config, sources, rows, _ShardStage(out, state, tokenizer, config), bar)
    manifest = _manifest(config, sources, state, tokenizer)
    write_json_atomic(out / MANIFEST_NAME, manifest)
    state["done"] = True
    write_json_atomic(out / PROGRESS_NAME, state)
    return manifest
