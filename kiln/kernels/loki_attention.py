"""Loki sparse attention (Singhania et al., NeurIPS 2024, "Loki: Low-rank Keys for Efficient Sparse
Attention"): score every cached key in the top-r principal dimensions of the keys, keep the top-k tokens,
and run exact attention over those.

The keys are stored rotated by a per-layer, per-KV-head orthonormal PCA basis P (D, D), columns sorted by
explained variance. Since P is orthogonal, q . k = (q P) . (k P): attention over the rotated keys with the
rotated query is the same attention, and the first r coordinates of k P are the keys' top-r principal
components, read without any extra projection at decode time. Values are not rotated.

Four implementations of one rule, tested against each other (tests/kernels/test_loki_attention.py):
- `loki_attention_reference`: dense (B, H, T, D) queries over (B, KVH, S, D) rotated keys, causal; every
  query is treated as a decode over the keys before it. The perplexity evaluation runs this.
- `loki_decode_attention`: the engine's decodes over the paged pool (vectorised torch).
- the C++ op (csrc/loki_attention.cpp, `torch.ops.kiln.loki_decode_attention`) behind the same function
  on CPU where kiln's C++ ops are built;
- the Triton kernels (loki_attention_triton.py) behind it too, for CUDA (tested in Triton's interpreter).

Over an int8/int4 KV pool (kiln/kernels/kv_quant.py) the C++ op and the torch code read the codes and
dequantize the rows they touch (the scored keys' first r coordinates, the kept keys and values) as they go.

A query at position p sees the n = p + 1 keys 0..p (the last `sliding_window` of them when one is set) and
keeps k = ceil(top_k * n) of them, at least 1; with k = n every key is kept and the result is dense
attention over the rotated keys.
"""

from __future__ import annotations

import math

import torch

from kiln.errors import KilnError
from kiln.kernels.cpu_extension import cpu_ops_available
from kiln.kernels.kv_quant import dequantize_kv


def num_selected(num_keys: int, top_k: float) -> int:
    """How many of `num_keys` keys a query keeps at fraction `top_k`."""
    return max(1, min(num_keys, math.ceil(top_k * num_keys - 1e-9)))


def loki_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int, top_k: float, scale: float | None = None
) -> torch.Tensor:
    """q (B, H, T, D), k/v (B, KVH, T, D), q and k already rotated -> (B, H, T, D), causal self-attention in
    which query t keeps the ceil(top_k * (t + 1)) keys with the largest rank-r scores (ties broken towards
    the earlier key), scores and softmax in fp32."""
    batch, num_heads, length, head_dim = q.shape
    group = num_heads // k.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    keys = k.float().repeat_interleave(group, 1)  # (B, H, T, D)
    values = v.float().repeat_interleave(group, 1)
    queries = q.float()
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()  # (T, S)
    keep = causal
    if top_k < 1.0:
        approx = queries[..., :rank] @ keys[..., :rank].transpose(-1, -2)  # (B, H, T, S)
        approx = approx.masked_fill(~causal, float("-inf"))
        # rank of each key among its row (0 = best); a stable sort keeps ties in key order
        order = approx.argsort(dim=-1, descending=True, stable=True)
        ranks = torch.empty_like(order).scatter_(
            -1, order, torch.arange(length, device=q.device).expand_as(order)
        )
        counts = torch.tensor([num_selected(t + 1, top_k) for t in range(length)], device=q.device)
        keep = causal & (ranks < counts[:, None])
    scores = (queries @ keys.transpose(-1, -2)) * scale
    probabilities = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    return (probabilities @ values).to(q.dtype)


