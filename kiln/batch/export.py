"""Exporting a job's results as JSONL: OpenAI batch output lines for OpenAI jobs (failures to a separate
error file when one is given, as OpenAI does), or {custom_id, output, response, error} for table jobs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from kiln.batch.openai_format import output_line
from kiln.batch.store import JobStore


def result_lines(store: JobStore, job_id: str, status: str | None = None) -> Iterator[dict[str, Any]]:
    """The job's result lines in record order; `status` "done" or "failed" keeps only those."""
    is_openai = store.job(job_id).spec.kind == "openai"
    for row in store.results(job_id):
        if status is not None and row["status"] != status:
            continue
        response = None if row["response"] is None else json.loads(row["response"])
        if is_openai:
            yield output_line(row, response)
        else:
            yield {
                "custom_id": row["custom_id"],
                "output": row["output"],
                "response": response,
                "error": row["error"],
            }


def write_lines(lines: Iterator[dict[str, Any]], file: IO[str]) -> int:
    count = 0
    for line in lines:
        file.write(json.dumps(line) + "\n")
        count += 1
    return count


def export_job(store: JobStore, job_id: str, output: Path, errors: Path | None = None) -> tuple[int, int]:
    """Write the results to `output` (and failures to `errors` when given, else also to `output`); returns
    (lines in output, lines in errors). Written to a temporary file first, so a failed export leaves no
    half file."""
    counts = []
    for path, status in ((output, "done" if errors else None), (errors, "failed")):
        if path is None:
            counts.append(0)
            continue
        partial = path.with_name(path.name + ".partial")
        with partial.open("w") as file:
            counts.append(write_lines(result_lines(store, job_id, status), file))
        partial.replace(path)
    return counts[0], counts[1]
