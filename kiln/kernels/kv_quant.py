"""Quantized KV cache rows: asymmetric int8 / int4 per (token, kv head), and their torch reference.

A row of D values x becomes D codes q in [0, 2^bits - 1] and two fp16 parameters (scale, zero) with
x ~ q * scale + zero: `zero` is the row's minimum rounded down, `scale` its range / (2^bits - 1) rounded up,
so that no code clamps and the error of each value is at most scale / 2. int8 stores one code a byte,
(..., D) uint8; int4 two, (..., D / 2) uint8, value d in the low nibble of byte d and value d + D / 2 in the
high nibble of byte d (so that a kernel widens a byte run into two contiguous half rows, no interleave).
The parameters sit beside the codes in a (..., 2) fp16 tensor, 4 bytes a row: with D = 64, int8 rows take
68 bytes and int4 36, against 128 for bf16 (kiln.engine.config.kv_bytes_per_token).

The attention kernels dequantize tiles in registers / a per-thread buffer (cpu_paged_attention,
paged_attention_quantized); `dequantize_kv` is what they are tested against.
"""

from __future__ import annotations

import torch

from kiln.errors import KilnError

KV_CACHE_BITS = {"int8": 8, "int4": 4}
PARAM_BYTES = 4  # fp16 scale + fp16 zero per (token, kv head)


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
    """x (..., D) -> codes uint8 (..., packed_dim) and params fp16 (..., 2) = (scale, zero)."""
    levels = 2**bits - 1
    x32 = x.float()
    low, high = x32.amin(-1), x32.amax(-1)
    # Round zero down and scale up (fp16 keeps 11 significant bits): every code then lands in range.
    zero = (low - low.abs() * 2**-10).half().float()
    scale = ((high - zero) / levels * (1 + 2**-10)).clamp_min(2**-24).half().float()
    codes = ((x32 - zero[..., None]) / scale[..., None]).round_().clamp_(0, levels).to(torch.uint8)
    if bits == 4:
        half = x.shape[-1] // 2
        codes = codes[..., :half] | (codes[..., half:] << 4)
    return codes, torch.stack([scale, zero], -1).half()


def dequantize_kv(codes: torch.Tensor, params: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """codes uint8 (..., packed_dim), params fp16 (..., 2) -> (..., D) in `dtype` (computed in fp32)."""
    if bits == 4:
        codes = torch.cat([codes & 15, codes >> 4], -1)
    params = params.float()
    return torch.addcmul(params[..., 1:], codes.float(), params[..., :1]).to(dtype)
