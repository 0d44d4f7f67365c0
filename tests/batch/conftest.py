"""Batch fixtures: the tiny text model (and one kiln.LLM over it), a SQLite file store, and a PostgreSQL
store in a schema of its own on the server at 127.0.0.1:5432 (dropped afterwards; the PostgreSQL tests skip,
saying so, where no server is reachable)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from tests.hf_cases import build_text_model

PG_SERVER = os.environ.get("KILN_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
LABELS = ("A", "B", "C", "D", "E")  # five labels the tiny random model does not all score alike
TEMPLATE = "Text: {{ text }}\nLabel:"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return build_text_model(tmp_path_factory.mktemp("batch-model"))


@pytest.fixture(scope="session")
def llm(model_dir):
    import kiln

    return kiln.LLM(model_dir, verbose=False)


def _postgres_reachable() -> str | None:
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed"
    try:
        psycopg.connect(PG_SERVER, connect_timeout=3).close()
    except psycopg.Error as error:
        return f"no PostgreSQL server at {PG_SERVER} ({' '.join(str(error).split())[:120]})"
    return None


@pytest.fixture
def postgres_url():
    """postgresql://... whose search_path is a fresh schema (dropped after the test)."""
    reason = _postgres_reachable()
    if reason:
        pytest.skip(f"PostgreSQL tests need a server: {reason}")
    import psycopg

    schema = f"kiln_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_SERVER, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {schema}")
    yield f"{PG_SERVER}?options=-csearch_path%3D{schema}"
    with psycopg.connect(PG_SERVER, autocommit=True) as connection:
        connection.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    """Each test runs against a SQLite file and against PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "jobs.db")
    return request.getfixturevalue("postgres_url")


def write_rows(path: Path, count: int, start: int = 0) -> Path:
    """A JSONL table of `count` short records {id, text}."""
    words = ["apple", "error in module", "great work", "buy now cheap", "the weather", "def f(x):", "ok"]
    rows = [
        {"id": f"r{i}", "text": f"{words[i % len(words)]} {i} {words[(i * 3) % len(words)]}"}
        for i in range(start, start + count)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
