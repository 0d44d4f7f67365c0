"""EngineConfig: where the engine loads a model, how it lays out its KV cache, how much work one step
may do, and which kernels run. `kiln.LLM`, the CLI flags (kiln.engine.options) and the server map onto it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from kiln.config import ModelConfig
from kiln.errors import KilnError
from kiln.kernels.kv_quant import PARAM_BYTES, kv_cache_bits, packed_dim
from kiln.kernels.runtime import KernelChoice, check_kernels
from kiln.parsing import parse_dtype, parse_size

# Without an explicit kv_cache_memory: CPU takes at most this much RAM for the KV cache ...
DEFAULT_CPU_KV_BYTES = 2 * 2**30
# ... and CUDA this fraction of the memory still free after the weights are loaded (the rest holds
# activations and the allocator's slack).
DEFAULT_CUDA_KV_FRACTION = 0.8
# The oneDNN-packed copies of bf16 linears (kiln/kernels/packed_weight.py; the weights' bytes once more) are
# made only where they leave this much of the machine's available memory free beside the KV cache.
PACKING_HEADROOM_BYTES = 2**30


@dataclass(kw_only=True, slots=True)
class EngineConfig:
    """Knobs of the engine. `kiln.LLM` and the CLI map their arguments onto this."""

    # Read when the engine loads a model directory (Engine.from_dir); a model handed to Engine directly
    # stays where it is.
    dtype: str | torch.dtype = "auto"  # weights dtype: auto (as stored), float32, bf16, fp16
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...
    block_size: int = 16  # tokens per KV block
    max_num_seqs: int = 64  # sequences in flight per step
    max_num_batched_tokens: int = 1024  # token budget of one step (decodes + prefill chunks)
    max_model_len: int | None = None  # prompt + output tokens per sequence; None = the model's maximum
    kv_cache_memory: int | str | None = None  # bytes or "512MB"; None = chosen from the device
    num_kv_blocks: int | None = None  # exact KV block count; overrides kv_cache_memory (tests, benchmarks)
    enable_prefix_caching: bool = True
    seed: int = 0  # the engine's generator, used by requests that set no seed of their own
    # Paged attention and the model's fused ops: torch, triton, or auto (Triton on CUDA, kiln's C++ ops on CPU
    # where they are built, else torch).
    kernels: KernelChoice = "auto"
    # Intra-op threads on CPU; None = the physical cores (unless OMP_NUM_THREADS is set), kiln.engine.threads.
    num_threads: int | None = None
    # Quantize the weights on load (kiln.quant): None (as stored), int8, int4 (group 128) or w8a8.
    quantization: str | None = None
    # KV cache element type: None/"auto" (the model dtype), int8 or int4 (kiln/kernels/kv_quant.py).
    kv_cache_dtype: str | None = None
    # Loki sparse attention for decodes (kiln/engine/loki.py): the fraction of each context a decode attends
    # (None = dense attention), the principal key dimensions that pick those tokens (None = head_dim / 4),
    # and the basis file `kiln calibrate-loki` wrote (None = loki/pca.safetensors in the model directory).
    loki_top_k: float | None = None
    loki_rank: int | None = None
    loki_basis: str | None = None

    def __post_init__(self) -> None:
        check_kernels(self.kernels)
        if self.num_threads is not None and self.num_threads <= 0:
            raise KilnError(f"num_threads must be positive or None, got {self.num_threads}")
        parse_dtype(self.dtype)  # an unknown name fails here, before any weights are read
        if self.quantization is not None:
            from kiln.quant import parse_scheme

            parse_scheme(self.quantization)
        kv_cache_bits(self.kv_cache_dtype)  # an unknown name fails here
        if self.loki_top_k is not None and not 0 < self.loki_top_k <= 1:
            raise KilnError(f"loki_top_k is a fraction of the context in (0, 1], got {self.loki_top_k}")
        if self.loki_rank is not None and self.loki_rank <= 0:
            raise KilnError(f"loki_rank must be positive or None, got {self.loki_rank}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                raise KilnError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise KilnError(f"max_model_len must be positive or None, got {self.max_model_len}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise KilnError(f"num_kv_blocks must be positive or None, got {self.num_kv_blocks}")
        if self.kv_cache_memory is not None and parse_size(self.kv_cache_memory) <= 0:
            raise KilnError(f"kv_cache_memory must be positive, got {self.kv_cache_memory!r}")

    def replace(self, **changes: Any) -> EngineConfig:
        """A copy with some fields changed; an unknown field name is refused with the valid ones."""
        unknown = sorted(set(changes) - {field.name for field in dataclasses.fields(self)})
        if unknown:
            valid = ", ".join(field.name for field in dataclasses.fields(self))
            raise KilnError(f"unknown engine option(s) {', '.join(unknown)}; the options are: {valid}")
        return dataclasses.replace(self, **changes)

    def resolve_max_model_len(self, model: ModelConfig) -> int:
        """The context length sequences may reach: max_model_len, bounded by the model's positions."""
        if self.max_model_len is None:
            return model.max_position_embeddings
        if model.position == "learned" and self.max_model_len > model.max_position_embeddings:
            raise KilnError(
                f"max_model_len {self.max_model_len} exceeds this model's "
                f"{model.max_position_embeddings} learned positions; lower max_model_len"
            )
        return self.max_model_len


def kv_bytes_per_token(model: ModelConfig, dtype: torch.dtype, kv_cache_dtype: str | None = None) -> int:
    """Bytes of keys plus values one token occupies across all layers (a quantized row: its codes and its
    fp16 scale and zero)."""
    bits = kv_cache_bits(kv_cache_dtype, model.head_dim)
    if bits:
        row_bytes = packed_dim(bits, model.head_dim) + PARAM_BYTES
    else:
        row_bytes = model.head_dim * torch.empty((), dtype=dtype).element_size()
    return 2 * model.num_layers * model.num_kv_heads * row_bytes


def num_kv_blocks(
    config: EngineConfig, model: ModelConfig, dtype: torch.dtype, device: torch.device, max_model_len: int
) -> int:
    """How many KV blocks to preallocate, from num_kv_blocks, kv_cache_memory or the device's memory."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    block_bytes = kv_bytes_per_token(model, dtype, config.kv_cache_dtype) * config.block_size
    if config.kv_cache_memory is not None:
        return parse_size(config.kv_cache_memory) // block_bytes
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        return int(free_bytes * DEFAULT_CUDA_KV_FRACTION) // block_bytes
    # CPU: no more than every sequence slot at full length needs.
    wanted = config.max_num_seqs * -(-max_model_len // config.block_size)
    return min(wanted, DEFAULT_CPU_KV_BYTES // block_bytes)


def packing_budget(kv_cache_bytes: int) -> int | None:
    """Most bytes the packed weight copies may take on CPU: the memory available now (Linux MemAvailable)
    less the KV cache about to be allocated and PACKING_HEADROOM_BYTES; None where that is unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    return available - kv_cache_bytes - PACKING_HEADROOM_BYTES
