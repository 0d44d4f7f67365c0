"""`kiln batch submit|run|status|export` end to end, and bad input refused in one line with nothing
written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kiln.batch.store import JobStore
from kiln.cli import app
from kiln.errors import KilnError
from tests.batch.conftest import TEMPLATE, write_rows

REPO = Path(__file__).resolve().parents[2]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def user_error(*args: str) -> str:
    """The KilnError a command raises (kiln's main prints it as one line)."""
    result = invoke(*args)
    assert isinstance(result.exception, KilnError), result.output
    message = str(result.exception)
    assert "\n" not in message
    return message


def test_submit_run_status_export(tmp_path, model_dir):
    db = str(tmp_path / "jobs.db")
    rows = write_rows(tmp_path / "rows.jsonl", 30)
    submitted = invoke(
        "batch",
        "submit",
        str(rows),
        "--db",
        db,
        "--template",
        TEMPLATE,
        "--id-column",
        "id",
        "--labels",
        "A,B,C",
        "--model",
        str(model_dir),
        "--job-id",
        "tags",
    )
    assert submitted.exit_code == 0, submitted.output
    assert submitted.stdout.strip() == "tags"
    ran = invoke("batch", "run", "tags", "--db", db, "--no-progress")
    assert ran.exit_code == 0, ran.output
    assert "tags: completed, 30 records: 30 done, 0 failed, 0 pending" in ran.stdout
    status = invoke("batch", "status", "--db", db)
    assert "tags: completed, 30 records: 30 done" in status.stdout
    out = tmp_path / "out.jsonl"
    assert invoke("batch", "export", "tags", "--db", db, "-o", str(out)).exit_code == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == [f"r{i}" for i in range(30)]
    assert all(line["output"] in ("A", "B", "C") and line["error"] is None for line in lines)


def test_malformed_jsonl_line_is_one_line_and_nothing_is_written(tmp_path):
    db = str(tmp_path / "jobs.db")
    good = {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}
    path = tmp_path / "batch.jsonl"
    path.write_text(json.dumps(good) + "\n" + '{"custom_id": "b", "method": "POST", "url": \n')
    assert "batch.jsonl line 2 is not valid JSON" in user_error("batch", "submit", str(path), "--db", db)
    assert JobStore(db).jobs() == []


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            {"custom_id": "a", "method": "POST", "url": "/v1/images", "body": {}},
            "url '/v1/images' is not one of",
        ),
        ({"custom_id": "a", "url": "/v1/completions", "body": {}}, "lacks method"),
        ({"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}, "method must be POST"),
    ],
)
def test_bad_openai_lines(tmp_path, line, message):
    path = tmp_path / "batch.jsonl"
    path.write_text(json.dumps(line) + "\n")
    assert message in user_error("batch", "submit", str(path), "--db", str(tmp_path / "jobs.db"))


def test_duplicate_custom_id(tmp_path):
    line = {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}
    path = tmp_path / "batch.jsonl"
    path.write_text((json.dumps(line) + "\n") * 2)
    assert "custom_id 'a' appears twice" in user_error(
        "batch", "submit", str(path), "--db", str(tmp_path / "j.db")
    )


def test_unknown_template_column_is_one_line_and_nothing_is_written(tmp_path):
    db = str(tmp_path / "jobs.db")
    rows = write_rows(tmp_path / "rows.jsonl", 5)
    message = user_error("batch", "submit", str(rows), "--db", db, "--template", "{{ txt }}")
    assert (
        message
        == "the prompt template uses column(s) txt that the input does not have (its columns: id, text)"
    )
    assert JobStore(db).jobs() == []


def test_csv_and_parquet_tables(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    db = str(tmp_path / "jobs.db")
    (tmp_path / "rows.csv").write_text("key,text\nk1,hello\nk2,world\n")
    pq.write_table(pa.table({"key": ["p1", "p2", "p3"], "text": ["a", "b", "c"]}), tmp_path / "rows.parquet")
    for name, count in (("rows.csv", 2), ("rows.parquet", 3)):
        result = invoke(
            "batch",
            "submit",
            str(tmp_path / name),
            "--db",
            db,
            "--template",
            "{{ text }}",
            "--id-column",
            "key",
        )
        assert result.exit_code == 0, result.output
        assert JobStore(db).job(result.stdout.strip()).num_records == count
    assert "id column 'id'" in user_error(
        "batch",
        "submit",
        str(tmp_path / "rows.csv"),
        "--db",
        db,
        "--template",
        "{{ text }}",
        "--id-column",
        "id",
    )


def test_incompatible_results_table_via_cli(tmp_path):
    db = str(tmp_path / "jobs.db")
    JobStore(db).db.execute("CREATE TABLE tags (custom_id TEXT, label INTEGER)")
    rows = write_rows(tmp_path / "rows.jsonl", 5)
    message = user_error(
        "batch", "submit", str(rows), "--db", db, "--template", "{{ text }}", "--results-table", "tags"
    )
    assert "results table 'tags' exists with an incompatible schema" in message
    assert JobStore(db).jobs() == []


def test_unreachable_database_prints_one_line():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kiln.cli",
            "batch",
            "status",
            "--db",
            "postgresql://postgres@127.0.0.1:1/test",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot connect to the job store"), result.stderr


def test_a_second_sqlite_worker_is_refused(tmp_path, model_dir):
    db = str(tmp_path / "jobs.db")
    rows = write_rows(tmp_path / "rows.jsonl", 5)
    invoke("batch", "submit", str(rows), "--db", db, "--template", "{{ text }}", "--job-id", "j")
    with JobStore(db).worker_lock():
        message = user_error("batch", "run", "j", "--db", db, "--model", str(tmp_path / "no-model"))
    assert "SQLite runs one worker at a time" in message
