"""Paged decode attention: one new query token per sequence, attending its keys where a paged KV pool
holds them (slot = block * block_size + offset, found through each sequence's block table).

The Triton kernel is GQA-aware (a program loads each key/value tile once for all the query heads that
share it) and splits long contexts over several programs (split-K, as flash-decoding does): each split
writes a partial output and its log-sum-exp, and a second kernel combines them. The engine's backend
around it is `kiln.engine.attention.TritonPagedAttention`.
"""

from __future__ import annotations

import torch

from kiln.kernels.jit import DOT_IN_FP32, dot_precision, tl, triton

LOG2_E = 1.4426950408889634
KEY_TILE = 64  # keys per loop step, gathered token by token, so any page size works


def paged_decode_reference(
    q, key_cache, value_cache, block_tables, context_lens, block_size, softmax_scale=None, alibi_slopes=None,
    sliding_window=None,
):  # fmt: skip
    """q (S, H, D); key/value_cache (slots, KVH, D); block_tables (S, max_blocks); context_lens (S,).
    Each sequence's one query sits at position context_len - 1. Returns (S, H, D), in fp32 torch."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
    outs = []
    for seq, length in enumerate(context_lens.tolist()):
        positions = torch.arange(length, device=q.device)
        slots = block_tables[seq].long()[positions // block_size] * block_size + positions % block_size
        group = num_heads // key_cache.shape[1]
        keys = key_cache[slots].float().repeat_interleave(group, 1)  # (L, H, D)
        values = value_cache[slots].float().repeat_interleave(group, 1)
        scores = torch.einsum("hd,lhd->hl", q[seq].float(), keys) * scale  # (H, L)
        if alibi_slopes is not None:
            scores = scores + alibi_slopes.float()[:, None] * (positions - (length - 1))
        if sliding_window is not None:
            scores = scores.masked_fill(length - 1 - positions >= sliding_window, float("-inf"))
        outs.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), values))
    return torch.stack(outs).to(q.dtype)


@triton.jit
def _split_keys(ContextLens, seq, split, keys_per_split, sliding_window, HAS_WINDOW: tl.constexpr):
    """The sequence's key count and the keys [lo, hi) this split attends (within the window, if any)."""
    num_keys = tl.load(ContextLens + seq)
    first_key = 0
    if HAS_WINDOW:
        first_key = tl.maximum(num_keys - sliding_window, 0)
    lo = tl.maximum(split * keys_per_split, first_key)
    hi = tl.minimum((split + 1) * keys_per_split, num_keys)
    return num_keys, lo, hi


@triton.jit
def _split_lse(m_i, l_i):
    """A split's log2-sum-exp2 per row; -inf where it saw no key (zero weight when splits combine)."""
    return tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i)))


