"""ServerState: what every route shares: the engine, the served model's name and limits, admission
control (a bounded queue), metrics, and whether the server is draining for shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from kiln.engine.async_engine import AsyncEngine
from kiln.engine.outputs import RequestOutput
from kiln.engine.sampling_params import SamplingParams
from kiln.errors import KilnError
from kiln.server.config import ServerConfig
from kiln.server.errors import APIError
from kiln.server.metrics import ServerMetrics
from kiln.tokenizer import Tokenizer


class Lease:
    """Admission of some requests; `release` (idempotent) gives their places back."""

    def __init__(self, state: ServerState, num_requests: int) -> None:
        self._state, self._num_requests = state, num_requests

    def release(self) -> None:
        self._state.num_in_flight -= self._num_requests
        self._num_requests = 0


class ServerState:
    def __init__(
        self, engine: AsyncEngine, config: ServerConfig, model_dir: str | Path | None = None
    ) -> None:
        self.async_engine = engine
        self.engine = engine.engine
        self.config = config
        self.model_dir = str(model_dir) if model_dir is not None else None
        self.model_name = config.served_model_name or (Path(model_dir).name if model_dir else "kiln")
        self.max_model_len = self.engine.max_model_len
        self.metrics = ServerMetrics(self.engine, self.model_name)
        # Requests the engine runs at once, plus those allowed to wait for a place.
        self.max_in_flight = self.engine.config.max_num_seqs + config.max_queue
        self.num_in_flight = 0
        self.active_request_ids: set[str] = set()  # engine requests now streaming
        self.draining = False  # set on SIGTERM: finish what runs, admit nothing new
        self.created = int(time.time())

    # ---------------------------------------------------------------------------------- validation

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    @property
    def tokenizer(self) -> Tokenizer:
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer.json, so it takes token-id prompts only")
        return tokenizer

    def prompt_token_ids(self, prompt: str | Sequence[int], param: str = "prompt") -> list[int]:
        try:
            return self.engine.prompt_token_ids(prompt if isinstance(prompt, str) else list(prompt))
        except KilnError as error:
            raise APIError(400, str(error), param=param) from error

    def chat_token_ids(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        try:
            ids = self.tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=add_generation_prompt,
                tokenize=True,
                **(template_kwargs or {}),
            )
        except (KilnError, TypeError) as error:
            raise APIError(400, str(error), param="messages") from error
        return self.prompt_token_ids(ids, param="messages")

    def resolve_max_tokens(self, num_prompt_tokens: int, requested: int | None, param: str = "prompt") -> int:
        """The tokens a request may generate: `requested`, or (None) what the context has room for. A
        request that cannot fit gets OpenAI's context_length_exceeded error, not a silent cut."""
        room = self.max_model_len - num_prompt_tokens
        if requested is None and room >= 1:
            return room
        if requested is not None and requested <= room:
            return requested
        wanted = f"{num_prompt_tokens + requested} tokens" if requested else f"{num_prompt_tokens} tokens"
        completion = f", {requested} for the completion" if requested else " and at least 1 to generate"
        raise APIError(
            400,
            f"this model's maximum context length is {self.max_model_len} tokens, but you requested "
            f"{wanted} ({num_prompt_tokens} in the {param}{completion}); shorten the {param} or "
            "lower max_tokens",
            param=param,
            code="context_length_exceeded",
        )

    # ----------------------------------------------------------------------------------- admission

    def admit(self, num_requests: int) -> Lease:
        """Take places for `num_requests` engine requests, or answer 503 at once when there is no room."""
        retry = {"Retry-After": str(self.config.retry_after_s)}
        if self.draining:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if not self.async_engine.is_running:
            raise APIError(503, "the engine has stopped; restart the server", type="server_error")
        if self.num_in_flight + num_requests > max(self.max_in_flight, num_requests):
            self.metrics.requests_rejected.inc()
            raise APIError(
                503,
                f"the server is at capacity ({self.num_in_flight} requests running or queued); retry later",
                type="server_error",
                code="server_overloaded",
                headers=retry,
            )
        self.num_in_flight += num_requests
        return Lease(self, num_requests)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """The engine's deltas for one prompt, observed for metrics. Closing it early aborts the request."""
        tracker = self.metrics.track(len(prompt_ids))
        stream = self.async_engine.add_request(prompt_ids, params, request_id)
        self.active_request_ids.add(request_id)
        try:
            async for output in stream:
                tracker.observe(output)
                yield output
        finally:
            self.active_request_ids.discard(request_id)
            await stream.aclose()  # aborts the request if it has not finished
            tracker.close()

    async def drain(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for in-flight requests to finish, then abort the rest: their streams
        end properly, with finish_reason "abort" and [DONE]."""
        deadline = time.monotonic() + timeout_s
        while self.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for request_id in list(self.active_request_ids):
            self.async_engine.abort(request_id)
        while self.num_in_flight and time.monotonic() < deadline + 5:  # the aborts reach the clients
            await asyncio.sleep(0.05)
