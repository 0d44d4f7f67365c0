"""Flash attention's backward (FlashAttention-2): gradients recomputed from q, k, v and the forward's
log-sum-exp, one key block at a time, so the (T, S) probabilities are never stored.

Two kernels, neither with atomics: `_dkdv_kernel` owns a block of keys of one key/value head and loops
over every query block of each query head in its group (grouped-query attention without repeating K/V);
`_dq_kernel` owns a block of queries and loops over the keys. With P = softmax (recomputed) and
delta = rowsum(dO * O): dV = P^T dO, dS = P * (dO V^T - delta), dQ = dS K * scale, dK = dS^T Q * scale.
"""

from __future__ import annotations

import torch

from kiln.kernels.flash_attention_common import AttentionProblem, launch, load_tile, sequence_bounds
from kiln.kernels.jit import autotuned, tl, triton


@triton.jit
def _accumulate_dkdv(
    dk, dv, k, v, Q, DO, Lse, Delta, stride_qt, stride_ot, offs_n, offs_d, col_ok, first_query, num_queries,
    key_offset, slope, scale_log2,
    CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, PAD_D: tl.constexpr, DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Add one query head's contributions to a key block's dK, dV (N, D), query block by query block.
    Q/DO point at the head's first query row, Lse/Delta at its first row of statistics."""
    for start_m in range(first_query, num_queries, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < num_queries
        q = load_tile(
            Q + offs_m[:, None] * stride_qt + offs_d[None, :], row_ok[:, None], col_ok[None, :], True, PAD_D
        )
        do = load_tile(
            DO + offs_m[:, None] * stride_ot + offs_d[None, :], row_ok[:, None], col_ok[None, :], True, PAD_D
        )
        if DOT_F32:
            q, do = q.to(tl.float32), do.to(tl.float32)
        # +inf log-sum-exp makes the padding rows' probabilities exactly 0
        lse = tl.load(Lse + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + offs_m, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2  # (N, M)
        if HAS_ALIBI:
            s_t += slope * (offs_n[:, None] - offs_m[None, :] - key_offset).to(tl.float32)
        p_t = tl.math.exp2(s_t - lse[None, :])
        if CAUSAL:
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + key_offset, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (N, M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, CuSeqlens, Slopes,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot, stride_lse_h,
    seqlen_q, seqlen_k, seqlen_bucket, scale_log2, softmax_scale,
    NUM_HEADS: tl.constexpr, GROUP_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, VARLEN: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # grid (cdiv(longest key run, BLOCK_N), B * KVH). DK/DV share K/V's strides, DO shares Q's.
    start_n = tl.program_id(0) * BLOCK_N
    num_kv_heads: tl.constexpr = NUM_HEADS // GROUP_SIZE
    batch = tl.program_id(1) // num_kv_heads
    kv_head = tl.program_id(1) % num_kv_heads
    q_start, num_queries = sequence_bounds(CuSeqlens, batch, seqlen_q, VARLEN)
    k_start, num_keys = sequence_bounds(CuSeqlens, batch, seqlen_k, VARLEN)
    if start_n >= num_keys:
        return
    key_offset = num_keys - num_queries
    batch64 = batch.to(tl.int64)
    kv_base = batch64 * stride_kb + kv_head * stride_kh + k_start.to(tl.int64) * stride_kt
    K += kv_base
    DK += kv_base
    V += batch64 * stride_vb + kv_head * stride_vh + k_start.to(tl.int64) * stride_vt
    DV += batch64 * stride_vb + kv_head * stride_vh + k_start.to(tl.int64) * stride_vt
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = offs_n < num_keys
    col_ok = offs_d < HEAD_DIM
    pad_d: tl.constexpr = HEAD_DIM != BLOCK_D
    k = load_tile(
        K + offs_n[:, None] * stride_kt + offs_d[None, :], key_ok[:, None], col_ok[None, :], True, pad_d
    )
    v = load_tile(
        V + offs_n[:, None] * stride_vt + offs_d[None, :], key_ok[:, None], col_ok[None, :], True, pad_d
    )
    if DOT_F32:
        k, v = k.to(tl.float32), v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    first_query = 0
    if CAUSAL:  # earlier queries see none of these keys
        first_query = tl.maximum(start_n - key_offset, 0) // BLOCK_M * BLOCK_M
    # Rows of DK/DV past num_keys are never stored, so only the causal mask matters in the loop.
    for group_index in range(GROUP_SIZE):  # the query heads that share this key/value head
        head = kv_head * GROUP_SIZE + group_index
        q_base = batch64 * stride_qb + head * stride_qh + q_start.to(tl.int64) * stride_qt
        o_base = batch64 * stride_ob + head * stride_oh + q_start.to(tl.int64) * stride_ot
        if VARLEN:
            row_base = head * stride_lse_h + q_start
        else:
            row_base = head * stride_lse_h + batch * seqlen_q
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(Slopes + head).to(tl.float32) * 1.4426950408889634
        dk, dv = _accumulate_dkdv(
            dk, dv, k, v, Q + q_base, DO + o_base, Lse + row_base, Delta + row_base, stride_qt, stride_ot,
            offs_n, offs_d, col_ok, first_query, num_queries, key_offset, slope, scale_log2,
            CAUSAL, HAS_ALIBI, pad_d, DOT_F32, PRECISION, BLOCK_M,
        )  # fmt: skip
    mask = key_ok[:, None] & col_ok[None, :]
    dk_ptrs = DK + offs_n[:, None] * stride_kt + offs_d[None, :]
    tl.store(dk_ptrs, (dk * softmax_scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + offs_n[:, None] * stride_vt + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _accumulate_dq(
    q, do, lse, delta, K, V, stride_kt, stride_vt, offs_m, offs_d, col_ok, end, num_keys, key_offset, slope,
    scale_log2,
    CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, PAD_D: tl.constexpr, DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dQ (M, D) of a query block (unscaled), key block by key block over keys [0, end)."""
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < num_keys
        k = load_tile(
            K + offs_n[:, None] * stride_kt + offs_d[None, :], key_ok[:, None], col_ok[None, :], True, PAD_D
        )
        v = load_tile(
            V + offs_n[:, None] * stride_vt + offs_d[None, :], key_ok[:, None], col_ok[None, :], True, PAD_D
        )
        if DOT_F32:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # (M, N)
        if HAS_ALIBI:
            s += slope * (offs_n[None, :] - offs_m[:, None] - key_offset).to(tl.float32)
        visible = key_ok[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + key_offset)
        p = tl.where(visible, tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, CuSeqlens, Slopes,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot, stride_lse_h,
    seqlen_q, seqlen_k, seqlen_bucket, scale_log2, softmax_scale,
    NUM_HEADS: tl.constexpr, GROUP_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, VARLEN: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # grid (cdiv(longest query run, BLOCK_M), B * H). DQ shares Q's strides, DO its own.
    start_m = tl.program_id(0) * BLOCK_M
    batch = tl.program_id(1) // NUM_HEADS
    head = tl.program_id(1) % NUM_HEADS
    kv_head = head // GROUP_SIZE
    q_start, num_queries = sequence_bounds(CuSeqlens, batch, seqlen_q, VARLEN)
    k_start, num_keys = sequence_bounds(CuSeqlens, batch, seqlen_k, VARLEN)
    if start_m >= num_queries:
        return
    key_offset = num_keys - num_queries
    batch64 = batch.to(tl.int64)
    q_base = batch64 * stride_qb + head * stride_qh + q_start.to(tl.int64) * stride_qt
    K += batch64 * stride_kb + kv_head * stride_kh + k_start.to(tl.int64) * stride_kt
    V += batch64 * stride_vb + kv_head * stride_vh + k_start.to(tl.int64) * stride_vt
    DO += batch64 * stride_ob + head * stride_oh + q_start.to(tl.int64) * stride_ot
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < num_queries
    col_ok = offs_d < HEAD_DIM
    pad_d: tl.constexpr = HEAD_DIM != BLOCK_D
    q = load_tile(Q + q_base + offs_m[:, None] * stride_qt + offs_d[None, :], row_ok[:, None],
                  col_ok[None, :], True, pad_d)  # fmt: skip
    do = load_tile(
        DO + offs_m[:, None] * stride_ot + offs_d[None, :], row_ok[:, None], col_ok[None, :], True, pad_d
    )
    if DOT_F32:
        q, do = q.to(tl.float32), do.to(tl.float32)
    if VARLEN:
        row_base = head * stride_lse_h + q_start
    else:
        row_base = head * stride_lse_h + batch * seqlen_q
    lse = tl.load(Lse + row_base + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + head).to(tl.float32) * 1.4426950408889634
    end = num_keys
    if CAUSAL:
        end = tl.minimum(start_m + BLOCK_M + key_offset, num_keys)
    dq = _accumulate_dq(
        q, do, lse, delta, K, V, stride_kt, stride_vt, offs_m, offs_d, col_ok, end, num_keys, key_offset,
        slope, scale_log2, CAUSAL, HAS_ALIBI, pad_d, DOT_F32, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D,
    )  # fmt: skip
    dq_ptrs = DQ + q_base + offs_m[:, None] * stride_qt + offs_d[None, :]
    tl.store(dq_ptrs, (dq * softmax_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _configs(shapes):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


_KEY = ["HEAD_DIM", "CAUSAL", "GROUP_SIZE", "seqlen_bucket"]
# (BLOCK_M, BLOCK_N, warps, stages) for H100 (sm_90). At head dim 128 in bf16 every dK/dV tile spills a
# little (the fewest bytes first; python -m tests.kernels.compile_sm90 prints them); the larger tiles
# are for head dim 64. The dQ tiles compile without spills.
_dkdv_tuned = autotuned(
    _dkdv_kernel,
    _configs([(16, 64, 8, 2), (32, 64, 8, 2), (64, 64, 8, 2), (16, 32, 4, 2), (64, 128, 8, 2)]),
    _KEY,
)
_dq_tuned = autotuned(
    _dq_kernel, _configs([(64, 64, 8, 2), (32, 64, 4, 2), (128, 64, 8, 3), (64, 128, 8, 3)]), _KEY
)


def _with_gradient_buffer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x and an empty gradient with x's strides (the kernels address both with one set of strides)."""
    grad = torch.empty_like(x)
    if grad.stride() != x.stride():  # x was not dense; empty_like made the gradient contiguous
        x = x.contiguous()
    return x, grad


def attention_backward(problem: AttentionProblem, q, k, v, out, lse, grad_out):
    """(dq, dk, dv) for the saved forward; every tensor has a contiguous last dimension."""
    delta = (out.float() * grad_out.float()).sum(-1)  # (B, H, T) or (N, H): rowsum(dO * O)
    delta = delta.t() if problem.varlen else delta.transpose(0, 1).reshape(problem.num_heads, -1)
    delta = delta.contiguous()  # (H, rows), laid out as lse
    (q, dq), (k, dk), (v, dv) = (_with_gradient_buffer(x) for x in (q, k, v))
    cu_seqlens, slopes = problem.pointers(q)
    strides = [*problem.strides(q), *problem.strides(k), *problem.strides(v), *problem.strides(grad_out)]
    sizes = [lse.stride(0), problem.seqlen_q, problem.seqlen_k, triton.next_power_of_2(problem.seqlen_q)]
    scales = [problem.scale * 1.4426950408889634, problem.scale]
    constants = problem.constants(q.dtype)
    dkdv_args = [q, k, v, grad_out, lse, delta, dk, dv, cu_seqlens, slopes, *strides, *sizes, *scales]
    grid = (problem.seqlen_k, problem.batch * problem.num_kv_heads)
    launch(_dkdv_tuned, _dkdv_kernel, grid, dkdv_args, constants, block="BLOCK_N")
    dq_args = [q, k, v, grad_out, lse, delta, dq, cu_seqlens, slopes, *strides, *sizes, *scales]
    launch(_dq_tuned, _dq_kernel, (problem.seqlen_q, problem.batch * problem.num_heads), dq_args, constants)
    return dq, dk, dv
