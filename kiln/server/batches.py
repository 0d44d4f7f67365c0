"""/v1/files and /v1/batches (OpenAI's Batch API) over kiln's job store: upload a JSONL of requests,
create a batch from it, poll it, cancel it, download its output and error files. The server's batch worker
(kiln/server/batch_worker.py) runs the batches through the server's own engine."""

from __future__ import annotations

import json
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from kiln.batch.export import result_lines
from kiln.batch.files import FileStore
from kiln.batch.inputs import parse_openai_batch
from kiln.batch.spec import OPENAI_ENDPOINTS, JobSpec
from kiln.batch.store import JobInfo, JobStore
from kiln.errors import KilnError
from kiln.server.errors import APIError
from kiln.server.openapi import responses

OUTPUT_SUFFIX, ERRORS_SUFFIX = "-output", "-errors"  # a batch's output / error file ids: its id + these


class BatchCreate(BaseModel):
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None


def add_batch_routes(app: FastAPI, store: JobStore, model_name: str) -> None:
    files = FileStore(store.db)
    _add_file_routes(app, store, files)
    _add_job_routes(app, store, files, model_name)


def _add_file_routes(app: FastAPI, store: JobStore, files: FileStore) -> None:
    @app.post("/v1/files", responses=responses(400, 401, 413))
    async def upload_file(request: Request) -> dict[str, Any]:
        fields = _multipart(request.headers.get("content-type", ""), await request.body())
        if "file" not in fields:
            raise APIError(400, "upload the JSONL as the multipart field `file`", param="file")
        filename, content = fields["file"]
        purpose = fields.get("purpose", ("", b"batch"))[1].decode()
        return _file_object(_user(files.create, filename or "upload.jsonl", purpose, content))

    @app.get("/v1/files/{file_id}", responses=responses(401, 404))
    async def retrieve_file(file_id: str) -> dict[str, Any]:
        job_id, _ = _output_of(file_id)
        if job_id is not None:
            return _output_file_object(file_id, store.job(job_id).created_at)
        return _file_object(_found(files.get, file_id))

    @app.get("/v1/files/{file_id}/content", responses=responses(401, 404))
    async def file_content(file_id: str) -> PlainTextResponse:
        job_id, status = _output_of(file_id)
        if job_id is None:
            return PlainTextResponse(_found(files.content, file_id), media_type="application/jsonl")
        _found(store.job, job_id)
        text = "".join(json.dumps(line) + "\n" for line in result_lines(store, job_id, status))
        return PlainTextResponse(text, media_type="application/jsonl")


def _add_job_routes(app: FastAPI, store: JobStore, files: FileStore, model_name: str) -> None:
    @app.post("/v1/batches", responses=responses(400, 401, 404))
    async def create_batch(body: BatchCreate) -> dict[str, Any]:
        if body.endpoint not in OPENAI_ENDPOINTS:
            raise APIError(400, f"endpoint must be one of {', '.join(OPENAI_ENDPOINTS)}", param="endpoint")
        content = _found(files.content, body.input_file_id)
        metadata = {
            **(body.metadata or {}),
            "kiln_input_file_id": body.input_file_id,
            "kiln_completion_window": body.completion_window,
        }
        spec = JobSpec(kind="openai", endpoint=body.endpoint, metadata=metadata)
        records = _user(parse_openai_batch, content.splitlines(), body.input_file_id, body.endpoint)
        job_id = _user(store.create_job, spec, records)
        return _batch_object(store.job(job_id), model_name)

    @app.get("/v1/batches/{batch_id}", responses=responses(401, 404))
    async def retrieve_batch(batch_id: str) -> dict[str, Any]:
        return _batch_object(_found(store.job, batch_id), model_name)

    @app.post("/v1/batches/{batch_id}/cancel", responses=responses(401, 404))
    async def cancel_batch(batch_id: str) -> dict[str, Any]:
        _found(store.cancel, batch_id)
        return _batch_object(store.job(batch_id), model_name)

    @app.get("/v1/batches", responses=responses(401))
    async def list_batches(limit: int = 20, after: str | None = None) -> dict[str, Any]:
        jobs = [job for job in reversed(store.jobs()) if job.spec.kind == "openai"]  # newest first
        if after is not None:
            ids = [job.job_id for job in jobs]
            jobs = jobs[ids.index(after) + 1 :] if after in ids else []
        page = [_batch_object(job, model_name) for job in jobs[:limit]]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(jobs) > limit,
        }


def _batch_object(job: JobInfo, model_name: str) -> dict[str, Any]:
    counts = job.counts
    status = job.status  # in_progress | completed | cancelled
    if status == "cancelled" and counts["claimed"]:
        status = "cancelling"
    finished = status in ("completed", "cancelled")
    metadata = {k: v for k, v in job.spec.metadata.items() if not k.startswith("kiln_")}
    created = int(job.created_at)
    return {
        "id": job.job_id,
        "object": "batch",
        "endpoint": job.spec.endpoint,
        "model": model_name,
        "errors": None,
        "input_file_id": job.spec.metadata.get("kiln_input_file_id", ""),
        "completion_window": job.spec.metadata.get("kiln_completion_window", "24h"),
        "status": status,
        "output_file_id": job.job_id + OUTPUT_SUFFIX if finished and counts["done"] else None,
        "error_file_id": job.job_id + ERRORS_SUFFIX if finished and counts["failed"] else None,
        "created_at": created,
        "in_progress_at": created,
        "expires_at": created + 86_400,
        "completed_at": int(job.finished_at) if status == "completed" and job.finished_at else None,
        "cancelled_at": int(job.finished_at) if status == "cancelled" and job.finished_at else None,
        "request_counts": {
            "total": job.num_records,
            "completed": counts["done"],
            "failed": counts["failed"],
        },
        "metadata": metadata or None,
    }


def _file_object(stored) -> dict[str, Any]:
    return {
        "id": stored.file_id,
        "object": "file",
        "bytes": stored.num_bytes,
        "created_at": int(stored.created_at),
        "filename": stored.filename,
        "purpose": stored.purpose,
        "status": "processed",
    }


def _output_file_object(file_id: str, created_at: float) -> dict[str, Any]:
    return {
        "id": file_id,
        "object": "file",
        "bytes": 0,
        "created_at": int(created_at),
        "filename": f"{file_id}.jsonl",
        "purpose": "batch_output",
        "status": "processed",
    }


def _output_of(file_id: str) -> tuple[str | None, str | None]:
    """(job id, result status) of a batch's output or error file id; (None, None) for an uploaded file."""
    for suffix, status in ((OUTPUT_SUFFIX, "done"), (ERRORS_SUFFIX, "failed")):
        if file_id.startswith("batch_") and file_id.endswith(suffix):
            return file_id.removesuffix(suffix), status
    return None, None


def _found(function, *args):
    try:
        return function(*args)
    except KilnError as error:
        raise APIError(404, str(error), code="not_found") from error


def _user(function, *args):
    try:
        return function(*args)
    except KilnError as error:
        raise APIError(400, str(error)) from error


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """{field: (filename, bytes)} of a multipart/form-data body (python-multipart is not a dependency)."""
    if not content_type.startswith("multipart/form-data"):
        raise APIError(400, "upload files as multipart/form-data (fields `file` and `purpose`)")
    header = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(header + body)
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts() if message.is_multipart() else ():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields
