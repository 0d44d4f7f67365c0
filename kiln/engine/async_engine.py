"""AsyncEngine: the engine for asyncio code (the server). Many coroutines add requests concurrently and
each streams its own deltas; the engine loop runs in one background thread, so a forward pass never
blocks the event loop.

Faults: a request the engine fails on its own (finish_reason "error") ends that stream with
`RequestFailed` and the loop goes on. An exception out of `Engine.step` means shared state (the model
forward, the KV pool) may be corrupt: the loop stops, every stream ends with `EngineFailed`, and
`on_fatal` is called (the server exits non-zero on it, so a supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kiln.engine.config import EngineConfig
from kiln.engine.engine import Engine
from kiln.engine.llm import embed_token_ids
from kiln.engine.outputs import RequestOutput
from kiln.engine.request_factory import Prompt
from kiln.engine.sampling_params import SamplingParams
from kiln.engine.sequence import EngineRequest
from kiln.errors import KilnError

logger = logging.getLogger(__name__)

_STOP = object()
# While generation runs, embedding chunks get at most this much engine time per second of steps, so a
# huge embedding request stretches streams' step times by at most ~(1 + share)x, plus one chunk (kiln
# bench fairness; BENCHMARKS.md).
EMBED_TIME_SHARE = 0.5
# Padded tokens per embedding chunk (at most; max_num_batched_tokens if lower): the unit of that sharing.
EMBED_CHUNK_TOKENS = 256


class RequestFailed(KilnError):
    """The engine failed this one request and went on serving the others."""

    def __init__(self, request_id: str, message: str, from_input: bool) -> None:
        super().__init__(message)
        self.request_id, self.message, self.from_input = request_id, message, from_input


class EngineFailed(KilnError):
    """The engine loop stopped after a fault in shared state; nothing more can run until a restart."""


class StreamOverflow(KilnError):
    """A stream's reader fell `max_buffered` outputs behind, so its request was aborted."""


