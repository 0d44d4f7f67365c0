"""Loki decode attention with Triton (kiln/kernels/loki_attention.py holds the rule and its torch code).

Three steps per layer, one query per sequence over the paged pool of rotated keys:
1. `_loki_scores_kernel`, grid (sequences, query heads, key tiles): each visible key's rank-r score, the
   first `rank` coordinates of the query and the key (the pool holds keys in the PCA basis), into a
   (sequences, heads, max_context) fp32 buffer, -inf for positions the query does not see;
2. `torch.topk` of that buffer at the largest count of the batch: row by row, the first `count` of its
   sorted indices are the sequence's top `count` keys (count = ceil(top_k * visible keys));
3. `_loki_attend_kernel`, grid (sequences, query heads): exact softmax attention of each query head over its
   own kept keys, gathered through the block table, online over tiles of BLOCK_N.
With count = the visible keys, every key is kept and the result is dense attention up to fp32 summation
order. Ties between equal scores at the cut may go either way (torch.topk's choice), as in the torch code;
the C++ op keeps the earlier key. Tested in Triton's interpreter against the torch code
(tests/kernels/test_loki_attention.py); not yet timed on a GPU.
"""

from __future__ import annotations

import math

import torch

from kiln.kernels.jit import tl, triton

LOG2_E = 1.4426950408889634
SCORE_TILE = 128  # keys a scoring program reads
ATTEND_TILE = 64  # kept keys per step of the exact part


@triton.jit
def _loki_scores_kernel(
    Q, KeyCache, BlockTables, ContextLens, Scores,
    stride_qs, stride_qh, stride_ks, stride_kh, stride_bt, stride_ss, stride_sh, max_context, sliding_window,
    RANK: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr, HAS_WINDOW: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    head = tl.program_id(1)
    tile = tl.program_id(2)
    num_keys = tl.load(ContextLens + seq)
    first_key = 0
    if HAS_WINDOW:
        first_key = tl.maximum(num_keys - sliding_window, 0)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    rank_ok = offs_r < RANK
    key_ok = (offs_n >= first_key) & (offs_n < num_keys)
    q = tl.load(Q + seq.to(tl.int64) * stride_qs + head * stride_qh + offs_r, mask=rank_ok, other=0.0)
    pages = tl.load(BlockTables + seq.to(tl.int64) * stride_bt + offs_n // PAGE_SIZE, mask=key_ok, other=0)
    slots = pages.to(tl.int64) * PAGE_SIZE + offs_n % PAGE_SIZE
    kv_head = head // GROUP_SIZE
    k = tl.load(KeyCache + slots[:, None] * stride_ks + kv_head * stride_kh + offs_r[None, :],
                mask=key_ok[:, None] & rank_ok[None, :], other=0.0)  # fmt: skip  # (N, R)
    s = tl.sum(k.to(tl.float32) * q.to(tl.float32)[None, :], 1)
    s = tl.where(key_ok, s, float("-inf"))
    tl.store(Scores + seq.to(tl.int64) * stride_ss + head * stride_sh + offs_n, s, mask=offs_n < max_context)


@triton.jit
def _loki_attend_kernel(
    Q, KeyCache, ValueCache, BlockTables, Kept, Counts, Out,
    stride_qs, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_bt, stride_kept_s, stride_kept_h,
    stride_os, stride_oh, scale_log2,
    GROUP_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    head = tl.program_id(1)
    count = tl.load(Counts + seq)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_d < HEAD_DIM
    q = tl.load(Q + seq.to(tl.int64) * stride_qs + head * stride_qh + offs_d, mask=col_ok, other=0.0)
    q = q.to(tl.float32)
    kv_head = head // GROUP_SIZE
    table = BlockTables + seq.to(tl.int64) * stride_bt
    kept = Kept + seq.to(tl.int64) * stride_kept_s + head * stride_kept_h
    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)
    l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for start in range(0, count, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        key_ok = offs_n < count
        positions = tl.load(kept + offs_n, mask=key_ok, other=0)
        pages = tl.load(table + positions // PAGE_SIZE, mask=key_ok, other=0)
        slots = pages.to(tl.int64) * PAGE_SIZE + positions % PAGE_SIZE
        tile_ok = key_ok[:, None] & col_ok[None, :]
        rows = slots[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :]
        k = tl.load(KeyCache + rows, mask=tile_ok, other=0.0)  # (N, D)
        s = tl.sum(k.to(tl.float32) * q[None, :], 1) * scale_log2
        s = tl.where(key_ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        p = tl.math.exp2(s - m_new)
        alpha = tl.math.exp2(m_i - m_new)
        value_rows = slots[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :]
        v = tl.load(ValueCache + value_rows, mask=tile_ok, other=0.0)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m_i = m_new
    out = acc / l_i
    tl.store(Out + seq.to(tl.int64) * stride_os + head * stride_oh + offs_d, out.to(Out.dtype.element_ty),
             mask=col_ok)  # fmt: skip


def loki_counts(context_lens: torch.Tensor, top_k: float, sliding_window: int | None) -> torch.Tensor:
    """(M,) int32 keys each sequence keeps: num_selected of its visible keys (the window's, with one), on
    context_lens' device. The same for every layer of a step: the engine computes it once a step."""
    window = sliding_window or 0
    visible = context_lens.long().clamp(max=window) if window else context_lens.long()
    counts = torch.ceil(top_k * visible.double() - 1e-9).long().clamp(min=1)
    return torch.minimum(counts, visible).to(torch.int32)


def loki_decode_triton(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    rank: int,
    top_k: float,
    scale: float,
    sliding_window: int | None,
    max_context: int,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """loki_decode_attention's arguments (q (M, H, D) rotated, pools (slots, KVH, D)), with `max_context`
    at least every context_lens entry and `counts` loki_counts(context_lens, top_k, sliding_window) where
    the caller has it -> (M, H, D) in q's dtype."""
    num_seqs, num_heads, head_dim = q.shape
    group = num_heads // key_cache.shape[1]
    window = sliding_window or 0
    if counts is None:
        counts = loki_counts(context_lens, top_k, sliding_window)
    # count grows with the visible keys, so the longest context sets the most kept: no sync to find it
    most_visible = min(max_context, window) if window else max_context
    most_kept = max(1, min(most_visible, math.ceil(top_k * most_visible - 1e-9)))
    scores = torch.empty(num_seqs, num_heads, max_context, dtype=torch.float32, device=q.device)
    _loki_scores_kernel[(num_seqs, num_heads, triton.cdiv(max_context, SCORE_TILE))](
        q, key_cache, block_tables, context_lens, scores,
        q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1), block_tables.stride(0),
        scores.stride(0), scores.stride(1), max_context, window,
        RANK=rank, BLOCK_R=max(16, triton.next_power_of_2(rank)), GROUP_SIZE=group, BLOCK_N=SCORE_TILE,
        PAGE_SIZE=block_size, HAS_WINDOW=window > 0,
    )  # fmt: skip
    kept = scores.topk(most_kept, dim=-1, sorted=True).indices.to(torch.int32)  # (M, H, most_kept)
    out = torch.empty_like(q)
    _loki_attend_kernel[(num_seqs, num_heads)](
        q, key_cache, value_cache, block_tables, kept, counts, out,
        q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1), value_cache.stride(0),
        value_cache.stride(1), block_tables.stride(0), kept.stride(0), kept.stride(1), out.stride(0),
        out.stride(1), scale * LOG2_E,
        GROUP_SIZE=group, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_N=ATTEND_TILE, PAGE_SIZE=block_size,
    )  # fmt: skip
    return out
