"""FileStore: uploaded files (the server's /v1/files) kept in the job store's database, beside the jobs
that read them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from kiln.batch.database import Database
from kiln.errors import KilnError

_SCHEMA = """CREATE TABLE IF NOT EXISTS kiln_batch_files (
    file_id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL, num_bytes INTEGER NOT NULL,
    created_at DOUBLE PRECISION NOT NULL, content TEXT NOT NULL)"""


@dataclass(kw_only=True, slots=True)
class StoredFile:
    file_id: str
    filename: str
    purpose: str
    num_bytes: int
    created_at: float


class FileStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        with db.transaction():
            if db.is_postgres:
                db.execute("SELECT pg_advisory_xact_lock(7412)")
            db.execute(_SCHEMA)

    def create(self, filename: str, purpose: str, content: bytes) -> StoredFile:
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as error:
            raise KilnError(f"{filename} is not UTF-8 text; a batch input file is JSONL") from error
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        with self.db.transaction():
            self.db.execute(
                "INSERT INTO kiln_batch_files (file_id, filename, purpose, num_bytes, created_at, content) "
                f"VALUES (?, ?, ?, ?, {self.db.now_sql}, ?)",
                (file_id, filename, purpose, len(content), text),
            )
        return self.get(file_id)

    def get(self, file_id: str) -> StoredFile:
        rows = self.db.query(
            "SELECT file_id, filename, purpose, num_bytes, created_at FROM kiln_batch_files "
            "WHERE file_id = ?",
            (file_id,),
        )
        self.db.read_done()
        if not rows:
            raise KilnError(f"no file {file_id!r}")
        file_id, filename, purpose, num_bytes, created_at = rows[0]
        return StoredFile(
            file_id=file_id, filename=filename, purpose=purpose, num_bytes=num_bytes, created_at=created_at
        )

    def content(self, file_id: str) -> str:
        rows = self.db.query("SELECT content FROM kiln_batch_files WHERE file_id = ?", (file_id,))
        self.db.read_done()
        if not rows:
            raise KilnError(f"no file {file_id!r}")
        return rows[0][0]

    def list(self) -> list[StoredFile]:
        rows = self.db.query("SELECT file_id FROM kiln_batch_files ORDER BY created_at")
        self.db.read_done()
        return [self.get(row[0]) for row in rows]
