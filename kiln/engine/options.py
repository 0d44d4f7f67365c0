"""The engine's command-line options, declared once: `kiln generate`, `kiln chat`, `kiln serve` and
`kiln bench generate` list the ones they offer with these types, take their defaults from `DEFAULT`, and
map them onto an EngineConfig with `engine_config_from_flags`.

Typer reads each command's own signature, so a command still names the options it has; what each means,
how it is spelled and what it defaults to lives here and in EngineConfig.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kiln.engine.config import EngineConfig

DEFAULT = EngineConfig()

ModelDir = Annotated[
    Path, typer.Option("--model", "-m", help="Hugging Face model directory (config.json + *.safetensors).")
]
Dtype = Annotated[str, typer.Option(help="Weights dtype: auto (as stored), float32, bf16 or fp16.")]
Device = Annotated[
    str, typer.Option(help="Device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
]
MaxModelLen = Annotated[
    int | None, typer.Option(help="Longest prompt + output in tokens (default: the model's context length).")
]
KVCacheMemory = Annotated[
    str | None, typer.Option(help="KV cache size, e.g. 512MB (default: up to 2GiB on CPU, 80% of free GPU).")
]
MaxNumSeqs = Annotated[int, typer.Option(help="Sequences the engine runs at once.")]
MaxNumBatchedTokens = Annotated[int, typer.Option(help="Token budget of one engine step.")]
BlockSize = Annotated[int, typer.Option(help="Tokens per KV cache block.")]
PrefixCaching = Annotated[
    bool, typer.Option(help="Share the KV blocks of prompts' common prefixes between requests.")
]
EngineSeed = Annotated[int, typer.Option("--seed", help="Seed of requests that set none.")]
Kernels = Annotated[
    str,
    typer.Option(
        help="Paged attention and the model's fused ops: torch, triton, or auto (Triton on CUDA, else torch)."
    ),
]


def engine_config_from_flags(
    *,
    dtype: str = DEFAULT.dtype,
    device: str = DEFAULT.device,
    max_model_len: int | None = DEFAULT.max_model_len,
    kv_cache_memory: str | None = DEFAULT.kv_cache_memory,
    max_num_seqs: int = DEFAULT.max_num_seqs,
    max_num_batched_tokens: int = DEFAULT.max_num_batched_tokens,
    block_size: int = DEFAULT.block_size,
    prefix_caching: bool = DEFAULT.enable_prefix_caching,
    seed: int = DEFAULT.seed,
    kernels: str = DEFAULT.kernels,
) -> EngineConfig:
    """The EngineConfig the engine flags describe (each keyword is the flag of that name)."""
    return EngineConfig(
        dtype=dtype,
        device=device,
        max_model_len=max_model_len,
        kv_cache_memory=kv_cache_memory,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        block_size=block_size,
        enable_prefix_caching=prefix_caching,
        seed=seed,
        kernels=kernels,
    )
