"""ServerConfig: how `kiln serve` listens, whom it lets in, and how much work it queues."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.errors import KilnError
from kiln.parsing import parse_size


@dataclass(kw_only=True, slots=True)
class ServerConfig:
    """Knobs of the HTTP server; the engine's own are in `EngineConfig`."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # when set, /v1/* and /tokenize, /detokenize need "Authorization: Bearer KEY"
    served_model_name: str | None = None  # the `model` clients name; None = the model directory's name
    # Sequences (prompts x n) admitted beyond the engine's max_num_seqs; past that the server answers 503
    # + Retry-After at once, rather than letting clients hang in an unbounded queue. A single request
    # with more sequences than max_num_seqs + max_queue is refused with 400.
    max_queue: int = 256
    # Engine outputs a stream may have waiting for a client that reads slowly; past that (once the
    # socket's buffers are full too) the request is aborted, so a client that stopped reading costs
    # bounded memory and no more generation.
    max_stream_buffer: int = 256
    max_embedding_inputs: int = 2048  # inputs per embedding request (OpenAI's limit)
    drain_timeout_s: float = 30.0  # on SIGTERM, how long in-flight requests may take to finish
    max_body_size: int | str = "4MB"  # larger request bodies get 413
    retry_after_s: int = 1  # the Retry-After a 503 suggests
    # Job store (a SQLite file or postgresql://...) behind /v1/files and /v1/batches; None = no batch API.
    batch_db: str | None = None
    log_level: str = "info"
    access_log: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise KilnError(f"port must be in [0, 65535], got {self.port}")
        if self.max_queue < 0:
            raise KilnError(f"max_queue must be >= 0, got {self.max_queue}")
        for name in ("max_stream_buffer", "max_embedding_inputs"):
            if getattr(self, name) <= 0:
                raise KilnError(f"{name} must be positive, got {getattr(self, name)}")
        if self.drain_timeout_s < 0:
            raise KilnError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if self.max_body_bytes <= 0:
            raise KilnError(f"max_body_size must be positive, got {self.max_body_size!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise KilnError("api_key is empty; pass a real key or none")

    @property
    def max_body_bytes(self) -> int:
        return parse_size(self.max_body_size)
