"""`kiln serve`: the OpenAI-compatible HTTP server from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kiln.errors import KilnError


def serve_command(
    model: Annotated[
        Path,
        typer.Option("--model", "-m", help="Hugging Face model directory (config.json + *.safetensors)."),
    ],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="KILN_API_KEY",
            help="Require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize.",
        ),
    ] = None,
    served_model_name: Annotated[
        str | None, typer.Option(help="The model name clients use (default: the directory's name).")
    ] = None,
    max_num_seqs: Annotated[int, typer.Option(help="Sequences the engine runs at once.")] = 64,
    max_queue: Annotated[
        int, typer.Option(help="Requests that may wait beyond --max-num-seqs; more get 503 + Retry-After.")
    ] = 256,
    max_model_len: Annotated[
        int | None,
        typer.Option(help="Longest prompt + output in tokens (default: the model's context length)."),
    ] = None,
    max_num_batched_tokens: Annotated[int, typer.Option(help="Token budget of one engine step.")] = 1024,
    kv_cache_memory: Annotated[
        str | None,
        typer.Option(help="KV cache size, e.g. 512MB (default: up to 2GiB on CPU, 80% of free GPU)."),
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="Weights dtype: auto (as stored), float32, bf16 or fp16.")
    ] = "auto",
    device: Annotated[
        str, typer.Option(help="Device: auto (cuda if available, else cpu), cpu, cuda, ...")
    ] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of requests that set none.")] = 0,
    drain_timeout: Annotated[
        float, typer.Option(help="On SIGTERM, seconds in-flight requests may take to finish.")
    ] = 30.0,
    max_body_size: Annotated[str, typer.Option(help="Largest request body; larger ones get 413.")] = "4MB",
    max_stream_buffer: Annotated[
        int,
        typer.Option(help="Outputs a stream may keep waiting for a slow reader; past that it is aborted."),
    ] = 256,
    log_level: Annotated[str, typer.Option(help="uvicorn log level: debug, info, warning, error.")] = "info",
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = True,
) -> None:
    """Serve a model over HTTP: the OpenAI API under /v1 (completions, chat, embeddings; streaming),
    /tokenize, /detokenize, /health, Prometheus /metrics, and a chat playground at /."""
    try:
        from kiln.server.app import serve
    except ImportError as error:
        raise KilnError(
            f"kiln serve needs the server extra ({error.name} is missing): pip install 'kiln[server]'"
        ) from error
    from kiln.engine.config import EngineConfig
    from kiln.server.config import ServerConfig

    if not (model / "config.json").is_file():
        raise KilnError(f"{model} is not a model directory (no config.json); pass --model DIR")
    config = ServerConfig(
        host=host,
        port=port,
        api_key=api_key,
        served_model_name=served_model_name,
        max_queue=max_queue,
        drain_timeout_s=drain_timeout,
        max_body_size=max_body_size,
        max_stream_buffer=max_stream_buffer,
        log_level=log_level,
        access_log=access_log,
    )
    engine_config = EngineConfig(
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        max_num_batched_tokens=max_num_batched_tokens,
        kv_cache_memory=kv_cache_memory,
        seed=seed,
    )
    serve(model, config, engine_config=engine_config, dtype=dtype, device=device)
