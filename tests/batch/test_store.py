"""JobStore on SQLite and PostgreSQL: claims, leases, exactly-once writes, and refusals that leave nothing
half-written."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from kiln.batch.database import DatabaseError
from kiln.batch.spec import JobSpec
from kiln.batch.store import JobStore, Record, RecordResult
from kiln.errors import KilnError

SPEC = JobSpec(kind="table", template="{{ text }}", labels=("a", "b"))


def records(count: int) -> list[Record]:
    return [Record(custom_id=f"id{i}", payload={"text": f"t{i}"}) for i in range(count)]


def done(claimed) -> list[RecordResult]:
    return [RecordResult(record_index=r.record_index, custom_id=r.custom_id, output="a") for r in claimed]


def test_claim_complete_exactly_once(db_url):
    store = JobStore(db_url)
    job_id = store.create_job(SPEC, records(10))
    first = store.claim(job_id, "w1", 4, lease_s=60)
    assert [r.record_index for r in first] == [0, 1, 2, 3]
    assert store.counts(job_id)["claimed"] == 4
    results = done(first)
    results[1] = RecordResult(record_index=1, custom_id="id1", error="prompt too long")
    assert store.complete(job_id, "w1", results) == 4
    assert store.complete(job_id, "w1", results) == 0  # written once: the records are no longer held
    rest = store.claim(job_id, "w1", 100, lease_s=60)
    assert [r.record_index for r in rest] == list(range(4, 10))
    store.complete(job_id, "w1", done(rest))
    assert store.finish_if_done(job_id)
    rows = list(store.results(job_id))
    assert [row["custom_id"] for row in rows] == [f"id{i}" for i in range(10)]
    assert rows[1]["status"] == "failed" and rows[1]["error"] == "prompt too long"
    info = store.job(job_id)
    assert info.status == "completed" and info.counts["done"] == 9 and info.counts["failed"] == 1


def test_expired_lease_is_reclaimed_and_the_old_holder_writes_nothing(postgres_url):
    store_a, store_b = JobStore(postgres_url), JobStore(postgres_url)
    job_id = store_a.create_job(SPEC, records(6))
    held = store_a.claim(job_id, "dead", 3, lease_s=0.5)
    assert [r.record_index for r in store_b.claim(job_id, "live", 3, lease_s=60)] == [3, 4, 5]
    assert store_b.claim(job_id, "live", 3, lease_s=60) == []  # the dead worker's lease still holds
    time.sleep(0.7)
    taken = store_b.claim(job_id, "live", 10, lease_s=60)
    assert [r.record_index for r in taken] == [0, 1, 2]
    assert store_a.complete(job_id, "dead", done(held)) == 0  # too late: its lease passed to "live"
    assert store_b.complete(job_id, "live", done(taken)) == 3
    assert {row["worker"] for row in store_b.results(job_id)} == {"live"}


def test_sqlite_reclaims_a_dead_workers_claims_at_once(tmp_path):
    store = JobStore(str(tmp_path / "jobs.db"))
    job_id = store.create_job(SPEC, records(4))
    store.claim(job_id, "killed", 4, lease_s=600)
    # One worker per SQLite store (the worker lock), so claims of any other worker are a dead one's.
    assert [r.record_index for r in store.claim(job_id, "restarted", 10, lease_s=600)] == [0, 1, 2, 3]


def test_sqlite_runs_one_worker_and_says_so(tmp_path):
    first, second = JobStore(str(tmp_path / "jobs.db")), JobStore(str(tmp_path / "jobs.db"))
    with first.worker_lock():
        with pytest.raises(KilnError, match="SQLite runs one worker"):
            with second.worker_lock():
                pass
    with second.worker_lock():  # released with its holder
        pass


def test_concurrent_postgres_claims_are_disjoint(postgres_url):
    store = JobStore(postgres_url)
    job_id = store.create_job(SPEC, records(400))
    claimed: dict[str, list[int]] = {"w1": [], "w2": [], "w3": []}

    def work(worker: str) -> None:
        mine = JobStore(postgres_url)
        while batch := mine.claim(job_id, worker, 7, lease_s=60):
            claimed[worker] += [r.record_index for r in batch]
            mine.complete(job_id, worker, done(batch))
        mine.close()

    threads = [threading.Thread(target=work, args=(w,)) for w in claimed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [index for indices in claimed.values() for index in indices]
    assert sorted(everything) == list(range(400))  # disjoint (no index twice) and complete
    assert len(list(store.results(job_id))) == 400


def test_incompatible_results_table_is_refused_before_anything_is_written(db_url):
    store = JobStore(db_url)
    with store.db.transaction():
        store.db.execute("CREATE TABLE tags (job_id TEXT, record_index TEXT, label TEXT)")
    spec = JobSpec(kind="table", template="{{ text }}", results_table="tags")
    with pytest.raises(KilnError, match="results table 'tags' exists with an incompatible schema"):
        store.create_job(spec, records(3))
    assert store.jobs() == []
    assert store.db.query("SELECT COUNT(*) FROM kiln_batch_records")[0][0] == 0


def test_a_compatible_existing_results_table_is_reused(db_url):
    store = JobStore(db_url)
    first = store.create_job(SPEC, records(2))
    second = store.create_job(SPEC, records(3))  # the same (default) results table, now existing
    for job_id in (first, second):
        store.complete(job_id, "w", done(store.claim(job_id, "w", 10, lease_s=60)))
    assert len(list(store.results(first))) == 2 and len(list(store.results(second))) == 3


def test_duplicate_job_id_is_refused(db_url):
    store = JobStore(db_url)
    store.create_job(SPEC, records(2), job_id="tags-1")
    with pytest.raises(KilnError, match="job 'tags-1' exists already"):
        store.create_job(SPEC, records(2), job_id="tags-1")


def test_cancel_stops_handing_out_records(db_url):
    store = JobStore(db_url)
    job_id = store.create_job(SPEC, records(5))
    running = store.claim(job_id, "w", 2, lease_s=60)
    store.cancel(job_id)
    assert store.claim(job_id, "w", 10, lease_s=60) == []
    assert store.complete(job_id, "w", done(running)) == 2  # what was running still lands
    info = store.job(job_id)
    assert info.status == "cancelled" and info.counts["cancelled"] == 3 and info.counts["done"] == 2


def test_unreachable_postgres_is_one_line():
    with pytest.raises(DatabaseError, match="cannot connect to the job store") as caught:
        JobStore("postgresql://postgres:secret@127.0.0.1:1/test")
    assert "\n" not in str(caught.value) and "secret" not in str(caught.value)


def test_sqlite_in_a_missing_directory_is_one_line(tmp_path):
    with pytest.raises(DatabaseError, match="is not a directory"):
        JobStore(str(tmp_path / "nope" / "jobs.db"))


def test_results_table_name_must_be_plain_sql():
    with pytest.raises(KilnError, match="not a plain SQL name"):
        JobSpec(kind="table", template="x", results_table="tags; DROP TABLE x")


def test_sqlite_store_is_a_plain_file(tmp_path):
    store = JobStore(str(tmp_path / "jobs.db"))
    store.create_job(SPEC, records(2))
    assert sqlite3.connect(tmp_path / "jobs.db").execute(
        "SELECT COUNT(*) FROM kiln_batch_records"
    ).fetchone() == (2,)


def test_postgres_schema_that_does_not_exist_is_one_line(postgres_url):
    url = postgres_url.rsplit("%3D", 1)[0] + "%3Dkiln_no_such_schema"
    with pytest.raises(DatabaseError, match="cannot create the job tables") as caught:
        JobStore(url)
    assert "\n" not in str(caught.value)
