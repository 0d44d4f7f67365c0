"""Batch jobs: records (OpenAI batch requests or table rows) run through the engine, results written to
SQLite (the default) or PostgreSQL exactly once, resumably, by any number of workers."""

from kiln.batch.backend import Backend, LLMBackend
from kiln.batch.runner import BatchRunner, RunStats
from kiln.batch.spec import JobSpec
from kiln.batch.store import JobInfo, JobStore, Record, RecordResult

__all__ = [
    "Backend",
    "BatchRunner",
    "JobInfo",
    "JobSpec",
    "JobStore",
    "LLMBackend",
    "Record",
    "RecordResult",
    "RunStats",
]
