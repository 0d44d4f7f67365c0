"""The server's batch worker: a thread that runs the job store's OpenAI batch jobs through the server's
running AsyncEngine (so batches share the engine with live traffic), one job at a time."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import torch

from kiln.batch.backend import Backend
from kiln.batch.runner import BatchRunner
from kiln.batch.store import JobStore
from kiln.engine.async_engine import AsyncEngine, RequestFailed
from kiln.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from kiln.engine.sampling_params import SamplingParams


class AsyncEngineBackend(Backend):
    """Submits a chunk's requests to the AsyncEngine on the server's event loop and waits for them all."""

    def __init__(self, engine: AsyncEngine, model_name: str, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(engine.engine, model_name)
        self.async_engine = engine
        self.loop = loop

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
        if not prompts:
            return []

        async def run_all() -> list[RequestOutput]:
            return list(
                await asyncio.gather(*(self._one(p, sp) for p, sp in zip(prompts, params, strict=True)))
            )

        return asyncio.run_coroutine_threadsafe(run_all(), self.loop).result()

    def embed(self, prompts: list[list[int]]) -> torch.Tensor:
        return asyncio.run_coroutine_threadsafe(self.async_engine.embed(list(prompts)), self.loop).result()

    async def _one(self, prompt: Sequence[int], params: SamplingParams) -> RequestOutput:
        """The whole output of one request, from its stream of deltas."""
        samples: dict[int, CompletionOutput] = {}
        last = None
        try:
            async for delta in self.async_engine.add_request(list(prompt), params):
                last = delta
                for part in delta.outputs:
                    sample = samples.setdefault(
                        part.index, CompletionOutput(index=part.index, text="", token_ids=[])
                    )
                    sample.text += part.text
                    sample.token_ids += part.token_ids
                    sample.finish_reason = part.finish_reason or sample.finish_reason
        except RequestFailed as error:
            return _failed(prompt, str(error))
        assert last is not None
        return RequestOutput(
            request_id=last.request_id,
            prompt=None,
            prompt_token_ids=list(prompt),
            outputs=[samples[index] for index in sorted(samples)],
            finished=True,
            metrics=last.metrics,
        )


def _failed(prompt: Sequence[int], reason: str) -> RequestOutput:
    return RequestOutput(
        request_id="failed",
        prompt=None,
        prompt_token_ids=list(prompt),
        outputs=[],
        finished=True,
        metrics=RequestMetrics(arrival_time=0.0),
        error=reason,
    )


class BatchWorker:
    """Polls the job store for unfinished OpenAI batch jobs and runs them until `stop`."""

    def __init__(self, db_url: str, backend: Backend, poll_s: float = 0.2, chunk_size: int = 64) -> None:
        self.db_url = db_url
        self.backend = backend
        self.poll_s = poll_s
        self.chunk_size = chunk_size
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kiln-batch-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        store = JobStore(self.db_url)
        try:
            while not self._stop.is_set():
                pending = [
                    job for job in store.jobs() if job.status == "in_progress" and job.spec.kind == "openai"
                ]
                if not pending:
                    self._stop.wait(self.poll_s)
                    continue
                runner = BatchRunner(
                    store,
                    pending[0].job_id,
                    self.backend,
                    chunk_size=self.chunk_size,
                    poll_s=self.poll_s,
                    should_stop=self._stop.is_set,
                )
                runner.run()
        except BaseException as error:  # the server keeps serving; /v1/batches reports jobs stuck
            self.error = error
            raise
        finally:
            store.close()
