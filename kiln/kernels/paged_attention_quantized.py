"""Paged decode attention over a quantized KV pool (int8 / int4 codes, an fp16 scale and a uint8 zero
point per token and kv head, kiln/kernels/kv_quant.py), dequantized tile by tile inside the Triton kernel:
the context is never copied out in full precision.

Same launch as kiln/kernels/paged_attention.py (GQA-aware programs, split-K with the same combine kernel).
An int4 row's byte d holds values d and d + D / 2, so a program works on the two half rows side by side:
q splits into halves, each key tile's scores are the sum of two dots, and the output is two half rows.
The reference is `paged_decode_quantized_reference`: dequantize the pool, then `paged_decode_reference`.
"""

from __future__ import annotations

import torch

from kiln.kernels.jit import DOT_IN_FP32, dot_precision, tl, triton
from kiln.kernels.kv_quant import dequantize_kv
from kiln.kernels.paged_attention import (
    KEY_TILE,
    LOG2_E,
    _combine_splits,
    _split_keys,
    _split_lse,
    _split_outputs,
    paged_decode_reference,
)


def paged_decode_quantized_reference(
    q, key_codes, value_codes, key_params, value_params, bits, block_tables, context_lens, block_size,
    **options,
):  # fmt: skip
    """Dequantize the whole pool (slots, KVH, D) in fp32, then the unquantized reference."""
    keys = dequantize_kv(key_codes, key_params, bits, torch.float32)
    values = dequantize_kv(value_codes, value_params, bits, torch.float32)
    return paged_decode_reference(q, keys, values, block_tables, context_lens, block_size, **options)


@triton.jit
def _dequantize(Codes, Params, slots, stride_s, stride_ps, offs_p, tile_ok, key_ok, INT4: tl.constexpr):
    """A key tile's two half rows (INT4) or whole rows (int8) in fp32, (N, P) each (the second is unused
    for int8)."""
    codes = tl.load(Codes + slots[:, None] * stride_s + offs_p[None, :], mask=tile_ok, other=0)
    # params: the scale's fp16 bits (little-endian), then the zero point
    scale_low = tl.load(Params + slots * stride_ps, mask=key_ok, other=0).to(tl.uint16)
    scale_high = tl.load(Params + slots * stride_ps + 1, mask=key_ok, other=0).to(tl.uint16)
    scale = (scale_low | (scale_high << 8)).to(tl.float16, bitcast=True).to(tl.float32)[:, None]
    zero = tl.load(Params + slots * stride_ps + 2, mask=key_ok, other=0).to(tl.float32)[:, None]
    if INT4:
        low = ((codes & 15).to(tl.float32) - zero) * scale
        high = ((codes >> 4).to(tl.float32) - zero) * scale
        return low, high
    whole = (codes.to(tl.float32) - zero) * scale
    return whole, whole


