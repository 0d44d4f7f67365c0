"""Input documents: resolve files, folders and globs, then stream documents from text, JSONL and Parquet.

A document is identified by (source index, record index): its file's position in the sorted source list and
its position inside that file. Both are stable across runs over the same inputs, which is what lets an
interrupted `prepare` skip what it already committed.
"""

from __future__ import annotations

import glob
import gzip
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError

# Source code is text too: one document per file.
CODE_SUFFIXES = (".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java", ".js", ".ts", ".sh")
TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst", *CODE_SUFFIXES)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
_PARQUET_BATCH_ROWS = 4096


@dataclass(frozen=True, slots=True)
class Document:
    """One input document. `source_index` indexes the resolved source list; `index` counts within it."""

    source_index: int
    index: int
    source: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.source}:{self.index}"


def _is_supported(path: Path) -> bool:
    return path.name.lower().endswith(SUPPORTED_SUFFIXES)


def resolve_sources(inputs: Sequence[str]) -> list[Path]:
    """Expand files, folders (recursively, supported suffixes only) and glob patterns into a sorted,
    de-duplicated list of files. The order is part of the document id, so it must not depend on the
    order the file system lists entries in."""
    if not inputs:
        raise KilnError("No inputs given: pass text files, folders, globs, JSONL or Parquet files.")
    found: set[Path] = set()
    for pattern in inputs:
        matches = [Path(m) for m in glob.glob(pattern, recursive=True)] or [Path(pattern)]
        for match in matches:
            if match.is_dir():
                found.update(p for p in match.rglob("*") if p.is_file() and _is_supported(p))
            elif match.is_file():
                if not _is_supported(match):
                    raise KilnError(
                        f"Unsupported input file {match}: use one of {', '.join(SUPPORTED_SUFFIXES)} "
                        "(text files are one document each; JSONL and Parquet one document per record)."
                    )
                found.add(match)
            else:
                raise KilnError(f"Input {pattern!r} matches no file or folder: check the path or glob.")
    if not found:
        raise KilnError(
            f"No supported files under {list(inputs)}: expected {', '.join(SUPPORTED_SUFFIXES)} files."
        )
    return sorted(p.resolve() for p in found)


def _iter_text_file(path: Path) -> Iterator[str]:
    # errors="replace": one stray byte should not abort a multi-hour run; it becomes U+FFFD.
    yield path.read_text(encoding="utf-8", errors="replace")


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise KilnError(
                    f"{path}:{line_number} is not valid JSON ({error}); fix or remove it."
                ) from None
            if not isinstance(record, dict) or text_field not in record:
                raise KilnError(
                    f"{path}:{line_number} has no field {text_field!r}; pass the right --text-field."
                )
            yield str(record[text_field] or "")


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise KilnError("Reading Parquet needs pyarrow: pip install pyarrow") from None
    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        raise KilnError(
            f"{path} has no column {text_field!r} (columns: {parquet.schema_arrow.names}); "
            "pass the right --text-field."
        )
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            yield str(value or "")


def iter_source(path: Path, text_field: str) -> Iterator[str]:
    """Texts of one file, in file order."""
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return _iter_jsonl(path, text_field)
    if name.endswith(PARQUET_SUFFIXES):
        return _iter_parquet(path, text_field)
    return _iter_text_file(path)


def iter_documents(sources: Sequence[Path], text_field: str = "text") -> Iterator[Document]:
    """All documents of all sources, in (source, record) order."""
    for source_index, path in enumerate(sources):
        for index, text in enumerate(iter_source(path, text_field)):
            yield Document(source_index=source_index, index=index, source=str(path), text=text)
