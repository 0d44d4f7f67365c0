"""ServerState: what every route shares: the engine, the served model's name and limits, admission
control (a bounded queue of sequences), tokenization off the event loop, metrics, and whether the server
is draining for shutdown."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from kiln.engine.async_engine import AsyncEngine, EngineFailed, RequestFailed, StreamOverflow
from kiln.engine.outputs import RequestOutput
from kiln.engine.sampling_params import SamplingParams
from kiln.errors import KilnError
from kiln.server.config import ServerConfig
from kiln.server.errors import APIError
from kiln.server.metrics import ServerMetrics
from kiln.tokenizer import Tokenizer

T = TypeVar("T")

# Inputs with at least this many characters (or token ids) are tokenized in a worker thread rather than
# on the event loop: a 4 MB prompt takes seconds to encode, during which /health and every stream would
# stall; a short one takes microseconds, less than the hand-off costs.
OFFLOAD_MIN_SIZE = 16_384
# After the drain deadline, how long aborted streams get to deliver their "abort" chunk and [DONE].
ABORT_GRACE_S = 0.3


class Lease:
    """Admission of some sequences; `release` (idempotent) gives their places back."""

    def __init__(self, state: ServerState, num_seqs: int) -> None:
        self._state, self._num_seqs = state, num_seqs

    def release(self) -> None:
        self._state.num_in_flight -= self._num_seqs
        self._num_seqs = 0


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
        # Sequences (prompts x n) the engine runs at once, plus those allowed to wait for a place.
        self.max_in_flight = self.engine.config.max_num_seqs + config.max_queue
        self.num_in_flight = 0
        # One request's prompts together may hold at most what the KV cache holds: more could never be
        # resident at once, and would only crowd out everyone else for its whole run.
        self.max_request_prompt_tokens = self.engine.kv_capacity_tokens
        # Two workers: huge inputs queue behind each other instead of taking every core from the engine.
        self._tokenize_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kiln-tokenize")
        self.active_request_ids: set[str] = set()  # engine requests now streaming
        self.draining = False  # set on SIGTERM: finish what runs, admit nothing new
        self.created = int(time.time())

    # ---------------------------------------------------------------------------------- validation

    @property
    def adapter_names(self) -> list[str]:
        """The adapters served beside the base model (`kiln serve --adapter name=DIR`)."""
        return self.engine.adapters.names if self.engine.adapters is not None else []

    def check_model(self, name: str | None) -> str | None:
        """The adapter a request's `model` names, or None for the base model; an unknown name is a 404."""
        if name is None or name == self.model_name:
            return None
        if name in self.adapter_names:
            return name
        served = ", ".join(repr(n) for n in [self.model_name, *self.adapter_names])
        raise APIError(
            404,
            f"the model {name!r} does not exist; this server serves {served}",
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
            if isinstance(prompt, str):
                self.refuse_overlong_text(prompt, param)
                prompt = self.encode(prompt)
            return self.engine.prompt_token_ids(list(prompt))
        except KilnError as error:
            raise APIError(400, str(error), param=param) from error

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The tokenizer's ids of `text`. A long text goes through the batch encoder, which (unlike the
        single one) releases the GIL while it works, so that encoding it in a worker thread leaves the
        event loop running."""
        if len(text) < OFFLOAD_MIN_SIZE:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0]

    def chat_token_ids(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, **(template_kwargs or {})
            )
        except (KilnError, TypeError) as error:
            raise APIError(400, str(error), param="messages") from error
        # The template writes the special tokens itself.
        self.refuse_overlong_text(text, "messages")
        return self.prompt_token_ids(self.encode(text, add_special_tokens=False), param="messages")

    @functools.cached_property
    def max_chars_per_token(self) -> int | None:
        """The most characters one token can stand for (its vocabulary string's length, which is at least
        its text's), or None when a normalizer could shrink the text before tokenizing."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None or tokenizer.backend.normalizer is not None:
            return None
        return max(len(token) for token in tokenizer.backend.get_vocab(with_added_tokens=True))

    def refuse_overlong_text(self, text: str, param: str) -> None:
        """A text too long for the context whatever its tokens: refused at once, without tokenizing it (a
        3.9 MB prompt would take both cores of a small machine for half a second)."""
        per_token = self.max_chars_per_token
        if per_token is None or len(text) <= self.max_model_len * per_token:
            return
        at_least = -(-len(text) // per_token)
        raise APIError(
            400,
            f"this model's maximum context length is {self.max_model_len} tokens, but the {param} has at "
            f"least {at_least} ({len(text)} characters, at most {per_token} to a token); shorten the {param}",
            param=param,
            code="context_length_exceeded",
        )

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

    async def off_loop(self, size: int, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)`, in a tokenizer thread when the input is large (`size` characters or
        token ids), so tokenizing or rendering it never stalls the event loop."""
        if size < OFFLOAD_MIN_SIZE:
            return function(*args)
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, function, *args)

    # ----------------------------------------------------------------------------------- admission

    def check_request_size(self, num_seqs: int, param: str = "n") -> None:
        """Refuse (400) a request with more sequences than the server can ever hold at once; it would
        otherwise take every place and starve every other client."""
        if num_seqs > self.max_in_flight:
            raise APIError(
                400,
                f"this request asks for {num_seqs} sequences (prompts x n), more than this server admits at "
                f"once ({self.max_in_flight}: max_num_seqs + max_queue); send fewer prompts or a lower n",
                param=param,
                code="request_too_large",
            )

    def check_prompt_tokens(self, num_tokens: int, param: str = "prompt") -> None:
        """Refuse (400) a request whose prompts hold more tokens in total than the KV cache."""
        if num_tokens > self.max_request_prompt_tokens:
            raise APIError(
                400,
                f"this request's prompts hold {num_tokens} tokens in total, more than the KV cache's "
                f"{self.max_request_prompt_tokens}; split it into smaller requests",
                param=param,
                code="request_too_large",
            )

    def admit(self, num_seqs: int) -> Lease:
        """Take places for `num_seqs` sequences, or answer 503 at once when there is no room."""
        if self.draining:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if not self.async_engine.is_running:
            error = self.async_engine.error
            message = "the engine has stopped; restart the server"
            if error is not None:
                message = f"the engine failed ({error!r}); the server is exiting to be restarted"
            raise APIError(503, message, type="server_error", code="engine_failed")
        self.check_request_size(num_seqs)
        if self.num_in_flight + num_seqs > self.max_in_flight:
            self.metrics.requests_rejected.inc()
            raise APIError(
                503,
                f"the server is at capacity ({self.num_in_flight} sequences running or queued); retry later",
                type="server_error",
                code="server_overloaded",
                headers={"Retry-After": str(self.config.retry_after_s)},
            )
        self.num_in_flight += num_seqs
        return Lease(self, num_seqs)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, *, stream: bool = False
    ) -> AsyncIterator[RequestOutput]:
        """The engine's deltas for one prompt, observed for metrics. Closing it early aborts the request.
        A streamed one whose reader falls max_stream_buffer outputs behind is aborted (back-pressure).
        Engine failures come out as APIErrors naming the request id."""
        tracker = self.metrics.track(len(prompt_ids))
        max_buffered = self.config.max_stream_buffer if stream else None
        outputs = self.async_engine.add_request(prompt_ids, params, request_id, max_buffered=max_buffered)
        self.active_request_ids.add(request_id)
        try:
            async for output in outputs:
                tracker.observe(output)
                yield output
        except (RequestFailed, EngineFailed, StreamOverflow) as error:
            raise engine_api_error(error, request_id) from error
        finally:
            self.active_request_ids.discard(request_id)
            await outputs.aclose()  # aborts the request if it has not finished
            tracker.close()

    async def drain(
        self,
        timeout_s: float,
        is_busy: Callable[[], bool] | None = None,
        is_delivering: Callable[[], bool] | None = None,
    ) -> None:
        """Wait up to `timeout_s` for in-flight requests (and, per `is_busy`, responses still being
        sent) to finish, then abort the rest: their streams end with finish_reason "abort" and [DONE].
        Then wait up to ABORT_GRACE_S while `is_delivering` (default: requests are in flight), so that
        clients still reading get that ending; the server passes "a response under way whose client
        takes its bytes", so one that stopped reading costs no grace."""
        is_busy = is_busy or (lambda: False)
        is_delivering = is_delivering or (lambda: bool(self.num_in_flight))
        deadline = time.monotonic() + timeout_s
        while (self.num_in_flight or is_busy()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for request_id in list(self.active_request_ids):
            self.async_engine.abort(request_id)
        grace_end = time.monotonic() + ABORT_GRACE_S
        while is_delivering() and time.monotonic() < grace_end:
            await asyncio.sleep(0.02)


def input_size(value: Any) -> int:
    """Characters (and token ids) in a request's input, nested lists and mappings included."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, Mapping):
        return sum(input_size(item) for item in value.values())
    if isinstance(value, list | tuple):
        return (
            sum(input_size(item) for item in value) if value and not isinstance(value[0], int) else len(value)
        )
    return 0


def engine_api_error(error: RequestFailed | EngineFailed | StreamOverflow, request_id: str) -> APIError:
    """The answer to a request the engine failed: 400 when its input was the cause, else a 500 whose
    message carries the request id (to find it in the server's log)."""
    if isinstance(error, RequestFailed) and error.from_input:
        return APIError(400, error.message, code="invalid_request")
    if isinstance(error, StreamOverflow):
        return APIError(400, str(error), code="stream_overflow")
    message = error.message if isinstance(error, RequestFailed) else str(error)
    return APIError(500, f"{message} (request id {request_id})", type="server_error", code="internal_error")
