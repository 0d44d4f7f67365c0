"""The job operations the CLI, the benchmark and the tests share: submit an input file, run a worker over
a job with kiln.LLM (with a progress bar), and describe a job's state."""

from __future__ import annotations

from pathlib import Path

from kiln.batch.backend import LLMBackend
from kiln.batch.database import Database
from kiln.batch.inputs import read_query_records, read_records
from kiln.batch.progress import JobProgress
from kiln.batch.runner import BatchRunner, RunStats
from kiln.batch.spec import JobSpec
from kiln.batch.store import JobInfo, JobStore
from kiln.engine.config import EngineConfig
from kiln.engine.llm import LLM
from kiln.errors import KilnError


def submit(store: JobStore, path: Path, spec: JobSpec, job_id: str | None = None) -> str:
    """Read and check the whole input, then store the job and its records in one transaction."""
    return store.create_job(spec, read_records(path, spec), job_id)


def submit_query(
    store: JobStore, sql: str, spec: JobSpec, job_id: str | None = None, source: str | None = None
) -> str:
    """A table job over the rows of a SQL query, run against `source` (a database URL or SQLite file;
    default: the job store's own database). The rows are read and checked first, then stored."""
    if source is None:
        return store.create_job(spec, read_query_records(store.db, sql, spec), job_id)
    database = Database(source)
    try:
        records = read_query_records(database, sql, spec)
    finally:
        database.connection.close()
    return store.create_job(spec, records, job_id)


def run_job(
    store: JobStore,
    job_id: str,
    *,
    model: Path | None = None,
    engine_config: EngineConfig | None = None,
    chunk_size: int = 256,
    lease_s: float = 600.0,
    show_progress: bool = True,
    llm: LLM | None = None,
) -> RunStats:
    """Run one worker over `job_id` until no record is left; `model` (else the job's) is loaded with
    `engine_config`, unless an `llm` is given."""
    job = store.job(job_id)
    if job.status != "in_progress":
        return RunStats()
    with store.worker_lock():  # a second SQLite worker is refused before it loads a model
        return _run(store, job, model, engine_config, chunk_size, lease_s, show_progress, llm)


def _run(
    store: JobStore,
    job: JobInfo,
    model: Path | None,
    engine_config: EngineConfig | None,
    chunk_size: int,
    lease_s: float,
    show_progress: bool,
    llm: LLM | None,
) -> RunStats:
    job_id = job.job_id
    if llm is None:
        model_dir = model or (Path(job.spec.model) if job.spec.model else None)
        if model_dir is None:
            raise KilnError(f"job {job_id} names no model; pass --model DIR")
        if not (model_dir / "config.json").is_file():
            raise KilnError(f"{model_dir} is not a model directory (no config.json); pass --model DIR")
        llm = LLM(model_dir, engine_config, verbose=show_progress)
        model_name = model_dir.name
    else:
        model_name = "kiln"
    backend = LLMBackend(llm, model_name)
    with JobProgress(job, enabled=show_progress) as progress:

        def on_chunk(stats: RunStats) -> None:
            if show_progress:
                counts = store.counts(job_id)
                progress.update(counts["done"] + counts["failed"] + counts["cancelled"], stats)

        runner = BatchRunner(
            store, job_id, backend, chunk_size=chunk_size, lease_s=lease_s, on_chunk=on_chunk
        )
        return runner.run()


def describe(job: JobInfo) -> str:
    counts = job.counts
    return (
        f"{job.job_id}: {job.status}, {job.num_records} records: {counts['done']} done, "
        f"{counts['failed']} failed, {counts['pending']} pending, {counts['claimed']} claimed"
        + (f", {counts['cancelled']} cancelled" if counts["cancelled"] else "")
    )
