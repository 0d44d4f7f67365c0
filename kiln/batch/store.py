"""JobStore: batch jobs, their records and results in one database (SQLite or PostgreSQL).

Each record has a state: pending -> claimed (by a worker, until its lease expires) -> done | failed, or
cancelled. A worker claims a chunk of records at a time (PostgreSQL: `FOR UPDATE SKIP LOCKED`, so any
number of workers on any number of hosts share a job), and writes each result in the same transaction
that marks its record done, and only while it still holds the record's lease: a result is written
exactly once, whoever dies when.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kiln.batch.database import Database, DatabaseError
from kiln.batch.spec import JobSpec
from kiln.errors import KilnError

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS kiln_batch_jobs (
        job_id TEXT PRIMARY KEY, spec TEXT NOT NULL, status TEXT NOT NULL,
        num_records INTEGER NOT NULL, created_at DOUBLE PRECISION NOT NULL,
        finished_at DOUBLE PRECISION)""",
    """CREATE TABLE IF NOT EXISTS kiln_batch_records (
        job_id TEXT NOT NULL, record_index INTEGER NOT NULL, custom_id TEXT NOT NULL,
        payload TEXT NOT NULL, state TEXT NOT NULL, lease_owner TEXT,
        lease_expires DOUBLE PRECISION, attempts INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (job_id, record_index))""",
    "CREATE INDEX IF NOT EXISTS kiln_batch_records_state ON kiln_batch_records (job_id, state, record_index)",
)
# The results table's columns and their type families; an existing table must have at least these.
RESULT_COLUMNS = {
    "job_id": "text",
    "record_index": "integer",
    "custom_id": "text",
    "status": "text",
    "output": "text",
    "response": "text",
    "error": "text",
    "num_prompt_tokens": "integer",
    "num_output_tokens": "integer",
    "worker": "text",
    "finished_at": "real",
}
_SQL_TYPES = {"text": "TEXT", "integer": "INTEGER", "real": "DOUBLE PRECISION"}
_TYPE_FAMILIES = {
    "text": "text",
    "character varying": "text",
    "varchar": "text",
    "integer": "integer",
    "bigint": "integer",
    "int": "integer",
    "double precision": "real",
    "real": "real",
}
STATES = ("pending", "claimed", "done", "failed", "cancelled")


@dataclass(kw_only=True, slots=True)
class Record:
    """One input record: its id and what to run (an OpenAI request, or a table row's columns)."""

    custom_id: str
    payload: dict[str, Any]


@dataclass(kw_only=True, slots=True)
class ClaimedRecord:
    record_index: int
    custom_id: str
    payload: dict[str, Any]


@dataclass(kw_only=True, slots=True)
class RecordResult:
    """What a worker writes for one record: `output` (text or label) and `response` (JSON) when it
    succeeded, else `error`, the reason it failed."""

    record_index: int
    custom_id: str
    output: str | None = None
    response: dict[str, Any] | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0

    @property
    def failed(self) -> bool:
        return self.error is not None


@dataclass(kw_only=True, slots=True)
class JobInfo:
    job_id: str
    spec: JobSpec
    status: str  # in_progress | completed | cancelled
    num_records: int
    created_at: float
    finished_at: float | None
    counts: dict[str, int]  # records per state

    @property
    def num_unfinished(self) -> int:
        return self.counts["pending"] + self.counts["claimed"]


