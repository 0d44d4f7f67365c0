"""Quantized KV cache rows: asymmetric int8 / int4 per (token, kv head), and their torch reference.

A row of D values x becomes D codes q in [0, 2^bits - 1], an fp16 scale s and an integer zero point z in
the same range, with x ~ (q - z) * s: s = (max - min) / (2^bits - 1) over the row's range widened to hold
0, z = round(-min / s). Each value's error is at most s / 2 (s where a code clamps at either end).
int8 stores one code a byte, (..., D) uint8; int4 two, (..., D / 2) uint8, value d in the low nibble of
byte d and value d + D / 2 in the high nibble of byte d (so that a kernel widens a byte run into two
contiguous half rows, no interleave). The parameters sit beside the codes, 3 bytes a row in a (..., 3)
uint8 tensor: the scale's fp16 bits (little-endian), then z. With D = 32 (the demo model) int8 rows take 35
bytes and int4 19, against 64 for bf16; with D = 64, 67 and 35 against 128
(kiln.engine.config.kv_bytes_per_token).

The attention kernels dequantize tiles in registers / a per-thread buffer (cpu_paged_attention,
paged_attention_quantized); `dequantize_kv` is what they are tested against.
"""

from __future__ import annotations

import torch

from kiln.errors import KilnError

KV_CACHE_BITS = {"int8": 8, "int4": 4}
PARAM_BYTES = 3  # fp16 scale + uint8 zero point per (token, kv head)


def kv_cache_bits(kv_cache_dtype: str | None, head_dim: int | None = None) -> int:
    """Bits per cached key/value element of `kv_cache_dtype` (None or "auto": 0, the model dtype). Refuses
    an unknown name, and int4 on an odd head_dim (its rows pack two values a byte)."""
    if kv_cache_dtype is None or kv_cache_dtype == "auto":
        return 0
    if kv_cache_dtype not in KV_CACHE_BITS:
        raise KilnError(
            f"unknown kv_cache_dtype {kv_cache_dtype!r}; use int8, int4 or auto (the model's dtype)"
        )
    bits = KV_CACHE_BITS[kv_cache_dtype]
    if bits == 4 and head_dim is not None and head_dim % 2:
        raise KilnError(
            f"an int4 KV cache packs two values a byte and needs an even head_dim, but this model's is "
            f"{head_dim}; use kv_cache_dtype='int8' (or the model dtype)"
        )
    return bits


def packed_dim(bits: int, head_dim: int) -> int:
    """Bytes of codes per cached row."""
    return head_dim if bits == 8 else head_dim // 2


def quantize_kv(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) -> codes uint8 (..., packed_dim) and params uint8 (..., 3) (fp16 scale bytes, zero)."""
    levels = 2**bits - 1
    x32 = x.float()
    low, high = x32.amin(-1).clamp(max=0), x32.amax(-1).clamp(min=0)
    scale = ((high - low) / levels).clamp_min(2**-24).half()  # fp16's smallest step: never 0
    scale32 = scale.float()
    zero = (-low / scale32).round_().clamp_(0, levels)
    codes = (x32 / scale32[..., None]).round_().add_(zero[..., None]).clamp_(0, levels).to(torch.uint8)
    if bits == 4:
        half = x.shape[-1] // 2
        codes = codes[..., :half] | (codes[..., half:] << 4)
    params = torch.cat([scale[..., None].view(torch.uint8), zero.to(torch.uint8)[..., None]], -1)
    return codes, params


def split_params(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """params uint8 (..., 3) -> scale fp32 (...,), zero fp32 (...,)."""
    # the scale is positive: its sign bit is 0, so the 16 bits fit int16 as they are
    bits = params[..., 0].to(torch.int16) | (params[..., 1].to(torch.int16) << 8)
    scale = bits.view(torch.float16).float()
    return scale, params[..., 2].float()


def dequantize_kv(codes: torch.Tensor, params: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """codes uint8 (..., packed_dim), params uint8 (..., 3) -> (..., D) in `dtype`: (q - z) * s in fp32."""
    if bits == 4:
        codes = torch.cat([codes & 15, codes >> 4], -1)
    scale, zero = split_params(params)
    return ((codes.float() - zero[..., None]) * scale[..., None]).to(dtype)
