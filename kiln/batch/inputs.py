"""Reading batch inputs into records: OpenAI batch files (JSONL of {custom_id, method, url, body}) and
tables (JSONL, CSV, Parquet, or the rows of a SQL query) whose rows a prompt template turns into prompts.

Every reader checks the whole input before anything is stored: a malformed line is a one-line error naming
it, and nothing of the job is written.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kiln.batch.database import Database
from kiln.batch.spec import OPENAI_ENDPOINTS, JobSpec
from kiln.batch.store import Record
from kiln.batch.template import PromptTemplate
from kiln.errors import KilnError

TABLE_SUFFIXES = (".jsonl", ".csv", ".parquet")


def parse_openai_batch(
    lines: Iterable[str | bytes], source: str, endpoint: str | None = None
) -> list[Record]:
    """The records of an OpenAI batch file; `endpoint`, when given, is the one url every line must use."""
    records: list[Record] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        try:
            request = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise KilnError(f"{where} is not valid JSON ({error}); fix or remove that line") from error
        custom_id, url = _check_request(request, where, endpoint)
        if custom_id in seen:
            raise KilnError(f"{where}: custom_id {custom_id!r} appears twice; each request needs its own")
        seen.add(custom_id)
        records.append(Record(custom_id=custom_id, payload={"url": url, "body": request["body"]}))
    return records


def read_openai_batch(path: Path, endpoint: str | None = None) -> list[Record]:
    with _open(path) as lines:
        return parse_openai_batch(lines, str(path), endpoint)


def read_table(path: Path, template: PromptTemplate, id_column: str | None) -> list[Record]:
    """The rows of a JSONL / CSV / Parquet table, each a record keyed by `id_column` (default: the row
    number). The template's columns must exist in the input."""
    rows, columns = _read_rows(path)
    return _table_records(rows, columns, str(path), template, id_column)


def read_query(database: Database, sql: str, template: PromptTemplate, id_column: str | None) -> list[Record]:
    """The rows a SQL query returns from `database` (SQLite or PostgreSQL), each a record as `read_table`
    makes them; values JSON cannot hold (dates, decimals) become their text. The query only reads: its
    transaction is rolled back."""
    try:
        cursor = database.connection.execute(sql)  # no parameters: a % or ? in the query stays as written
        columns = [column[0] for column in cursor.description or ()]
        rows = [{c: _jsonable(v) for c, v in zip(columns, row, strict=True)} for row in cursor.fetchall()]
    except database.driver_error as error:
        message = str(error).strip().splitlines()
        raise KilnError(
            f"the query failed on {database.display_url}: {message[0] if message else error}"
        ) from None
    finally:
        database.connection.rollback()
    if not columns:
        raise KilnError("the query returns no columns; give a SELECT")
    return _table_records(rows, set(columns), "the query", template, id_column)


def _jsonable(value: Any) -> Any:
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)


def _table_records(
    rows: list[dict[str, Any]], columns: set[str], path: str, template: PromptTemplate, id_column: str | None
) -> list[Record]:
    if not rows:
        raise KilnError(f"{path} has no rows; nothing to submit")
    template.check_columns(columns)
    if id_column is not None and id_column not in columns:
        raise KilnError(
            f"id column {id_column!r} is not in {path} (its columns: {', '.join(sorted(columns))})"
        )
    records: list[Record] = []
    seen: set[str] = set()
    for number, row in enumerate(rows):
        custom_id = str(number) if id_column is None else row.get(id_column)
        if custom_id is None or custom_id == "":
            raise KilnError(f"{path} row {number + 1} has no value in the id column {id_column!r}")
        custom_id = str(custom_id)
        if custom_id in seen:
            raise KilnError(
                f"{path}: id {custom_id!r} appears twice in column {id_column!r}; ids must be unique"
            )
        seen.add(custom_id)
        records.append(Record(custom_id=custom_id, payload=row))
    return records


def _check_request(request: Any, where: str, endpoint: str | None) -> tuple[str, str]:
    if not isinstance(request, dict):
        raise KilnError(f"{where} is not a JSON object; each line is {{custom_id, method, url, body}}")
    missing = [key for key in ("custom_id", "method", "url", "body") if key not in request]
    if missing:
        raise KilnError(f"{where} lacks {', '.join(missing)}; each line is {{custom_id, method, url, body}}")
    custom_id, url = request["custom_id"], request["url"]
    if not isinstance(custom_id, str) or not custom_id:
        raise KilnError(f"{where}: custom_id must be a non-empty string")
    if str(request["method"]).upper() != "POST":
        raise KilnError(f"{where}: method must be POST, got {request['method']!r}")
    if url not in OPENAI_ENDPOINTS or (endpoint is not None and url != endpoint):
        allowed = [endpoint] if endpoint else list(OPENAI_ENDPOINTS)
        raise KilnError(f"{where}: url {url!r} is not one of {', '.join(allowed)}")
    if not isinstance(request["body"], dict):
        raise KilnError(f"{where}: body must be a JSON object")
    return custom_id, url


class _open:
    """The lines of a text file, with a one-line error when it cannot be read."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise KilnError(f"{path}: no such file")
        self.file = path.open("rb")

    def __enter__(self):
        return self.file

    def __exit__(self, *exc) -> None:
        self.file.close()


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], set[str]]:
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise KilnError(f"{path}: a table input is one of {', '.join(TABLE_SUFFIXES)}")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        if not path.is_file():
            raise KilnError(f"{path}: no such file")
        table = pq.read_table(path)
        return table.to_pylist(), set(table.column_names)
    if suffix == ".csv":
        with _open(path):
            pass
        with path.open(newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            return list(reader), set(reader.fieldnames or ())
    rows: list[dict[str, Any]] = []
    with _open(path) as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise KilnError(
                    f"{path} line {number} is not valid JSON ({error}); fix or remove it"
                ) from error
            if not isinstance(row, dict):
                raise KilnError(
                    f"{path} line {number} is not a JSON object (a table row is {{column: value}})"
                )
            rows.append(row)
    return rows, set().union(*rows) if rows else set()


def read_records(path: Path, spec: JobSpec) -> list[Record]:
    """The records of `path` as the job `spec` reads them."""
    if spec.kind == "openai":
        return read_openai_batch(path, spec.endpoint)
    return read_table(path, PromptTemplate(spec.template or ""), spec.id_column)


def read_query_records(database: Database, sql: str, spec: JobSpec) -> list[Record]:
    """The records of a SQL query for the table job `spec`."""
    if spec.kind != "table":
        raise KilnError("a --query job is a table job: give --template (and --labels to tag)")
    return read_query(database, sql, PromptTemplate(spec.template or ""), spec.id_column)