class JobStore:
    """The job store at `url`: a SQLite file path (the default) or postgresql://... (psycopg 3)."""

    def __init__(self, url: str) -> None:
        self.db = Database(url)
        self._results_tables: dict[str, str] = {}
        self._holds_worker_lock = False
        try:
            with self.db.transaction():
                if self.db.is_postgres:  # concurrent CREATE TABLE IF NOT EXISTS can collide in PostgreSQL
                    self.db.execute("SELECT pg_advisory_xact_lock(7411)")
                for statement in _SCHEMA:
                    self.db.execute(statement)
        except self.db.driver_error as error:
            raise DatabaseError(
                f"cannot create the job tables in {self.db.display_url}: {' '.join(str(error).split())}"
            ) from error

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def worker_lock(self) -> Iterator[None]:
        """Held while a worker runs. PostgreSQL: nothing (workers share jobs through row locks). SQLite:
        an exclusive lock on a file beside the database (the OS drops it when its holder dies), because
        SQLite claims cannot skip each other's rows."""
        if self.db.supports_many_workers or self._holds_worker_lock:  # (re-entrant)
            yield
            return
        with open(f"{self.db.path}.worker-lock", "w") as file:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise KilnError(
                    f"another worker is running on the SQLite job store {self.db.path}: SQLite runs one "
                    "worker at a time; for several workers use PostgreSQL (--db postgresql://...)"
                ) from None
            self._holds_worker_lock = True
            try:
                yield
            finally:
                self._holds_worker_lock = False

    # ---------------------------------------------------------------------------------- jobs

    def create_job(self, spec: JobSpec, records: Sequence[Record], job_id: str | None = None) -> str:
        """Store a job and all its records in one transaction; returns its id."""
        job_id = job_id or f"batch_{uuid.uuid4().hex[:24]}"
        if not records:
            raise KilnError("the input has no records; nothing to submit")
        self._check_results_table(spec.results_table)
        with self.db.transaction():
            if self.db.query("SELECT 1 FROM kiln_batch_jobs WHERE job_id = ?", (job_id,)):
                raise KilnError(f"job {job_id!r} exists already; pick another --job-id or run that job")
            self._create_results_table(spec.results_table)
            self.db.execute(
                f"INSERT INTO kiln_batch_jobs (job_id, spec, status, num_records, created_at) "
                f"VALUES (?, ?, 'in_progress', ?, {self.db.now_sql})",
                (job_id, spec.to_json(), len(records)),
            )
            rows = [
                (job_id, index, record.custom_id, json.dumps(record.payload), "pending")
                for index, record in enumerate(records)
            ]
            self.db.executemany(
                "INSERT INTO kiln_batch_records (job_id, record_index, custom_id, payload, state) "
                "VALUES (?, ?, ?, ?, ?)",
                rows,
            )
        return job_id

    def job(self, job_id: str) -> JobInfo:
        rows = self.db.query(
            "SELECT job_id, spec, status, num_records, created_at, finished_at FROM kiln_batch_jobs "
            "WHERE job_id = ?",
            (job_id,),
        )
        if not rows:
            self.db.read_done()
            raise KilnError(f"no job {job_id!r} in this job store; `kiln batch status --db ...` lists them")
        return self._job_info(rows[0])

    def jobs(self) -> list[JobInfo]:
        rows = self.db.query(
            "SELECT job_id, spec, status, num_records, created_at, finished_at FROM kiln_batch_jobs "
            "ORDER BY created_at"
        )
        return [self._job_info(row) for row in rows]

    def counts(self, job_id: str) -> dict[str, int]:
        rows = self.db.query(
            "SELECT state, COUNT(*) FROM kiln_batch_records WHERE job_id = ? GROUP BY state", (job_id,)
        )
        self.db.read_done()
        return {state: 0 for state in STATES} | {state: int(count) for state, count in rows}

    def cancel(self, job_id: str) -> None:
        """Stop handing out the job's records; those being run finish and are written."""
        self.job(job_id)
        with self.db.transaction():
            self.db.execute(
                "UPDATE kiln_batch_records SET state = 'cancelled' WHERE job_id = ? AND state = 'pending'",
                (job_id,),
            )
            self.db.execute(
                f"UPDATE kiln_batch_jobs SET status = 'cancelled', finished_at = {self.db.now_sql} "
                "WHERE job_id = ? AND status = 'in_progress'",
                (job_id,),
            )

    def finish_if_done(self, job_id: str) -> bool:
        """Mark the job completed once no record is pending or claimed; returns whether it is finished."""
        with self.db.transaction():
            self.db.execute(
                f"UPDATE kiln_batch_jobs SET status = 'completed', finished_at = {self.db.now_sql} "
                "WHERE job_id = ? AND status = 'in_progress' AND NOT EXISTS (SELECT 1 FROM "
                "kiln_batch_records WHERE job_id = ? AND state IN ('pending', 'claimed'))",
                (job_id, job_id),
            )
        return self.job(job_id).status != "in_progress"

    # ---------------------------------------------------------------------------------- records

    def claim(self, job_id: str, worker: str, chunk_size: int, lease_s: float) -> list[ClaimedRecord]:
        """Claim up to `chunk_size` pending records (or ones whose lease expired) for `lease_s` seconds."""
        now = self.db.now_sql
        stale = f"(state = 'claimed' AND lease_expires < {now})"
        if not self.db.supports_many_workers:  # one worker per SQLite store: other owners are dead
            stale = "(state = 'claimed' AND lease_owner <> ?)"
        lock = " FOR UPDATE SKIP LOCKED" if self.db.is_postgres else ""
        sql = (
            f"UPDATE kiln_batch_records SET state = 'claimed', lease_owner = ?, "
            f"lease_expires = {now} + ?, attempts = attempts + 1 "
            f"WHERE job_id = ? AND record_index IN (SELECT record_index FROM kiln_batch_records "
            f"WHERE job_id = ? AND (state = 'pending' OR {stale}) ORDER BY record_index LIMIT ?{lock}) "
            f"RETURNING record_index, custom_id, payload"
        )
        params: list[Any] = [worker, lease_s, job_id, job_id]
        if not self.db.supports_many_workers:
            params.append(worker)
        with self.db.transaction():
            rows = self.db.query(sql, (*params, chunk_size))
        records = [ClaimedRecord(record_index=r[0], custom_id=r[1], payload=json.loads(r[2])) for r in rows]
        return sorted(records, key=lambda record: record.record_index)

    def complete(self, job_id: str, worker: str, results: Sequence[RecordResult]) -> int:
        """Write `results` and mark their records done / failed, in one transaction, for the records
        `worker` still holds (a record whose lease another worker took over is skipped: that worker writes
        it). Returns how many were written."""
        by_index = {result.record_index: result for result in results}
        table = self._results_table(job_id)
        with self.db.transaction():
            held: list[int] = []
            for state, indices in (
                ("done", [r.record_index for r in results if not r.failed]),
                ("failed", [r.record_index for r in results if r.failed]),
            ):
                held += self._mark(job_id, worker, state, indices)
            self.db.executemany(
                f"INSERT INTO {table} ({', '.join(RESULT_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(RESULT_COLUMNS))})",
                [self._result_row(job_id, worker, by_index[index]) for index in sorted(held)],
            )
        return len(held)

    def results(self, job_id: str, batch_size: int = 10_000) -> Iterator[dict[str, Any]]:
        """The job's result rows in record order, as dicts of RESULT_COLUMNS."""
        table = self._results_table(job_id)
        last = -1
        while True:
            rows = self.db.query(
                f"SELECT {', '.join(RESULT_COLUMNS)} FROM {table} WHERE job_id = ? AND record_index > ? "
                "ORDER BY record_index LIMIT ?",
                (job_id, last, batch_size),
            )
            self.db.read_done()
            if not rows:
                return
            for row in rows:
                yield dict(zip(RESULT_COLUMNS, row, strict=True))
            last = rows[-1][1]

    def _mark(self, job_id: str, worker: str, state: str, indices: list[int]) -> list[int]:
        held: list[int] = []
        for start in range(0, len(indices), 500):  # bounded parameter lists
            part = indices[start : start + 500]
            rows = self.db.query(
                f"UPDATE kiln_batch_records SET state = ?, lease_owner = NULL, lease_expires = NULL "
                f"WHERE job_id = ? AND state = 'claimed' AND lease_owner = ? "
                f"AND record_index IN ({', '.join('?' * len(part))}) RETURNING record_index",
                (state, job_id, worker, *part),
            )
            held += [row[0] for row in rows]
        return held

    def _result_row(self, job_id: str, worker: str, result: RecordResult) -> tuple:
        return (
            job_id,
            result.record_index,
            result.custom_id,
            "failed" if result.failed else "done",
            result.output,
            None if result.response is None else json.dumps(result.response),
            result.error,
            result.num_prompt_tokens,
            result.num_output_tokens,
            worker,
            time.time(),
        )

    def _results_table(self, job_id: str) -> str:
        """The job's results table (a job's spec never changes, so it is looked up once)."""
        if job_id not in self._results_tables:
            self._results_tables[job_id] = self.job(job_id).spec.results_table
        return self._results_tables[job_id]

    def _job_info(self, row: tuple) -> JobInfo:
        job_id, spec, status, num_records, created_at, finished_at = row
        return JobInfo(
            job_id=job_id,
            spec=JobSpec.from_json(spec),
            status=status,
            num_records=int(num_records),
            created_at=float(created_at),
            finished_at=None if finished_at is None else float(finished_at),
            counts=self.counts(job_id),
        )

    def _check_results_table(self, table: str) -> None:
        columns = self.db.table_columns(table)
        if columns is None:
            return
        wrong = [
            f"{name} ({columns.get(name, 'missing')}, want {family})"
            for name, family in RESULT_COLUMNS.items()
            if _TYPE_FAMILIES.get(columns.get(name, ""), columns.get(name)) != family
        ]
        if wrong:
            raise KilnError(
                f"results table {table!r} exists with an incompatible schema ({', '.join(wrong)}); "
                "pass another --results-table, or drop that table"
            )

    def _create_results_table(self, table: str) -> None:
        columns = ", ".join(f"{name} {_SQL_TYPES[family]}" for name, family in RESULT_COLUMNS.items())
        self.db.execute(
            f"CREATE TABLE IF NOT EXISTS {table} ({columns}, PRIMARY KEY (job_id, record_index), "
            "UNIQUE (job_id, custom_id))"
        )
