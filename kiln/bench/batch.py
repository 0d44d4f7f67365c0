"""`kiln bench batch`: records/s of a tagging job (short prompts, five labels) through kiln's batch workers,
SQLite vs PostgreSQL and one worker vs two (PostgreSQL), with the records/day each rate implies.

Each configuration gets a fresh job of the same records. Workers are processes that load the model, wait
on a barrier, then run; the clock runs from the barrier to the last worker's exit, so model loading is not
counted and the database's claims and commits are.
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

LABELS = ("bug", "feature", "docs", "test", "style")
TEMPLATE = "# change: {{ text }}\n# kind:"
_SUBJECTS = ["parser", "cache", "tokenizer", "server", "docs page", "unit test", "CLI flag", "scheduler"]
_VERBS = ["fix crash in", "add option to", "document", "test", "reformat", "speed up", "rename", "remove"]


@dataclass(kw_only=True, slots=True)
class BatchRun:
    store: str  # sqlite | postgresql
    num_workers: int
    threads_per_worker: int
    num_records: int
    seconds: float  # the median of the repeats
    all_seconds: list[float]
    records_per_second: float
    records_per_day: float
    label_counts: dict[str, int]


@dataclass(kw_only=True, slots=True)
class BatchBenchResult:
    model: str
    num_records: int
    labels: tuple[str, ...]
    template: str
    chunk_size: int
    threads: int
    repeats: int
    runs: list[BatchRun] = field(default_factory=list)


def write_records(path: Path, count: int) -> Path:
    """`count` short change descriptions {id, text}, varied and deterministic."""
    lines = []
    for i in range(count):
        verb, subject = _VERBS[i % len(_VERBS)], _SUBJECTS[(i * 3 + i // 8) % len(_SUBJECTS)]
        lines.append(json.dumps({"id": f"c{i}", "text": f"{verb} the {subject} ({i})"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _worker(db: str, job_id: str, model: str, threads: int, chunk_size: int, barrier) -> None:
    import torch

    from kiln.batch.backend import LLMBackend
    from kiln.batch.runner import BatchRunner
    from kiln.batch.store import JobStore
    from kiln.engine.llm import LLM

    # num_threads, not torch.set_num_threads: the engine sets the physical cores otherwise, and two
    # workers of two threads each on two cores ran 3x slower than one worker (measured, BENCHMARKS.md).
    llm = LLM(model, verbose=False, num_threads=threads)
    assert torch.get_num_threads() == threads
    llm.generate("warm up")
    store = JobStore(db)
    runner = BatchRunner(store, job_id, LLMBackend(llm, Path(model).name), chunk_size=chunk_size, poll_s=0.05)
    barrier.wait()
    runner.run()


def time_job(db: str, records: Path, model: Path, num_workers: int, threads: int, chunk_size: int):
    """Seconds for `num_workers` fresh worker processes to finish a fresh job of `records` (every record
    done, checked), and its label counts."""
    from kiln.batch.jobs import submit
    from kiln.batch.spec import JobSpec
    from kiln.batch.store import JobStore

    store = JobStore(db)
    spec = JobSpec(kind="table", template=TEMPLATE, id_column="id", labels=LABELS)
    job_id = submit(store, records, spec)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(num_workers + 1)
    workers = [
        context.Process(target=_worker, args=(db, job_id, str(model), threads, chunk_size, barrier))
        for _ in range(num_workers)
    ]
    for worker in workers:
        worker.start()
    barrier.wait()
    start = time.perf_counter()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - start
    if any(worker.exitcode != 0 for worker in workers):
        raise RuntimeError(f"a batch worker failed (exit codes {[w.exitcode for w in workers]})")
    job = store.job(job_id)
    assert job.counts["done"] == job.num_records, job.counts
    labels: dict[str, int] = {}
    for row in store.results(job_id):
        labels[row["output"]] = labels.get(row["output"], 0) + 1
    store.close()
    return seconds, labels


def bench_batch(
    model: Path,
    sqlite_path: Path,
    postgres_url: str | None,
    num_records: int,
    threads: int,
    chunk_size: int,
    repeats: int = 3,
) -> BatchBenchResult:
    """SQLite (one worker), then PostgreSQL with one and two workers, on the same records; each
    configuration `repeats` times (round-robin, so drift on a shared machine hits every one), the median
    counts."""
    records = write_records(sqlite_path.with_suffix(".records.jsonl"), num_records)
    result = BatchBenchResult(
        model=str(model),
        num_records=num_records,
        labels=LABELS,
        template=TEMPLATE,
        chunk_size=chunk_size,
        threads=threads,
        repeats=repeats,
    )
    configs = [(str(sqlite_path), 1)]
    if postgres_url:
        configs += [(postgres_url, 1), (postgres_url, 2)]
    runs = [
        BatchRun(
            store="postgresql" if db.startswith("postgres") else "sqlite",
            num_workers=num_workers,
            threads_per_worker=max(1, threads // num_workers),
            num_records=num_records,
            seconds=0.0,
            all_seconds=[],
            records_per_second=0.0,
            records_per_day=0.0,
            label_counts={},
        )
        for db, num_workers in configs
    ]
    for _ in range(repeats):
        for (db, _), run in zip(configs, runs, strict=True):
            seconds, run.label_counts = time_job(
                db, records, model, run.num_workers, run.threads_per_worker, chunk_size
            )
            run.all_seconds.append(seconds)
    for run in runs:
        run.seconds = statistics.median(run.all_seconds)
        run.records_per_second = num_records / run.seconds
        run.records_per_day = run.records_per_second * 86_400
    result.runs = runs
    return result