@triton.jit
def _quantized_decode_kernel(
    Q, KeyCodes, ValueCodes, KeyParams, ValueParams, BlockTables, ContextLens, Slopes, Out, PartialOut,
    PartialLse,
    stride_qs, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_kps, stride_kph, stride_vps,
    stride_vph, stride_bt, stride_os, stride_oh, keys_per_split, sliding_window, scale_log2,
    NUM_SPLITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    PACKED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    INT4: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    # grid (S, KVH, NUM_SPLITS); part a = values [0, PACKED), part b (INT4) = values [PACKED, HEAD_DIM).
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_keys, lo, hi = _split_keys(ContextLens, seq, split, keys_per_split, sliding_window, HAS_WINDOW)
    offs_g = tl.arange(0, BLOCK_G)
    offs_p = tl.arange(0, BLOCK_P)
    heads = kv_head * GROUP_SIZE + offs_g
    head_ok = offs_g < GROUP_SIZE
    col_ok = offs_p < PACKED
    q_at = Q + seq.to(tl.int64) * stride_qs + heads[:, None] * stride_qh + offs_p[None, :]
    q_mask = head_ok[:, None] & col_ok[None, :]
    q_a = tl.load(q_at, mask=q_mask, other=0.0)  # (G, P)
    q_b = q_a
    if INT4:
        q_b = tl.load(q_at + PACKED, mask=q_mask, other=0.0)
    # Dots in fp32 for an fp32 q (and under the interpreter), else in q's dtype on tensor cores.
    if DOT_F32:
        q_a, q_b = q_a.to(tl.float32), q_b.to(tl.float32)
    slopes = tl.zeros([BLOCK_G], tl.float32)
    if HAS_ALIBI:
        slopes = tl.load(Slopes + heads, mask=head_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    table = BlockTables + seq.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc_a = tl.zeros([BLOCK_G, BLOCK_P], tl.float32)
    acc_b = tl.zeros([BLOCK_G, BLOCK_P], tl.float32)
    for start_n in range(lo // BLOCK_N * BLOCK_N, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = (offs_n >= lo) & (offs_n < hi)
        pages = tl.load(table + offs_n // PAGE_SIZE, mask=key_ok, other=0).to(tl.int64)
        slots = pages * PAGE_SIZE + offs_n % PAGE_SIZE
        tile_ok = key_ok[:, None] & col_ok[None, :]
        k_a, k_b = _dequantize(KeyCodes + kv_head * stride_kh, KeyParams + kv_head * stride_kph, slots,
                               stride_ks, stride_kps, offs_p, tile_ok, key_ok, INT4)  # fmt: skip
        s = tl.dot(q_a, tl.trans(k_a.to(q_a.dtype)), input_precision=PRECISION)  # (G, N)
        if INT4:
            s += tl.dot(q_b, tl.trans(k_b.to(q_a.dtype)), input_precision=PRECISION)
        s = s * scale_log2
        if HAS_ALIBI:
            s += slopes[:, None] * (offs_n - (num_keys - 1)).to(tl.float32)[None, :]
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_a, v_b = _dequantize(ValueCodes + kv_head * stride_vh, ValueParams + kv_head * stride_vph, slots,
                               stride_vs, stride_vps, offs_p, tile_ok, key_ok, INT4)  # fmt: skip
        acc_a = tl.dot(p.to(q_a.dtype), v_a.to(q_a.dtype), acc_a * alpha[:, None], input_precision=PRECISION)
        if INT4:
            acc_b = tl.dot(
                p.to(q_a.dtype), v_b.to(q_a.dtype), acc_b * alpha[:, None], input_precision=PRECISION
            )
        m_i = m_new
    norm = tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_a, out_b = acc_a / norm, acc_b / norm
    out_mask = head_ok[:, None] & col_ok[None, :]
    if NUM_SPLITS == 1:
        out_at = Out + seq.to(tl.int64) * stride_os + heads[:, None] * stride_oh + offs_p[None, :]
        tl.store(out_at, out_a.to(Out.dtype.element_ty), mask=out_mask)
        if INT4:
            tl.store(out_at + PACKED, out_b.to(Out.dtype.element_ty), mask=out_mask)
    else:
        row = (seq.to(tl.int64) * (GROUP_SIZE * tl.num_programs(1)) + heads) * NUM_SPLITS + split  # (G,)
        partial_at = PartialOut + row[:, None] * HEAD_DIM + offs_p[None, :]
        tl.store(partial_at, out_a, mask=out_mask)
        if INT4:
            tl.store(partial_at + PACKED, out_b, mask=out_mask)
        tl.store(PartialLse + row, _split_lse(m_i, l_i), mask=head_ok)


def paged_decode_attention_quantized(
    q: torch.Tensor,
    key_codes: torch.Tensor,
    value_codes: torch.Tensor,
    key_params: torch.Tensor,
    value_params: torch.Tensor,
    bits: int,
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
    """`kiln.kernels.paged_attention.paged_decode_attention` over a quantized pool: key/value_codes uint8
    (slots, KVH, D or D / 2 for int4), key/value_params uint8 (slots, KVH, 3). Returns (S, H, D) in q's
    dtype."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, packed = key_codes.shape[1], key_codes.shape[2]
    assert packed == (head_dim if bits == 8 else head_dim // 2), "codes do not match head_dim and bits"
    assert key_codes.stride(2) == 1 and key_params.stride(2) == 1, "rows must be contiguous"
    group = num_heads // num_kv_heads
    block_n = KEY_TILE
    splits, keys_per_split, out, partial_out, partial_lse = _split_outputs(
        q, num_kv_heads, max_context, block_n, num_splits
    )
    scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
    _quantized_decode_kernel[(num_seqs, num_kv_heads, splits)](
        q, key_codes, value_codes, key_params, value_params, block_tables, context_lens,
        alibi_slopes.float().contiguous() if alibi_slopes is not None else q, out, partial_out, partial_lse,
        q.stride(0), q.stride(1), key_codes.stride(0), key_codes.stride(1), value_codes.stride(0),
        value_codes.stride(1), key_params.stride(0), key_params.stride(1), value_params.stride(0),
        value_params.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        keys_per_split, sliding_window or 0, scale * LOG2_E,
        NUM_SPLITS=splits, GROUP_SIZE=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, PACKED=packed, BLOCK_P=max(16, triton.next_power_of_2(packed)), BLOCK_N=block_n,
        PAGE_SIZE=block_size, INT4=bits == 4, HAS_ALIBI=alibi_slopes is not None,
        HAS_WINDOW=sliding_window is not None, DOT_F32=DOT_IN_FP32 or q.dtype == torch.float32,
        PRECISION=dot_precision(q.dtype), num_warps=8, num_stages=2,
    )  # fmt: skip
    if splits > 1:
        _combine_splits(partial_out, partial_lse, out)
    return out