@triton.jit
def _attend_pages(
    q, KeyCache, ValueCache, Table, stride_ks, stride_vs, offs_d, col_ok, lo, hi, num_keys, slopes,
    scale_log2,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HAS_ALIBI: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Online softmax of q (G, D) over key positions [lo, hi) of one sequence and key/value head, gathered
    BLOCK_N at a time through the block table. Returns (unnormalised output, running max, running sum)."""
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start_n in range(lo // BLOCK_N * BLOCK_N, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = (offs_n >= lo) & (offs_n < hi)
        pages = tl.load(Table + offs_n // PAGE_SIZE, mask=key_ok, other=0).to(tl.int64)
        slots = pages * PAGE_SIZE + offs_n % PAGE_SIZE
        tile_ok = key_ok[:, None] & col_ok[None, :]
        k = tl.load(
            KeyCache + slots[:, None] * stride_ks + offs_d[None, :], mask=tile_ok, other=0.0
        )  # (N, D)
        v = tl.load(ValueCache + slots[:, None] * stride_vs + offs_d[None, :], mask=tile_ok, other=0.0)
        if DOT_F32:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # (G, N)
        if HAS_ALIBI:
            s += slopes[:, None] * (offs_n - (num_keys - 1)).to(tl.float32)[None, :]
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _paged_decode_kernel(
    Q, KeyCache, ValueCache, BlockTables, ContextLens, Slopes, Out, PartialOut, PartialLse,
    stride_qs, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_bt, stride_os, stride_oh,
    keys_per_split, sliding_window, scale_log2,
    NUM_SPLITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_WINDOW: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # grid (S, KVH, NUM_SPLITS). PartialOut (S, H, NUM_SPLITS, D) fp32, PartialLse (S, H, NUM_SPLITS).
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_keys, lo, hi = _split_keys(ContextLens, seq, split, keys_per_split, sliding_window, HAS_WINDOW)
    offs_g = tl.arange(0, BLOCK_G)  # the query heads sharing this key/value head
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP_SIZE + offs_g
    head_ok = offs_g < GROUP_SIZE
    col_ok = offs_d < HEAD_DIM
    q = tl.load(Q + seq.to(tl.int64) * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
                mask=head_ok[:, None] & col_ok[None, :], other=0.0)  # fmt: skip  # (G, D)
    if DOT_F32:
        q = q.to(tl.float32)
    slopes = tl.zeros([BLOCK_G], tl.float32)
    if HAS_ALIBI:
        slopes = tl.load(Slopes + heads, mask=head_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    acc, m_i, l_i = _attend_pages(
        q, KeyCache + kv_head * stride_kh, ValueCache + kv_head * stride_vh,
        BlockTables + seq.to(tl.int64) * stride_bt, stride_ks, stride_vs, offs_d, col_ok, lo, hi,
        num_keys, slopes, scale_log2, BLOCK_G, BLOCK_D, BLOCK_N, PAGE_SIZE, HAS_ALIBI, DOT_F32, PRECISION,
    )  # fmt: skip
    # A split past the context (or before the window) saw no key: l = 0, and its lse of -inf gives it
    # zero weight when the splits are combined.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_mask = head_ok[:, None] & col_ok[None, :]
    if NUM_SPLITS == 1:
        tl.store(Out + seq.to(tl.int64) * stride_os + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=out_mask)  # fmt: skip
    else:
        row = (seq.to(tl.int64) * (GROUP_SIZE * tl.num_programs(1)) + heads) * NUM_SPLITS + split  # (G,)
        tl.store(PartialOut + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=out_mask)
        tl.store(PartialLse + row, _split_lse(m_i, l_i), mask=head_ok)


@triton.jit
def _combine_splits_kernel(
    PartialOut, PartialLse, Out, stride_os, stride_oh,
    NUM_SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # grid (S, H): weight each split's normalised output by its share of the softmax mass
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = (seq.to(tl.int64) * tl.num_programs(1) + head) * NUM_SPLITS
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    split_ok = offs_s < NUM_SPLITS
    lse = tl.load(PartialLse + row + offs_s, mask=split_ok, other=float("-inf"))
    weights = tl.math.exp2(lse - tl.max(lse, 0))
    weights = tl.where(split_ok & (lse > float("-inf")), weights, 0.0)
    mask = split_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    partial = tl.load(PartialOut + (row + offs_s[:, None]) * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
    out = tl.sum(partial * weights[:, None], 0) / tl.sum(weights, 0)
    tl.store(Out + seq.to(tl.int64) * stride_os + head * stride_oh + offs_d, out.to(Out.dtype.element_ty),
             mask=offs_d < HEAD_DIM)  # fmt: skip


def _num_splits(
    num_seqs: int, num_kv_heads: int, max_context: int, block_n: int, device: torch.device
) -> int:
    """Enough splits to give every SM about two programs, each split at least 4 key tiles long."""
    if device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    wanted = triton.cdiv(target, num_seqs * num_kv_heads)
    return max(1, min(wanted, triton.cdiv(max_context, 4 * block_n), 64))


def _split_outputs(
    q: torch.Tensor, num_kv_heads: int, max_context: int, block_n: int, num_splits: int | None
) -> tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The split count, keys per split (whole key tiles), the output, and the splits' partial outputs
    (S, H, splits, D) and log-sum-exps (S, H, splits) in fp32 (the output itself where there is one split)."""
    num_seqs, num_heads, head_dim = q.shape
    splits = num_splits or _num_splits(num_seqs, num_kv_heads, max_context, block_n, q.device)
    keys_per_split = triton.cdiv(triton.cdiv(max_context, splits), block_n) * block_n
    out = torch.empty_like(q)
    partial_out = partial_lse = out  # unused without splits
    if splits > 1:
        partial_out = torch.empty(num_seqs, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
        partial_lse = torch.empty(num_seqs, num_heads, splits, dtype=torch.float32, device=q.device)
    return splits, keys_per_split, out, partial_out, partial_lse


def _combine_splits(partial_out: torch.Tensor, partial_lse: torch.Tensor, out: torch.Tensor) -> None:
    """out (S, H, D) = the splits' partial outputs weighted by their shares of the softmax mass."""
    num_seqs, num_heads, splits, head_dim = partial_out.shape
    _combine_splits_kernel[(num_seqs, num_heads)](
        partial_out, partial_lse, out, out.stride(0), out.stride(1), NUM_SPLITS=splits,
        BLOCK_SPLITS=triton.next_power_of_2(splits), HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
    )  # fmt: skip


def paged_decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    max_context: int,
    *,
    softmax_scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sliding_window: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence over its paged keys/values, with the Triton kernels.

    q (S, H, D); key/value_cache (slots, KVH, D) with slot = block * block_size + offset; block_tables
    (S, max_blocks) int; context_lens (S,) int, the keys per sequence (its query is the last of them),
    at most max_context. alibi_slopes (H,) and sliding_window as the models use them. num_splits
    defaults to a split-K count that fills the GPU. Returns (S, H, D) in q's dtype.
    """
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = key_cache.shape[1]
    group = num_heads // num_kv_heads
    block_n = KEY_TILE
    splits, keys_per_split, out, partial_out, partial_lse = _split_outputs(
        q, num_kv_heads, max_context, block_n, num_splits
    )
    scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
    block_d = max(16, triton.next_power_of_2(head_dim))
    _paged_decode_kernel[(num_seqs, num_kv_heads, splits)](
        q, key_cache, value_cache, block_tables, context_lens,
        alibi_slopes.float().contiguous() if alibi_slopes is not None else q, out, partial_out, partial_lse,
        q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1), value_cache.stride(0),
        value_cache.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        keys_per_split, sliding_window or 0, scale * LOG2_E,
        NUM_SPLITS=splits, GROUP_SIZE=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n, PAGE_SIZE=block_size,
        HAS_ALIBI=alibi_slopes is not None, HAS_WINDOW=sliding_window is not None, DOT_F32=DOT_IN_FP32,
        PRECISION=dot_precision(q.dtype), num_warps=8, num_stages=2,  # 4 warps spill at head dim 128
    )  # fmt: skip
    if splits > 1:
        _combine_splits(partial_out, partial_lse, out)
    return out
