"""The engine's command-line options, declared once: `kiln generate`, `kiln chat`, `kiln serve` and
`kiln bench generate` list the ones they offer with these types, take their defaults from `DEFAULT`, and
map them onto an EngineConfig with `engine_config_from_flags`.

Typer reads each command's own signature, so a command still names the options it has; what each means,
how it is spelled, what it defaults to and which field it sets lives here and in EngineConfig.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

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
        help="Paged attention, linears and fused ops: torch (the reference), triton, or auto (Triton on "
        "CUDA, kiln's C++ ops on CPU where they are built, else torch)."
    ),
]

Threads = Annotated[
    int | None,
    typer.Option(help="CPU threads (default: the physical cores, or OMP_NUM_THREADS when it is set)."),
]
Quantization = Annotated[
    str | None,
    typer.Option(help="Quantize the weights on load: int8, int4 (group 128) or w8a8 (default: as stored)."),
]
KVCacheDtype = Annotated[
    str | None,
    typer.Option(
        help="KV cache element type: int8 (about 1/2 of bf16's bytes per token) or int4 (about 0.28), "
        "quantized per token and head on write and dequantized inside attention (default: the model dtype)."
    ),
]
LokiTopK = Annotated[
    float | None,
    typer.Option(
        help="Loki sparse attention: the fraction of the context each decode attends, e.g. 0.25 (needs "
        "`kiln calibrate-loki` first; default: dense attention)."
    ),
]
LokiRank = Annotated[
    int | None,
    typer.Option(help="Loki: principal key dimensions that score the context (default head_dim/4)."),
]

# A command's parameter name of each engine flag -> the EngineConfig field it sets. The engine seed's
# parameter is `engine_seed` (spelled --seed on kiln serve), as `seed` is kiln generate's sampling seed.
ENGINE_FLAGS = {
    "dtype": "dtype",
    "device": "device",
    "max_model_len": "max_model_len",
    "kv_cache_memory": "kv_cache_memory",
    "max_num_seqs": "max_num_seqs",
    "max_num_batched_tokens": "max_num_batched_tokens",
    "block_size": "block_size",
    "prefix_caching": "enable_prefix_caching",
    "engine_seed": "seed",
    "kernels": "kernels",
    "threads": "num_threads",
    "quantization": "quantization",
    "kv_cache_dtype": "kv_cache_dtype",
    "loki_top_k": "loki_top_k",
    "loki_rank": "loki_rank",
}


def engine_config_from_flags(flags: Mapping[str, Any], **fields: Any) -> EngineConfig:
    """The EngineConfig of a command's engine flags. `flags` maps parameter names to values (a command
    passes its `locals()` on entry; names that are no engine flag are ignored); `fields` are EngineConfig
    fields the command sets itself, such as kiln generate's max_num_seqs (one per prompt)."""
    values = {field: flags[name] for name, field in ENGINE_FLAGS.items() if name in flags}
    return EngineConfig(**{**values, **fields})
