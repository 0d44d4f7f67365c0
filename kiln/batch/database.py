"""Database: one connection to the job store, SQLite (a file, the default) or PostgreSQL (psycopg 3).

The store writes its SQL once with `?` placeholders; this class turns them into the driver's style and
gives the few pieces that differ between the two (the clock, row locking, introspection).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kiln.errors import KilnError

# SQLite's clock in epoch seconds; julianday('now') has millisecond resolution.
_SQLITE_NOW = "((julianday('now') - 2440587.5) * 86400.0)"
_POSTGRES_NOW = "extract(epoch from clock_timestamp())::double precision"


class DatabaseError(KilnError):
    """The job store's database cannot be reached or used."""


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


class Database:
    """A connection in autocommit-off mode; use `transaction()` around every write."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_postgres = is_postgres_url(url)
        self.now_sql = _POSTGRES_NOW if self.is_postgres else _SQLITE_NOW
        self.path = None if self.is_postgres else sqlite_path(url)
        self.connection = _connect_postgres(url) if self.is_postgres else _connect_sqlite(self.path)
        self.display_url = _redacted(url)

    @property
    def driver_error(self) -> type[Exception]:
        """The driver's base error class (psycopg.Error or sqlite3.Error)."""
        if self.is_postgres:
            import psycopg

            return psycopg.Error
        return sqlite3.Error

    @property
    def supports_many_workers(self) -> bool:
        """PostgreSQL claims rows with FOR UPDATE SKIP LOCKED; SQLite runs one worker per job store."""
        return self.is_postgres

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.connection.execute(self._sql(sql), tuple(params))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        if self.is_postgres:
            with self.connection.cursor() as cursor:
                cursor.executemany(self._sql(sql), rows)
        else:
            self.connection.executemany(sql, rows)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return list(self.execute(sql, params).fetchall())

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Commit on success, roll back on any error (nothing half-written)."""
        try:
            if not self.is_postgres:
                self.connection.execute("BEGIN IMMEDIATE")  # take the write lock now, not mid-way
            yield
        except BaseException:
            self.connection.rollback()
            raise
        self.connection.commit()

    def read_done(self) -> None:
        """End the implicit read transaction (PostgreSQL opens one per statement outside `transaction`)."""
        self.connection.commit()

    def table_columns(self, table: str) -> dict[str, str] | None:
        """{column: declared type (lower case)} of `table`, or None when it does not exist."""
        if self.is_postgres:
            rows = self.query(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_name = ? AND table_schema = current_schema()",
                (table,),
            )
        else:
            rows = [(row[1], row[2]) for row in self.query(f'PRAGMA table_info("{table}")')]
        self.read_done()
        return {name: kind.lower() for name, kind in rows} or None

    def close(self) -> None:
        self.connection.close()

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.is_postgres else sql


def _connect_postgres(url: str) -> Any:
    try:
        import psycopg
    except ImportError as error:
        raise DatabaseError(
            "a postgresql:// job store needs psycopg 3: pip install 'kiln[postgres]'"
        ) from error
    try:
        return psycopg.connect(url, connect_timeout=10)
    except psycopg.Error as error:
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise DatabaseError(
            f"cannot connect to the job store {_redacted(url)}: {reason}; check --db (host, port, "
            "user, database) and that the server is running"
        ) from error


def sqlite_path(url: str) -> Path:
    """A SQLite store's file: the path itself, or a sqlite:///path URL."""
    return Path(url.removeprefix("sqlite:///").removeprefix("sqlite://")).expanduser()


def _connect_sqlite(path: Path) -> sqlite3.Connection:
    if not path.parent.is_dir():
        raise DatabaseError(f"cannot create the job store {path}: {path.parent} is not a directory")
    try:
        # isolation_level=None: kiln opens transactions itself (BEGIN IMMEDIATE), so reads see fresh data.
        connection = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.Error as error:
        raise DatabaseError(f"cannot open the job store {path}: {error}") from error
    return connection


def _redacted(url: str) -> str:
    """The URL without its password."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}{sep}{credentials.split(':', 1)[0]}:***@{host}"
