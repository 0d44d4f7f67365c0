"""Table jobs over the rows of a SQL query (`kiln batch submit --query`), against the job store's own
database (SQLite and PostgreSQL) or another one: the labels equal kiln.LLM's, as for a file table; a query
that fails, or a template column the query does not return, is a one-line error and stores nothing."""

from __future__ import annotations

import json

import pytest

from kiln.batch.database import Database
from kiln.batch.jobs import run_job, submit_query
from kiln.batch.spec import JobSpec
from kiln.batch.store import JobStore
from kiln.errors import KilnError
from tests.batch.conftest import LABELS, TEMPLATE, write_rows
from tests.batch.test_runner import oracle_labels

TAGGING = JobSpec(kind="table", template=TEMPLATE, id_column="id", labels=LABELS)


def fill_reviews(url: str, rows: list[dict]) -> None:
    database = Database(url)
    try:
        with database.transaction():
            database.execute("CREATE TABLE reviews (id TEXT, text TEXT, stars INTEGER)")
            database.executemany(
                "INSERT INTO reviews VALUES (?, ?, ?)",
                [(r["id"], r["text"], i % 5) for i, r in enumerate(rows)],
            )
    finally:
        database.connection.close()


def test_a_query_job_equals_llm(db_url, llm, tmp_path):
    rows = [json.loads(line) for line in write_rows(tmp_path / "rows.jsonl", 40).read_text().splitlines()]
    fill_reviews(db_url, rows)
    store = JobStore(db_url)
    query = "SELECT id, text FROM reviews WHERE stars >= 1 AND text LIKE '%' ORDER BY id"
    job_id = submit_query(store, query, TAGGING)
    stats = run_job(store, job_id, llm=llm, chunk_size=16, show_progress=False)
    chosen = sorted((r for i, r in enumerate(rows) if i % 5 >= 1), key=lambda r: r["id"])
    assert stats.num_done == len(chosen) == store.job(job_id).num_records
    results = {row["custom_id"]: row["output"] for row in store.results(job_id)}
    expected = oracle_labels(llm, [r["text"] for r in chosen])
    assert results == {r["id"]: label for r, (label, _) in zip(chosen, expected, strict=True)}
    store.close()


def test_a_query_against_another_database(llm, tmp_path):
    rows = [json.loads(line) for line in write_rows(tmp_path / "rows.jsonl", 6).read_text().splitlines()]
    source = str(tmp_path / "source.db")
    fill_reviews(source, rows)
    store = JobStore(str(tmp_path / "jobs.db"))
    job_id = submit_query(store, "SELECT id, text, stars FROM reviews", TAGGING, source=source)
    assert store.job(job_id).num_records == 6
    store.close()


def test_bad_queries_are_one_line_errors_and_store_nothing(db_url, tmp_path):
    rows = [json.loads(line) for line in write_rows(tmp_path / "rows.jsonl", 3).read_text().splitlines()]
    fill_reviews(db_url, rows)
    store = JobStore(db_url)
    with pytest.raises(KilnError, match="the query failed") as failed:
        submit_query(store, "SELECT id, text FROM no_such_table", TAGGING)
    assert "\n" not in str(failed.value)
    with pytest.raises(KilnError, match="text"):
        submit_query(store, "SELECT id FROM reviews", TAGGING)  # the template needs `text`
    with pytest.raises(KilnError, match="no rows"):
        submit_query(store, "SELECT id, text FROM reviews WHERE 1 = 0", TAGGING)
    assert store.db.query("SELECT COUNT(*) FROM kiln_batch_jobs")[0][0] == 0
    store.close()  # ends the read's transaction: the fixture's DROP SCHEMA would wait on it forever
