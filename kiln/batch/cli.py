"""`kiln batch submit|run|status|export`: batch jobs over records, results in SQLite or PostgreSQL."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from kiln.engine.options import (
    DEFAULT,
    Device,
    Dtype,
    KVCacheMemory,
    MaxModelLen,
    MaxNumBatchedTokens,
    MaxNumSeqs,
    Threads,
    engine_config_from_flags,
)
from kiln.errors import KilnError

batch_app = typer.Typer(
    help="Batch jobs: tag or complete many records, results in SQLite (default) or PostgreSQL.",
    no_args_is_help=True,
)
console = Console()
err_console = Console(stderr=True)

Db = Annotated[
    str,
    typer.Option(
        envvar="KILN_BATCH_DB",
        help="Job store: a SQLite file (one worker) or postgresql://user@host/db (any number of workers).",
    ),
]
DEFAULT_DB = "kiln-batch.db"
JobId = Annotated[str, typer.Argument(help="The job's id (printed by `kiln batch submit`).")]


@contextlib.contextmanager
def open_store(db: str) -> Iterator:
    from kiln.batch.store import JobStore

    store = JobStore(db)
    try:
        yield store
    finally:
        store.close()


@batch_app.command("submit")
def submit_command(
    input: Annotated[
        Path | None, typer.Argument(help="OpenAI batch JSONL, or a table: .jsonl, .csv, .parquet.")
    ] = None,
    db: Db = DEFAULT_DB,
    query: Annotated[
        str | None,
        typer.Option(
            help="Instead of INPUT: a table job over the rows of this SQL query (needs --template)."
        ),
    ] = None,
    source_db: Annotated[
        str | None, typer.Option(help="The database --query reads (default: the job store's, --db).")
    ] = None,
    template: Annotated[
        str | None,
        typer.Option(help="A table job's prompt: jinja2 over the record's columns, e.g. 'Text: {{ text }}'."),
    ] = None,
    template_file: Annotated[Path | None, typer.Option(help="Read --template from this file.")] = None,
    id_column: Annotated[str | None, typer.Option(help="A table's id column (default: row number).")] = None,
    labels: Annotated[
        str | None, typer.Option(help="Tag each record with one of these comma-separated labels.")
    ] = None,
    label_prefix: Annotated[str, typer.Option(help="Text between the prompt and each label.")] = " ",
    max_tokens: Annotated[
        int, typer.Option(help="Tokens to generate per record (table jobs, no labels).")
    ] = 16,
    results_table: Annotated[str, typer.Option(help="Table the results go to.")] = "kiln_batch_results",
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Model `run` loads by default.")] = None,
    job_id: Annotated[str | None, typer.Option(help="The job's id (default: a new batch_... id).")] = None,
) -> None:
    """Store a job: the whole input is checked first, then written in one transaction. Without --template
    the input is an OpenAI batch file ({custom_id, method, url, body} per line)."""
    from kiln.batch.jobs import submit, submit_query
    from kiln.batch.spec import JobSpec

    if (input is None) == (query is None):
        raise KilnError("give either an INPUT file or --query SQL (a table job over the query's rows)")
    if template_file is not None:
        if not template_file.is_file():
            raise KilnError(f"{template_file}: no such template file")
        template = template_file.read_text()
    spec = JobSpec(
        kind="table" if template else "openai",
        model=str(model.resolve()) if model else None,
        template=template,
        id_column=id_column,
        labels=tuple(label.strip() for label in labels.split(",")) if labels else (),
        label_prefix=label_prefix,
        max_tokens=max_tokens,
        results_table=results_table,
    )
    with open_store(db) as store:
        if query is not None:
            new_id = submit_query(store, query, spec, job_id, source_db)
        else:
            new_id = submit(store, input, spec, job_id)
        console.print(new_id, highlight=False)
        err_console.print(f"submitted {store.job(new_id).num_records} records as {new_id}", highlight=False)


@batch_app.command("run")
def run_command(
    job_id: JobId,
    db: Db = DEFAULT_DB,
    model: Annotated[
        Path | None, typer.Option("--model", "-m", help="Model directory (default: the job's).")
    ] = None,
    chunk_size: Annotated[int, typer.Option(help="Records claimed (and run as one batch) at a time.")] = 256,
    lease: Annotated[
        float, typer.Option(help="Seconds a claim holds; a dead worker's chunk returns after this.")
    ] = 600.0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    dtype: Dtype = DEFAULT.dtype,
    device: Device = DEFAULT.device,
    max_model_len: MaxModelLen = DEFAULT.max_model_len,
    kv_cache_memory: KVCacheMemory = DEFAULT.kv_cache_memory,
    max_num_seqs: MaxNumSeqs = DEFAULT.max_num_seqs,
    max_num_batched_tokens: MaxNumBatchedTokens = DEFAULT.max_num_batched_tokens,
    threads: Threads = DEFAULT.num_threads,
) -> None:
    """Work on a job until no record is left. Rerun the same command after a crash: finished records stay
    written, unfinished ones are run again. Start more workers (PostgreSQL) to go faster: on other machines,
    or on one machine with --threads splitting its cores between them (each worker's default is all of
    them, and workers that together run more threads than cores slow each other down several-fold)."""
    flags = dict(locals())
    from kiln.batch.jobs import describe, run_job

    with open_store(db) as store:
        if not store.db.supports_many_workers:
            err_console.print("[dim]SQLite job store: one worker at a time (use PostgreSQL for several)[/]")
        stats = run_job(
            store,
            job_id,
            model=model,
            engine_config=engine_config_from_flags(flags),
            chunk_size=chunk_size,
            lease_s=lease,
            show_progress=progress,
        )
        err_console.print(
            f"this worker: {stats.num_done} done, {stats.num_failed} failed in {stats.seconds:.1f}s",
            highlight=False,
        )
        console.print(describe(store.job(job_id)), highlight=False, soft_wrap=True)


@batch_app.command("status")
def status_command(
    job_id: Annotated[str | None, typer.Argument(help="A job's id (default: every job).")] = None,
    db: Db = DEFAULT_DB,
) -> None:
    """Print done / failed / pending counts of a job, or of every job in the store."""
    from kiln.batch.jobs import describe

    with open_store(db) as store:
        jobs = [store.job(job_id)] if job_id else store.jobs()
        if not jobs:
            console.print("no jobs in this job store")
        for job in jobs:
            console.print(describe(job), highlight=False, soft_wrap=True)


@batch_app.command("export")
def export_command(
    job_id: JobId,
    output: Annotated[Path, typer.Option("--output", "-o", help="JSONL file to write.")],
    db: Db = DEFAULT_DB,
    errors: Annotated[
        Path | None, typer.Option(help="Write failed records here (default: with the rest in --output).")
    ] = None,
) -> None:
    """Write a job's results as JSONL (OpenAI batch output lines for OpenAI jobs)."""
    from kiln.batch.export import export_job

    with open_store(db) as store:
        written, failed = export_job(store, job_id, output, errors)
    err_console.print(f"wrote {written} lines to {output}" + (f", {failed} to {errors}" if errors else ""))
