"""BatchRunner: one worker of a job. It claims a chunk of records, runs them through the engine in one
batch, and writes their results in the transaction that marks them done, until the job has no record left
to claim. Any number of runners share a PostgreSQL job; a SQLite job store takes one at a time."""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from kiln.batch.backend import Backend
from kiln.batch.store import ClaimedRecord, JobStore, RecordResult
from kiln.batch.work import RecordWork, WorkBuilder, failure
from kiln.errors import KilnError

# Crash tests set KILN_BATCH_FAULT=<point>:<chunk> to SIGKILL the worker when its <chunk>-th chunk (from 1)
# reaches <point>: "claimed" (before generating), "generated" (before the commit) or "committed".
FAULT_ENV = "KILN_BATCH_FAULT"


@dataclass(kw_only=True, slots=True)
class RunStats:
    """What this runner did: records written, failed, tokens, and the wall time it took."""

    num_done: int = 0
    num_failed: int = 0
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_chunks: int = 0
    seconds: float = 0.0

    @property
    def num_records(self) -> int:
        return self.num_done + self.num_failed


class BatchRunner:
    def __init__(
        self,
        store: JobStore,
        job_id: str,
        backend: Backend,
        *,
        worker_id: str | None = None,
        chunk_size: int = 256,
        lease_s: float = 600.0,
        poll_s: float = 0.5,
        on_chunk: Callable[[RunStats], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        if chunk_size < 1 or lease_s <= 0:
            raise KilnError(f"chunk size must be >= 1 and lease > 0, got {chunk_size} and {lease_s}")
        self.store = store
        self.job_id = job_id
        self.backend = backend
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.chunk_size = chunk_size
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.on_chunk = on_chunk
        self.should_stop = should_stop
        self.builder = WorkBuilder(store.job(job_id).spec, backend)
        self.stats = RunStats()

    def run(self) -> RunStats:
        """Work until no record of the job is left (waiting for other workers' chunks, which come back to
        the pool if their leases expire), or `should_stop` says so."""
        start = time.monotonic()
        with self.store.worker_lock():
            while not (self.should_stop and self.should_stop()):
                records = self.store.claim(self.job_id, self.worker_id, self.chunk_size, self.lease_s)
                if not records:
                    if self.store.finish_if_done(self.job_id):
                        break
                    time.sleep(self.poll_s)  # others hold the rest: wait for them, or their leases
                    continue
                self._fault("claimed")
                results = self.execute(records)
                self._fault("generated")
                written = self.store.complete(self.job_id, self.worker_id, results)
                self._fault("committed")
                self._count(results, written)
                self.stats.seconds = time.monotonic() - start
                if self.on_chunk is not None:
                    self.on_chunk(self.stats)
        self.stats.seconds = time.monotonic() - start
        return self.stats

    def execute(self, records: list[ClaimedRecord]) -> list[RecordResult]:
        """The results of a chunk: all its requests go to the engine in one batch."""
        works = [self.builder.build(record) for record in records]
        runnable = [work for work in works if work.failure is None]
        prompts = [prompt for work in runnable for prompt in work.prompts]
        params = [p for work in runnable for p in work.params]
        outputs = iter(self.backend.generate(prompts, params))
        embed_inputs = [ids for work in runnable for ids in work.embed_inputs]
        vectors = iter(self.backend.embed(embed_inputs).tolist() if embed_inputs else [])
        results = []
        for work in works:
            if work.failure is not None:
                results.append(work.failure)
                continue
            mine = [next(outputs) for _ in work.prompts]
            mine_vectors = [next(vectors) for _ in work.embed_inputs]
            results.append(_finish(work, mine, mine_vectors))
        return results

    def _count(self, results: list[RecordResult], written: int) -> None:
        self.stats.num_chunks += 1
        if written != len(results):  # another worker took over an expired lease; it writes those
            return
        for result in results:
            self.stats.num_failed += result.failed
            self.stats.num_done += not result.failed
            self.stats.num_prompt_tokens += result.num_prompt_tokens
            self.stats.num_output_tokens += result.num_output_tokens

    def _fault(self, point: str) -> None:
        fault = os.environ.get(FAULT_ENV)
        if fault and fault == f"{point}:{self.stats.num_chunks + 1}":
            os.kill(os.getpid(), signal.SIGKILL)


def _finish(work: RecordWork, outputs: list, vectors: list) -> RecordResult:
    errors = [out.error for out in outputs if out.error is not None]
    if errors:
        return failure(work.record, errors[0])
    try:
        return work.finish(vectors if work.embed_inputs else outputs)
    except KilnError as error:
        return failure(work.record, str(error))
