"""AsyncEngine: the engine for asyncio code (the server). Many coroutines add requests concurrently and
each streams its own deltas; the engine loop runs in one background thread, so a forward pass never
blocks the event loop."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable
from functools import partial
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

_STOP = object()


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Commands from the event loop(s) to the engine thread: ("add", request, loop, sink),
        # ("abort", request_id), ("call", function, loop, future) or _STOP. Only the engine thread
        # touches the engine and `_sinks`.
        self._commands: queue.Queue = queue.Queue()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kiln-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_dir(
        cls, model_dir: str | Path, config: EngineConfig | None = None, **overrides: Any
    ) -> AsyncEngine:
        """`Engine.from_dir` (`overrides` are EngineConfig fields), run in a background thread."""
        return cls(Engine.from_dir(model_dir, config, **overrides))

    async def add_request(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Generate for `prompt`, yielding deltas (new text, tokens, logprobs) until the request finishes.

        Leaving the iteration early (break, cancellation, a closed connection) aborts the request.
        """
        self._check_alive()
        request: EngineRequest = self.engine.make_request(prompt, params, request_id)  # errors raise here
        sink: asyncio.Queue = asyncio.Queue()
        self._commands.put(("add", request, asyncio.get_running_loop(), sink))
        finished = False
        try:
            while not finished:
                item = await sink.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request.request_id)

    generate = add_request

    def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with a final output whose finish_reason is "abort"."""
        self._commands.put(("abort", request_id))

    async def embed(self, prompts: list[Prompt], batch_size: int = 32) -> torch.Tensor:
        """`LLM.embed` for asyncio code; (len(prompts), hidden) fp32. Runs in the engine thread between
        steps, so it never races a step for the device."""
        self._check_alive()
        ids = [self.engine.prompt_token_ids(prompt) for prompt in prompts]  # errors raise here
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        work = partial(embed_token_ids, self.engine.model, ids, batch_size)
        self._commands.put(("call", work, loop, future))
        return await future

    async def shutdown(self) -> None:
        """Abort what is in flight (streams end with "abort") and stop the engine thread."""
        if self._thread.is_alive():
            self._commands.put(_STOP)
            await asyncio.to_thread(self._thread.join)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    def _check_alive(self) -> None:
        if self._error is not None:
            raise KilnError(f"the engine stopped after an error ({self._error!r}); restart it")
        if not self._thread.is_alive():
            raise KilnError("the engine has been shut down; create a new AsyncEngine")

    # ---------------------------------------------------------------------------------- engine thread

    def _run(self) -> None:
        try:
            while self._take_commands(wait=not self.engine.has_unfinished_requests()):
                for output in self.engine.step():
                    self._deliver(output.request_id, output)
            for request_id in list(self._sinks):
                self.engine.abort_request(request_id)
            for output in self.engine.step():
                self._deliver(output.request_id, output)
        except BaseException as error:  # deliver it to every stream rather than hang them
            self._error = error
            for request_id in list(self._sinks):
                self._deliver(request_id, error)

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
                continue
            if command[0] == "call":
                _call(*command[1:])
                continue
            _, request, loop, sink = command
            try:
                self.engine.add_request(request)
            except KilnError as error:  # a request id already in use
                _put(loop, sink, error)
                continue
            self._sinks[request.request_id] = (loop, sink)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        sink = self._sinks.get(request_id)
        if sink is None:
            return
        if isinstance(item, BaseException) or item.finished:
            del self._sinks[request_id]
        _put(*sink, item)


def _put(loop: asyncio.AbstractEventLoop, sink: asyncio.Queue, item: RequestOutput | BaseException) -> None:
    try:
        loop.call_soon_threadsafe(sink.put_nowait, item)
    except RuntimeError:  # that event loop has closed; nobody is listening
        pass


def _call(function: Callable[[], Any], loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
    """Run `function` here (the engine thread) and settle `future` in its event loop."""
    try:
        result, error = function(), None
    except Exception as exception:  # handed to the caller, like a request's errors
        result, error = None, exception

    def settle() -> None:
        if future.done():  # the caller stopped waiting
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # that event loop has closed
        pass
