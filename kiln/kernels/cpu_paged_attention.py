"""Paged attention on CPU over the KV pool in place: the C++/OpenMP op of csrc/paged_attention.cpp and its
torch reference.

Sequence s's new queries are rows [query_starts[s], + query_lens[s]) of q (N, H, D) and the last
query_lens[s] of its context_lens[s] tokens, whose keys/values sit in key_cache/value_cache
(slots, KVH, D) at slot `block_tables[s][position // block_size] * block_size + position % block_size`.
Query t sits at position p = context_len - query_len + t and attends key positions j <= p (and
p - j < sliding_window when one is set); ALiBi adds slope_h * j to the scaled scores. Decodes (one
query) and prefill chunks over cached context mix freely in one call. The engine's backend around the op
is `kiln.engine.cpu_attention.CppPagedAttention`. `paged_attention_quantized` is the op over an int8/int4
pool (kiln/kernels/kv_quant.py), dequantizing each key tile as it reads it.
"""

from __future__ import annotations

import torch

from kiln.errors import KilnError
from kiln.kernels.cpu_extension import cpu_ops_available
from kiln.kernels.kv_quant import dequantize_kv


def _checked_scale(q: torch.Tensor, scale: float | None) -> float:
    """The softmax scale (head_dim ** -0.5 unless given), once the ops are known to be built."""
    if not cpu_ops_available():
        raise KilnError(
            "kiln's C++ CPU ops are not built (see the line above for why); use the torch paged-attention "
            "backend, or install a C++ compiler and run `python -m kiln.kernels.cpu_extension`"
        )
    return q.shape[-1] ** -0.5 if scale is None else scale


def paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_starts: torch.Tensor,
    query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q (N, H, D); key/value_cache (slots, KVH, D); block_tables int32 (S, max_blocks); query_starts,
    query_lens, context_lens int32 (S,); alibi_slopes fp32 (H,). Returns (N, H, D) in q's dtype (rows of no
    sequence are zeros), accumulated in fp32. fp32, bf16 and fp16; H a multiple of KVH."""
    scale = _checked_scale(q, scale)
    return torch.ops.kiln.paged_attention(
        q, key_cache, value_cache, block_tables, query_starts, query_lens, context_lens,
        block_size, scale, alibi_slopes, sliding_window or 0,
    )  # fmt: skip


def paged_attention_reference(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_starts: torch.Tensor,
    query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """`paged_attention` in plain torch, one sequence at a time: gather its keys/values, masked softmax in
    float64 (so that it is an oracle for the fp32 op too). Slow and obviously right."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    group = num_heads // key_cache.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    out = torch.zeros(q.shape, dtype=torch.float64)
    for seq in range(len(query_lens)):
        start, num_queries, length = (int(t[seq]) for t in (query_starts, query_lens, context_lens))
        keys_at = torch.arange(length)  # (S,) key positions
        slots = block_tables[seq].long()[keys_at // block_size] * block_size + keys_at % block_size
        keys = key_cache[slots].double().repeat_interleave(group, 1)  # (S, H, D)
        values = value_cache[slots].double().repeat_interleave(group, 1)
        queries = q[start : start + num_queries].double()  # (T, H, D)
        scores = torch.einsum("thd,shd->hts", queries, keys) * scale  # (H, T, S)
        if alibi_slopes is not None:
            scores = scores + alibi_slopes.double()[:, None, None] * keys_at
        queries_at = length - num_queries + torch.arange(num_queries)[:, None]  # (T, 1)
        allowed = keys_at <= queries_at  # (T, S)
        if sliding_window:
            allowed &= queries_at - keys_at < sliding_window
        probabilities = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[start : start + num_queries] = torch.einsum("hts,shd->thd", probabilities, values)
    return out.to(q.dtype)


def paged_attention_quantized(
    q: torch.Tensor,
    key_codes: torch.Tensor,
    value_codes: torch.Tensor,
    key_params: torch.Tensor,
    value_params: torch.Tensor,
    bits: int,
    block_tables: torch.Tensor,
    query_starts: torch.Tensor,
    query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """`paged_attention` over a quantized pool (kiln/kernels/kv_quant.py): key/value_codes uint8 (slots, KVH,
    D, or D / 2 for bits=4), key/value_params uint8 (slots, KVH, 3). Each key tile is dequantized into a
    per-thread fp32 buffer as the op reaches it; q (and the output) fp32, bf16 or fp16."""
    scale = _checked_scale(q, scale)
    return torch.ops.kiln.paged_attention_quantized(
        q, key_codes, value_codes, key_params, value_params, bits, block_tables, query_starts, query_lens,
        context_lens, block_size, scale, alibi_slopes, sliding_window or 0,
    )  # fmt: skip


def paged_attention_quantized_reference(
    q, key_codes, value_codes, key_params, value_params, bits, *metadata, **options
) -> torch.Tensor:
    """Dequantize the whole pool (fp32), then `paged_attention_reference`."""
    keys = dequantize_kv(key_codes, key_params, bits, torch.float32)
    values = dequantize_kv(value_codes, value_params, bits, torch.float32)
    return paged_attention_reference(q, keys, values, *metadata, **options)
