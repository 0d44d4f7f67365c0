"""The FastAPI app (routes) and `serve`, which loads a model and runs it behind uvicorn until SIGTERM.

Routes: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings, /v1/files and /v1/batches (with
a batch job store, ServerConfig.batch_db), /tokenize, /detokenize, /health,
/metrics, the web UI at /, and the schema at /openapi.json (Swagger UI at /docs, served offline). On SIGTERM
the server stops accepting connections, lets in-flight requests finish (up to ServerConfig.drain_timeout_s,
then aborts them), stops the engine and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles

from kiln.batch.store import JobStore
from kiln.engine.async_engine import AsyncEngine
from kiln.engine.config import EngineConfig
from kiln.server.batch_worker import AsyncEngineBackend, BatchWorker
from kiln.server.batches import add_batch_routes
from kiln.server.chat import create_chat_completion
from kiln.server.completions import create_completion
from kiln.server.config import ServerConfig
from kiln.server.embeddings import create_embedding
from kiln.server.errors import APIError, install_error_handlers
from kiln.server.metrics import CONTENT_TYPE
from kiln.server.middleware import RequestGuard
from kiln.server.openapi import HEALTH_RESPONSES, METRICS_RESPONSES, install_docs, install_openapi, responses
from kiln.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from kiln.server.state import ServerState

STATIC_DIR = Path(__file__).parent / "static"
# The error statuses each kind of route answers (documented in /openapi.json).
GENERATION_ERRORS = (400, 401, 404, 413, 503)
TOKENIZER_ERRORS = (400, 401, 404, 413)


def build_app(state: ServerState) -> FastAPI:
    """The HTTP app around a running engine; its lifespan shuts the engine down."""

    batch_db = state.config.batch_db

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker = None
        if batch_db is not None:
            backend = AsyncEngineBackend(state.async_engine, state.model_name, asyncio.get_running_loop())
            worker = BatchWorker(batch_db, backend)
            worker.start()
        yield
        if worker is not None:  # its chunk in flight finishes (or is rerun later: its lease lapses)
            await asyncio.to_thread(worker.stop, state.config.drain_timeout_s)
        await state.async_engine.shutdown()

    app = FastAPI(title="kiln", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.kiln = state
    install_error_handlers(app)
    install_openapi(app, api_key_required=state.config.api_key is not None)
    install_docs(app)
    app.add_middleware(RequestGuard, api_key=state.config.api_key, max_body_bytes=state.config.max_body_bytes)
    _add_api_routes(app, state)
    _add_service_routes(app, state)
    if batch_db is not None:
        add_batch_routes(app, JobStore(batch_db), state.model_name)
    return app


def _add_api_routes(app: FastAPI, state: ServerState) -> None:
    def model_card(adapter: str | None = None) -> ModelCard:
        if adapter is not None:
            root = state.engine.adapters.sources[adapter]
            return ModelCard(
                id=adapter,
                created=state.created,
                root=root,
                parent=state.model_name,
                max_model_len=state.max_model_len,
            )
        return ModelCard(
            id=state.model_name,
            created=state.created,
            root=state.model_dir,
            max_model_len=state.max_model_len,
        )

    @app.get("/v1/models", responses=responses(401))
    async def list_models() -> ModelList:
        return ModelList(data=[model_card(), *(model_card(name) for name in state.adapter_names)])

    @app.get("/v1/models/{model:path}", responses=responses(401, 404))
    async def get_model(model: str) -> ModelCard:
        return model_card(state.check_model(model))

    @app.post("/v1/completions", responses=responses(*GENERATION_ERRORS, ok=CompletionResponse, stream=True))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(body, request, state)

    @app.post(
        "/v1/chat/completions",
        responses=responses(*GENERATION_ERRORS, ok=ChatCompletionResponse, stream=True),
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(body, request, state)

    @app.post("/v1/embeddings", responses=responses(*GENERATION_ERRORS))
    async def embeddings(body: EmbeddingRequest) -> EmbeddingResponse:
        return await create_embedding(body, state)

    @app.post("/tokenize", responses=responses(*TOKENIZER_ERRORS))
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        state.check_model(body.model)
        if body.messages is not None:
            messages = [message.template_message() for message in body.messages]
            tokens = state.chat_token_ids(messages, body.add_generation_prompt)
        else:
            tokens = state.tokenizer.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(count=len(tokens), max_model_len=state.max_model_len, tokens=tokens)

    @app.post("/detokenize", responses=responses(*TOKENIZER_ERRORS))
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        state.check_model(body.model)
        vocab_size = state.engine.model.config.vocab_size
        if any(token >= vocab_size for token in body.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab_size})", param="tokens")
        return DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens))


def _add_service_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health", responses=HEALTH_RESPONSES)
    async def health() -> JSONResponse:
        if state.draining or not state.async_engine.is_running:
            reason = "draining" if state.draining else "engine stopped"
            return JSONResponse({"status": reason}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=PlainTextResponse, responses=METRICS_RESPONSES)
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    async def web_ui() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


# ------------------------------------------------------------------------------------------------ serve


class _Server(uvicorn.Server):
    """uvicorn, with SIGTERM/SIGINT marking the state as draining, a drained shutdown exiting 0 within the
    drain timeout whatever clients do, and an engine failure shutting the server down with exit code 1.

    (uvicorn re-raises the signal after a graceful shutdown, which would kill the process with it.)
    """

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.kiln_state = state
        self.exit_code = 0

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()

        def on_fatal(_: BaseException) -> None:  # in the engine thread
            with contextlib.suppress(RuntimeError):  # the loop has closed: we are exiting anyway
                loop.call_soon_threadsafe(self.engine_failed)

        self.kiln_state.async_engine.on_fatal = on_fatal
        if self.kiln_state.async_engine.error is not None:  # it failed before we listened
            self.engine_failed()
        await super().startup(sockets)

    def engine_failed(self) -> None:
        """Shut down and exit 1, so a supervisor restarts the server instead of it answering 503 forever.
        (/health answers 503 until the listening socket closes.)"""
        error = self.kiln_state.async_engine.error
        print(f"kiln: the engine failed ({error!r}); shutting down with exit code 1", file=sys.stderr)
        self.exit_code = 1
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.kiln_state.draining = True
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:  # stop accepting connections first (uvicorn does it again, harmlessly)
            server.close()
        if not self.force_exit:
            state = self.kiln_state
            await state.drain(
                state.config.drain_timeout_s,
                is_busy=lambda: bool(self._busy_connections()),
                is_delivering=lambda: any(not self._stalled(c) for c in self._busy_connections()),
            )
            # What is still sending now has a client that stopped reading: cut it off, so that neither
            # its handler nor uvicorn's own shutdown waits on it (and no task needs cancelling).
            for connection in self._stalled_connections():
                connection.transport.abort()
        await super().shutdown(sockets)

    def _stalled_connections(self) -> list:
        """Busy connections, and those whose bytes the client has not taken (closing one of those would
        wait for it to read them)."""
        busy = self._busy_connections()
        return busy + [c for c in self.server_state.connections if c not in busy and self._stalled(c)]

    def _busy_connections(self) -> list:
        """Connections with a response under way (uvicorn's HTTP protocols: a cycle not yet complete)."""
        busy = []
        for connection in self.server_state.connections:
            cycle = getattr(connection, "cycle", None)
            if cycle is not None and not cycle.response_complete:
                busy.append(connection)
        return busy

    @staticmethod
    def _stalled(connection: Any) -> bool:
        """Whether a connection has bytes its client has not taken yet (a full socket buffer)."""
        return connection.transport.get_write_buffer_size() > 0

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def serve(
    model_dir: str | Path,
    config: ServerConfig | None = None,
    *,
    engine_config: EngineConfig | None = None,
    adapters: Mapping[str, str | Path] | None = None,
) -> int:
    """Load `model_dir` as `engine_config` says (dtype, device, KV cache, ...) and serve it (OpenAI API
    under /v1, web UI at /) until SIGTERM or Ctrl-C. Returns the exit code: 0 after a drained shutdown, 1
    after a fatal engine fault."""
    config = config or ServerConfig()
    engine = AsyncEngine.from_dir(model_dir, engine_config, adapters)
    state = ServerState(engine, config, model_dir=model_dir)
    print(f"kiln: {engine.engine.startup_summary()}", file=sys.stderr, flush=True)
    server = _Server(
        uvicorn.Config(
            build_app(state),
            host=config.host,
            port=config.port,
            log_level=config.log_level,
            access_log=config.access_log,
            timeout_graceful_shutdown=1,  # a backstop: _Server.shutdown has ended every response by then
            timeout_keep_alive=5,
        ),
        state,
    )
    url = f"http://{config.host}:{config.port}"
    print(f"kiln: serving {state.model_name!r} at {url}/v1 (web UI: {url}/)", file=sys.stderr, flush=True)
    for name in state.adapter_names:
        print(f"kiln: serving adapter {name!r} ({state.engine.adapters.sources[name]})", file=sys.stderr)
    server.run()
    return server.exit_code
