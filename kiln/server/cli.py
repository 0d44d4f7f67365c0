"""`kiln serve`: the OpenAI-compatible HTTP server from the command line."""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer

from kiln.engine.options import (
    DEFAULT,
    BlockSize,
    Device,
    Dtype,
    EngineSeed,
    Kernels,
    KVCacheDtype,
    KVCacheMemory,
    LokiRank,
    LokiTopK,
    MaxModelLen,
    MaxNumBatchedTokens,
    MaxNumSeqs,
    ModelDir,
    PrefixCaching,
    Quantization,
    Threads,
    engine_config_from_flags,
)
from kiln.errors import KilnError


def serve_command(
    model: ModelDir,
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
    max_num_seqs: MaxNumSeqs = DEFAULT.max_num_seqs,
    max_queue: Annotated[
        int, typer.Option(help="Requests that may wait beyond --max-num-seqs; more get 503 + Retry-After.")
    ] = 256,
    max_model_len: MaxModelLen = DEFAULT.max_model_len,
    max_num_batched_tokens: MaxNumBatchedTokens = DEFAULT.max_num_batched_tokens,
    kv_cache_memory: KVCacheMemory = DEFAULT.kv_cache_memory,
    dtype: Dtype = DEFAULT.dtype,
    device: Device = DEFAULT.device,
    engine_seed: EngineSeed = DEFAULT.seed,
    block_size: BlockSize = DEFAULT.block_size,
    prefix_caching: PrefixCaching = DEFAULT.enable_prefix_caching,
    kernels: Kernels = DEFAULT.kernels,
    threads: Threads = DEFAULT.num_threads,
    quantization: Quantization = DEFAULT.quantization,
    kv_cache_dtype: KVCacheDtype = DEFAULT.kv_cache_dtype,
    loki_top_k: LokiTopK = DEFAULT.loki_top_k,
    loki_rank: LokiRank = DEFAULT.loki_rank,
    drain_timeout: Annotated[
        float, typer.Option(help="On SIGTERM, seconds in-flight requests may take to finish.")
    ] = 30.0,
    max_body_size: Annotated[str, typer.Option(help="Largest request body; larger ones get 413.")] = "4MB",
    max_stream_buffer: Annotated[
        int,
        typer.Option(help="Outputs a stream may keep waiting for a slow reader; past that it is aborted."),
    ] = 256,
    batch_db: Annotated[
        str | None,
        typer.Option(
            help="Serve /v1/files and /v1/batches over this job store (a SQLite file or postgresql://...)."
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level: debug, info, warning, error.")] = "info",
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = True,
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            metavar="<str>",
            help="Serve a PEFT adapter (LoRA or prompt tuning) as NAME=DIR; repeatable. A request's "
            "`model` picks it; one batch mixes adapters and the base.",
        ),
    ] = None,
) -> None:
    """Serve a model over HTTP: the OpenAI API under /v1 (completions, chat, embeddings; streaming),
    /tokenize, /detokenize, /health, Prometheus /metrics, and a chat playground at /."""
    flags = dict(locals())  # the parameters, before any other local exists
    try:
        from kiln.server.app import serve
    except ImportError as error:
        raise KilnError(
            f"kiln serve needs the server extra ({error.name} is missing): pip install 'kiln[server]'"
        ) from error
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
        batch_db=batch_db,
        log_level=log_level,
        access_log=access_log,
    )
    flags.pop("adapter")
    engine_config = engine_config_from_flags(flags)
    exit_code = serve(model, config, engine_config=engine_config, adapters=parse_adapters(adapter or []))
    # The server has drained and the engine thread has stopped: leave now. Tearing the interpreter
    # down (the model's and torch's objects) takes over a second on a busy 2-core machine, which would
    # break the drain timeout's promise to a supervisor.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def parse_adapters(values: list[str]) -> dict[str, str]:
    """['sql=/path/a', 'chat=/path/b'] -> {'sql': '/path/a', 'chat': '/path/b'}."""
    adapters: dict[str, str] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or not name or not directory:
            raise KilnError(f"--adapter {value!r} must look like NAME=DIR")
        if name in adapters:
            raise KilnError(f"--adapter {name!r} is given twice; each adapter needs its own name")
        adapters[name] = directory
    return adapters
