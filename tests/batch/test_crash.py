"""A `kiln batch run` worker SIGKILLed at several points (after claiming, between generating and the
commit, after a commit), then the same command rerun: every record is written exactly once, with the
outputs an uninterrupted run gives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.batch.jobs import submit
from kiln.batch.runner import FAULT_ENV
from kiln.batch.store import JobStore
from tests.batch.conftest import TEMPLATE, write_rows
from tests.batch.test_runner import TAGGING, oracle_labels

REPO = Path(__file__).resolve().parents[2]
NUM_RECORDS = 160
CHUNK = 40


def run_worker(db_url: str, job_id: str, model_dir: Path, fault: str | None = None, lease: float = 600):
    command = [sys.executable, "-m", "kiln.cli", "batch", "run", job_id, "--db", db_url]
    command += ["--model", str(model_dir), "--chunk-size", str(CHUNK), "--lease", str(lease), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def check_killed_then_rerun(db_url, model_dir, llm, tmp_path, fault: str, lease: float = 600) -> None:
    path = write_rows(tmp_path / "rows.jsonl", NUM_RECORDS)
    store = JobStore(db_url)
    job_id = submit(store, path, TAGGING)
    killed = run_worker(db_url, job_id, model_dir, fault, lease)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    point, chunk = fault.split(":")
    written = (int(chunk) - (point != "committed")) * CHUNK
    counts = store.counts(job_id)
    assert counts["done"] == written and len(list(store.results(job_id))) == written
    assert counts["claimed"] == (CHUNK if point != "committed" else 0)  # the dead worker's chunk
    rerun = run_worker(db_url, job_id, model_dir, lease=lease)
    assert rerun.returncode == 0, rerun.stderr
    rows = list(store.results(job_id))
    assert sorted(row["record_index"] for row in rows) == list(range(NUM_RECORDS))  # each exactly once
    assert len({row["custom_id"] for row in rows}) == NUM_RECORDS
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert [row["output"] for row in rows] == [label for label, _ in oracle_labels(llm, texts)]
    assert store.job(job_id).status == "completed"
    assert TEMPLATE in store.job(job_id).spec.template


@pytest.mark.parametrize(
    "fault",
    [
        "generated:2",
        pytest.param("claimed:1", marks=pytest.mark.slow),
        pytest.param("committed:2", marks=pytest.mark.slow),
    ],
)
def test_sqlite_worker_killed_then_rerun(tmp_path, model_dir, llm, fault):
    check_killed_then_rerun(str(tmp_path / "jobs.db"), model_dir, llm, tmp_path, fault)


def test_postgres_worker_killed_between_generate_and_commit_then_rerun(
    postgres_url, model_dir, llm, tmp_path
):
    # The rerun is a new worker: it takes the dead one's chunk once its 2 s lease has passed.
    check_killed_then_rerun(postgres_url, model_dir, llm, tmp_path, "generated:3", lease=2)