class _Sink:
    """One stream's queue, living in the stream's event loop. With `max_buffered`, an output that finds
    that many undelivered ones aborts the request and ends the stream with StreamOverflow: a reader that
    stopped reading costs bounded memory and no more generation."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, abort: Callable[[], None], max_buffered: int | None
    ) -> None:
        self.loop, self.abort, self.max_buffered = loop, abort, max_buffered
        self.queue: asyncio.Queue = asyncio.Queue()
        self.overflowed = False

    def put(self, item: RequestOutput | BaseException) -> None:
        """Hand `item` over from any thread."""
        try:
            self.loop.call_soon_threadsafe(self._offer, item)
        except RuntimeError:  # that event loop has closed; nobody is listening
            pass

    def _offer(self, item: RequestOutput | BaseException) -> None:  # in the event loop
        if self.overflowed:
            return
        final = isinstance(item, BaseException) or item.finished
        if not final and self.max_buffered is not None and self.queue.qsize() >= self.max_buffered:
            self.overflowed = True
            self.abort()
            item = StreamOverflow(
                f"the client read too slowly: {self.max_buffered} outputs were waiting for it, so the "
                "request was aborted; read the stream as it arrives"
            )
        self.queue.put_nowait(item)


@dataclass(kw_only=True, slots=True)
class _EmbedJob:
    """An embedding request run a chunk at a time between engine steps."""

    ids: list[list[int]]
    chunks: deque[list[int]]  # input indices per chunk, each under the token budget
    out: torch.Tensor  # (len(ids), hidden) fp32
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    cancelled: bool = field(default=False)


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Commands from the event loop(s) to the engine thread: ("add", request, sink), ("abort",
        # request_id), ("embed", job) or _STOP. Only the engine thread touches the engine, `_sinks`
        # and `_embed_jobs`.
        self._commands: queue.Queue = queue.Queue()
        self._sinks: dict[str, _Sink] = {}
        self._embed_jobs: deque[_EmbedJob] = deque()
        # Engine-thread seconds spent on steps and on embedding chunks while both have work (fair share).
        self._step_seconds = self._embed_seconds = 0.0
        self._error: BaseException | None = None
        # Called (in the engine thread) with the fault that stopped the loop.
        self.on_fatal: Callable[[BaseException], None] | None = None
        self._thread = threading.Thread(target=self._run, name="kiln-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_dir(
        cls,
        model_dir: str | Path,
        config: EngineConfig | None = None,
        adapters: Mapping[str, str | Path] | None = None,
        **overrides: Any,
    ) -> AsyncEngine:
        """`Engine.from_dir` (`overrides` are EngineConfig fields), run in a background thread."""
        return cls(Engine.from_dir(model_dir, config, adapters, **overrides))

    async def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        max_buffered: int | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Generate for `prompt`, yielding deltas (new text, tokens, logprobs) until the request finishes.

        Leaving the iteration early (break, cancellation, a closed connection) aborts the request. A
        request the engine fails raises RequestFailed; with `max_buffered`, a reader that falls that many
        outputs behind gets StreamOverflow (and the request is aborted).
        """
        self._check_alive()
        request: EngineRequest = self.engine.make_request(prompt, params, request_id)  # errors raise here
        sink = _Sink(asyncio.get_running_loop(), lambda: self.abort(request.request_id), max_buffered)
        self._commands.put(("add", request, sink))
        finished = False
        try:
            while not finished:
                item = await sink.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                if item.error is not None:
                    raise RequestFailed(item.request_id, item.error, item.error_from_input)
                yield item
        finally:
            if not finished:
                self.abort(request.request_id)

    generate = add_request

    def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with a final output whose finish_reason is "abort"."""
        self._commands.put(("abort", request_id))

    async def embed(self, prompts: list[Prompt], token_budget: int | None = None) -> torch.Tensor:
        """`LLM.embed` for asyncio code; (len(prompts), hidden) fp32. Runs in the engine thread (which
        owns the device) in chunks of at most `token_budget` padded tokens (default EMBED_CHUNK_TOKENS, or
        max_num_batched_tokens if lower), between engine steps; while requests generate, embeddings get
        at most EMBED_TIME_SHARE of the engine's time, so a large request slows streams a bounded amount
        rather than stalling them."""
        self._check_alive()
        ids = [self.engine.prompt_token_ids(prompt) for prompt in prompts]  # errors raise here
        budget = token_budget or min(EMBED_CHUNK_TOKENS, self.engine.config.max_num_batched_tokens)
        loop = asyncio.get_running_loop()
        job = _EmbedJob(
            ids=ids,
            chunks=deque(embedding_chunks([len(tokens) for tokens in ids], budget)),
            out=torch.empty(len(ids), self.engine.model.config.hidden_size),
            loop=loop,
            future=loop.create_future(),
        )
        self._commands.put(("embed", job))
        try:
            return await job.future
        finally:
            job.cancelled = True  # a caller that stopped waiting: the engine thread skips what is left

    async def shutdown(self) -> None:
        """Abort what is in flight (streams end with "abort") and stop the engine thread."""
        if self._thread.is_alive():
            self._commands.put(_STOP)
            await asyncio.to_thread(self._thread.join)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    @property
    def error(self) -> BaseException | None:
        """The fault that stopped the engine loop, if one did."""
        return self._error

    def _check_alive(self) -> None:
        if self._error is not None:
            raise EngineFailed(f"the engine stopped after an error ({self._error!r}); restart it")
        if not self._thread.is_alive():
            raise KilnError("the engine has been shut down; create a new AsyncEngine")

    # ---------------------------------------------------------------------------------- engine thread

    def _run(self) -> None:
        try:
            while self._take_commands(wait=not (self.engine.has_unfinished_requests() or self._embed_jobs)):
                generating = self.engine.has_unfinished_requests()
                if generating:
                    started = time.perf_counter()
                    for output in self.engine.step():
                        self._deliver(output.request_id, output)
                    self._step_seconds += time.perf_counter() - started
                if not (generating and self._embed_jobs):
                    self._step_seconds = self._embed_seconds = 0.0  # no one to share with: no debt
                if self._embed_jobs and self._embed_seconds <= EMBED_TIME_SHARE * self._step_seconds:
                    started = time.perf_counter()
                    self._embed_next_chunk()
                    self._embed_seconds += time.perf_counter() - started
            for request_id in list(self._sinks):
                self.engine.abort_request(request_id)
            for output in self.engine.step():
                self._deliver(output.request_id, output)
            for job in self._embed_jobs:
                _settle(job, error=KilnError("the engine was shut down"))
        except BaseException as error:  # shared state may be corrupt: stop, and end every stream
            self._fail(error)

    def _fail(self, error: BaseException) -> None:
        self._error = error
        logger.error("the engine loop stopped", exc_info=error)
        failure = EngineFailed(f"the engine failed ({error!r}); the server must be restarted")
        for request_id in list(self._sinks):
            self._deliver(request_id, failure)
        for job in self._embed_jobs:
            _settle(job, error=failure)
        if self.on_fatal is not None:
            self.on_fatal(error)

    def _take_commands(self, wait: bool) -> bool:
        """Apply queued commands (waiting for one if `wait`); False once asked to stop."""
        while True:
            try:
                command = self._commands.get(block=wait)
            except queue.Empty:
                return True
            wait = False
            if command is _STOP:
                return False
            if command[0] == "abort":
                self.engine.abort_request(command[1])
            elif command[0] == "embed":
                self._embed_jobs.append(command[1])
            else:
                self._add(*command[1:])

    def _add(self, request: EngineRequest, sink: _Sink) -> None:
        try:
            self.engine.add_request(request)
        except KilnError as error:  # a request id already in use
            sink.put(error)
            return
        self._sinks[request.request_id] = sink

    def _embed_next_chunk(self) -> None:
        """Run one chunk of the oldest embedding job, then move that job to the back (round robin)."""
        while self._embed_jobs and self._embed_jobs[0].cancelled:
            self._embed_jobs.popleft()
        if not self._embed_jobs:
            return
        job = self._embed_jobs.popleft()
        members = job.chunks.popleft()
        try:  # embeddings touch no KV blocks, so a failure here is this request's alone
            vectors = embed_token_ids(self.engine.model, [job.ids[i] for i in members], len(members))
        except Exception as error:
            _settle(job, error=error)
            return
        job.out[members] = vectors
        if job.chunks:
            self._embed_jobs.append(job)
        else:
            _settle(job, result=job.out)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        sink = self._sinks.get(request_id)
        if sink is None:
            return
        if isinstance(item, BaseException) or item.finished:
            del self._sinks[request_id]
        sink.put(item)


def embedding_chunks(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Input indices grouped into chunks of similar lengths whose padded size (rows x longest) stays
    within `token_budget`; an input longer than the budget is a chunk of its own."""
    chunks: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        # Sorted ascending, so the newcomer is the chunk's longest.
        if current and (len(current) + 1) * lengths[index] > token_budget:
            chunks.append(current)
            current = []
        current.append(index)
    if current:
        chunks.append(current)
    return chunks


def _settle(job: _EmbedJob, result: torch.Tensor | None = None, error: BaseException | None = None) -> None:
    """Settle an embedding job's future in its event loop (from the engine thread)."""

    def settle() -> None:
        if job.future.done():  # the caller stopped waiting
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # that event loop has closed
        pass