def loki_decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    rank: int,
    top_k: float,
    scale: float | None = None,
    sliding_window: int | None = None,
    use_cpp: bool | None = None,
    use_triton: bool = False,
    max_context: int | None = None,
    counts: torch.Tensor | None = None,
    key_params: torch.Tensor | None = None,
    value_params: torch.Tensor | None = None,
    bits: int = 0,
) -> torch.Tensor:
    """One decode query per sequence: q (M, H, D) rotated; key_cache (slots, KVH, D) rotated keys,
    value_cache (slots, KVH, D); block_tables int32 (M, max_blocks); context_lens int32 (M,) -> (M, H, D).

    Each query head picks its own top-k keys (GQA heads of one KV head may pick different tokens).
    `use_triton` runs the Triton kernels (kiln/kernels/loki_attention_triton.py; `max_context`, at least
    every context length, saves reading context_lens back, and `counts`, the kept keys per sequence of
    loki_attention_triton.loki_counts, a few small ops a layer); else `use_cpp` None runs the C++ op on CPU
    where it is built, else this torch code. With `bits` 8 or 4 the caches are a quantized pool's uint8
    codes (slots, KVH, D or D / 2) and `key_params` / `value_params` its (slots, KVH, 3) scales and zero
    points; rows are dequantized to fp32 as they are read (the C++ op or torch: Triton reads model-dtype
    pools only)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if bits and use_triton:
        raise KilnError(
            "Loki over an int8/int4 KV cache runs on CPU (the C++ op or torch); the Triton kernels read a "
            "model-dtype pool: drop kv_cache_dtype or run Loki on CPU"
        )
    if use_triton:
        from kiln.kernels.loki_attention_triton import loki_decode_triton

        most = max_context if max_context is not None else int(context_lens.max())
        return loki_decode_triton(
            q.contiguous(), key_cache, value_cache, block_tables, context_lens, block_size, rank, top_k,
            scale, sliding_window, most, counts,
        )  # fmt: skip
    if use_cpp is None:
        use_cpp = q.device.type == "cpu" and cpu_ops_available()
    elif use_cpp and not cpu_ops_available():  # the call also loads the library
        raise KilnError("kiln's C++ CPU ops are not built (see the line above for why); pass use_cpp=False")
    if use_cpp:
        return torch.ops.kiln.loki_decode_attention(
            q.contiguous(), key_cache, value_cache, block_tables, context_lens, block_size, rank, top_k,
            scale, sliding_window or 0, key_params, value_params, bits,
        )  # fmt: skip
    out = torch.empty_like(q)
    for seq in range(q.shape[0]):
        cache, table, length = (key_cache, value_cache), block_tables[seq], int(context_lens[seq])
        window, size = sliding_window, block_size
        if bits:  # the sequence's visible rows dequantized into a one-block cache of their own
            first = max(0, length - sliding_window) if sliding_window else 0
            positions = torch.arange(first, length, device=q.device)
            slots = table.long()[positions // block_size] * block_size + positions % block_size
            cache = tuple(
                dequantize_kv(codes[slots], params[slots], bits, torch.float32)
                for codes, params in ((key_cache, key_params), (value_cache, value_params))
            )
            table, length, window, size = (
                torch.zeros(1, dtype=torch.int32, device=q.device),
                len(slots),
                None,
                len(slots),
            )
        out[seq] = _decode_one(q[seq], *cache, table, length, size, rank, top_k, scale, window)
    return out


def _decode_one(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    length: int,
    block_size: int,
    rank: int,
    top_k: float,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """q (H, D) over one sequence's `length` cached tokens -> (H, D)."""
    num_heads, head_dim = q.shape
    num_kv_heads = key_cache.shape[1]
    group = num_heads // num_kv_heads
    first = max(0, length - sliding_window) if sliding_window else 0
    positions = torch.arange(first, length, device=q.device)
    table = block_table.long()
    slots = table[positions // block_size] * block_size + positions % block_size  # (n,)
    num_keys = slots.numel()
    count = num_selected(num_keys, top_k)
    kv_of_head = torch.arange(num_heads, device=q.device) // group  # (H,)
    if count < num_keys:
        # rank-r scores read only the first r coordinates of each rotated key
        low = key_cache[:, :, :rank].index_select(0, slots).float()  # (n, KVH, r)
        low = low.permute(1, 2, 0).repeat_interleave(group, 0)  # (H, r, n)
        approx = torch.bmm(q[:, None, :rank].float(), low)[:, 0]  # (H, n)
        # a stable sort breaks ties towards the earlier key, as the C++ op does (a quantized pool's keys tie)
        chosen = approx.sort(dim=-1, descending=True, stable=True).indices[:, :count]  # (H, k)
        chosen_slots = slots[chosen]  # (H, k)
    else:
        chosen_slots = slots.expand(num_heads, num_keys)
    rows = (chosen_slots * num_kv_heads + kv_of_head[:, None]).flatten()  # rows of the (slots * KVH, D) view
    keys = key_cache.reshape(-1, head_dim).index_select(0, rows).view(num_heads, -1, head_dim).float()
    values = value_cache.reshape(-1, head_dim).index_select(0, rows).view(num_heads, -1, head_dim).float()
    scores = torch.bmm(keys, q.float()[:, :, None])[..., 0] * scale  # (H, k)
    return torch.bmm(scores.softmax(-1)[:, None], values)[:, 0].to(q.dtype)
