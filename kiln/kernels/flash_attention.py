"""Flash attention: softmax(q k^T * scale + bias) v without materialising the (T, S) scores.

One Triton kernel for every case the models need: causal or not, grouped/multi-query heads (each query
head reads its key/value head in place, nothing is repeated), ALiBi slopes, head dims padded to a power
of two, fp32/fp16/bf16 inputs with fp32 accumulation, and variable-length packed sequences (`cu_seqlens`)
for padding-free training. The online softmax works in base 2 (exp2) with the scale folded in; the
forward saves each row's log-sum-exp so the backward (flash_attention_backward.py) recomputes the
probabilities block by block instead of storing them.

Conventions (as flash-attn's): a causal query i of a (T, S) problem sees keys j <= i + S - T (the queries
are the last T positions); ALiBi adds slope * (j - (i + S - T)), which equals BLOOM's slope * j up to a
per-row constant that softmax removes.
"""

from __future__ import annotations

import torch

from kiln.errors import KilnError
from kiln.kernels.flash_attention_backward import attention_backward
from kiln.kernels.flash_attention_common import (
    LOG2_E,
    AttentionProblem,
    contiguous_last,
    launch,
    load_tile,
    sequence_bounds,
)
from kiln.kernels.jit import autotuned, tl, triton

# ---------------------------------------------------------------------------------------- torch reference


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The definition in fp32 torch, with the same signature as `flash_attention` (repeats K/V per group)."""
    if cu_seqlens is None:
        return _dense_reference(q, k, v, causal, softmax_scale, alibi_slopes)
    outs = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        # (L, H, D) -> (1, H, L, D) and back
        parts = (x[start:end].transpose(0, 1)[None] for x in (q, k, v))
        outs.append(_dense_reference(*parts, causal, softmax_scale, alibi_slopes)[0].transpose(0, 1))
    return torch.cat(outs)


def _dense_reference(q, k, v, causal, softmax_scale, alibi_slopes):
    # q (B, H, T, D), k/v (B, KVH, S, D)
    group = q.shape[1] // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    k, v = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    scores = q.float() @ k.transpose(-1, -2) * scale  # (B, H, T, S)
    num_queries, num_keys = q.shape[2], k.shape[2]
    query_positions = torch.arange(num_queries, device=q.device)[:, None] + num_keys - num_queries
    key_positions = torch.arange(num_keys, device=q.device)[None, :]
    if alibi_slopes is not None:
        scores = scores + alibi_slopes.float()[:, None, None] * (key_positions - query_positions)
    if causal:
        scores = scores.masked_fill(key_positions > query_positions, float("-inf"))
    return (scores.softmax(-1) @ v).to(q.dtype)


# ---------------------------------------------------------------------------------------------- forward


@triton.jit
def _attend_key_blocks(
    acc, m_i, l_i, q, K, V, stride_kt, stride_vt, offs_m, offs_d, lo, hi, num_keys, key_offset, slope,
    scale_log2,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Online softmax over key blocks [lo, hi). MASKED blocks may cross the causal diagonal or the end of
    the keys; the others are entirely visible and skip the masks. Scores are in log2 units."""
    col_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < num_keys
        k_t = load_tile(K + offs_n[None, :] * stride_kt + offs_d[:, None], key_ok[None, :], col_ok[:, None],
                        MASKED, HEAD_DIM != BLOCK_D)  # fmt: skip  # (D, N)
        v = load_tile(V + offs_n[:, None] * stride_vt + offs_d[None, :], key_ok[:, None], col_ok[None, :],
                      MASKED, HEAD_DIM != BLOCK_D)  # fmt: skip  # (N, D)
        if DOT_F32:
            k_t, v = k_t.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, k_t, input_precision=PRECISION) * scale_log2  # (M, N)
        if HAS_ALIBI:
            s += slope * (offs_n[None, :] - offs_m[:, None] - key_offset).to(tl.float32)
        if MASKED:
            visible = key_ok[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + key_offset)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _forward_kernel(
    Q, K, V, Out, Lse, CuSeqlens, Slopes,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot, stride_lse_h,
    seqlen_q, seqlen_k, seqlen_bucket, scale_log2,
    NUM_HEADS: tl.constexpr, GROUP_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, VARLEN: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # grid (cdiv(longest query run, BLOCK_M), B * H); Lse (H, B * T | total) in log2 units.
    start_m = tl.program_id(0) * BLOCK_M
    batch = tl.program_id(1) // NUM_HEADS
    head = tl.program_id(1) % NUM_HEADS
    kv_head = head // GROUP_SIZE
    q_start, num_queries = sequence_bounds(CuSeqlens, batch, seqlen_q, VARLEN)
    k_start, num_keys = sequence_bounds(CuSeqlens, batch, seqlen_k, VARLEN)
    if start_m >= num_queries:
        return
    key_offset = num_keys - num_queries  # causal alignment: queries are the last positions
    batch64 = batch.to(tl.int64)
    Q += batch64 * stride_qb + head * stride_qh + q_start.to(tl.int64) * stride_qt
    K += batch64 * stride_kb + kv_head * stride_kh + k_start.to(tl.int64) * stride_kt
    V += batch64 * stride_vb + kv_head * stride_vh + k_start.to(tl.int64) * stride_vt
    Out += batch64 * stride_ob + head * stride_oh + q_start.to(tl.int64) * stride_ot
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < num_queries
    col_ok = offs_d < HEAD_DIM
    q = load_tile(Q + offs_m[:, None] * stride_qt + offs_d[None, :], row_ok[:, None], col_ok[None, :],
                  True, HEAD_DIM != BLOCK_D)  # fmt: skip
    if DOT_F32:
        q = q.to(tl.float32)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + head).to(tl.float32) * 1.4426950408889634  # into log2 units
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if CAUSAL:  # key blocks every query row of this block sees entirely, then those crossing the diagonal
        unmasked_end = tl.minimum(start_m + key_offset + 1, num_keys) // BLOCK_N * BLOCK_N
        masked_end = tl.minimum(start_m + BLOCK_M + key_offset, num_keys)
    else:
        unmasked_end = num_keys // BLOCK_N * BLOCK_N
        masked_end = num_keys
    unmasked_end = tl.maximum(unmasked_end, 0)
    acc, m_i, l_i = _attend_key_blocks(
        acc, m_i, l_i, q, K, V, stride_kt, stride_vt, offs_m, offs_d, 0, unmasked_end, num_keys,
        key_offset, slope, scale_log2,
        False, CAUSAL, HAS_ALIBI, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_F32, PRECISION,
    )  # fmt: skip
    acc, m_i, l_i = _attend_key_blocks(
        acc, m_i, l_i, q, K, V, stride_kt, stride_vt, offs_m, offs_d, unmasked_end, masked_end, num_keys,
        key_offset, slope, scale_log2,
        True, CAUSAL, HAS_ALIBI, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_F32, PRECISION,
    )  # fmt: skip
    out = acc / l_i[:, None]
    tl.store(Out + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])  # fmt: skip
    if VARLEN:
        Lse += head * stride_lse_h + q_start
    else:
        Lse += head * stride_lse_h + batch * seqlen_q
    tl.store(Lse + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


def _forward_configs():
    # (BLOCK_M, BLOCK_N, warps, stages) for H100 (sm_90): at head dim 128 in bf16 the first four compile
    # without register spills, or nearly (python -m tests.kernels.compile_sm90); 128 x 128 suits head dim 64.
    shapes = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 4), (128, 128, 8, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


_forward_tuned = autotuned(_forward_kernel, _forward_configs(), ["HEAD_DIM", "CAUSAL", "seqlen_bucket"])
# ----------------------------------------------------------------------------------------- the function


def _forward(problem: AttentionProblem, q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    if problem.varlen:
        out = torch.empty_like(q)
    else:  # (B, T, H, D) memory seen as (B, H, T, D): the model's next reshape is then free
        out = torch.empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=q.dtype, device=q.device)
        out = out.transpose(1, 2)
    lse = torch.empty(problem.num_heads, problem.total_q, dtype=torch.float32, device=q.device)
    cu_seqlens, slopes = problem.pointers(q)
    args = [q, k, v, out, lse, cu_seqlens, slopes]
    args += [
        *problem.strides(q),
        *problem.strides(k),
        *problem.strides(v),
        *problem.strides(out),
        lse.stride(0),
    ]
    args += [problem.seqlen_q, problem.seqlen_k, triton.next_power_of_2(problem.seqlen_q)]
    args += [problem.scale * LOG2_E]
    grid_cols = problem.batch * problem.num_heads
    launch(_forward_tuned, _forward_kernel, (problem.seqlen_q, grid_cols), args, problem.constants(q.dtype))
    return out, lse


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, alibi_slopes, cu_seqlens, max_seqlen):
        problem = AttentionProblem(q, k, v, causal, softmax_scale, alibi_slopes, cu_seqlens, max_seqlen)
        q, k, v = (contiguous_last(x) for x in (q, k, v))
        out, lse = _forward(problem, q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.problem = problem
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        grads = attention_backward(ctx.problem, q, k, v, out, lse, contiguous_last(grad_out))
        return *grads, None, None, None, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Attention with the Triton flash kernels (forward and backward).

    q (B, H, T, D) and k, v (B, KVH, S, D), as `F.scaled_dot_product_attention` takes them (any strides
    with a contiguous last dimension); or packed sequences q (N, H, D), k/v (N, KVH, D) with
    cu_seqlens (num_seqs + 1,) int, the cumulative sequence lengths, and optionally their max_seqlen.
    H must be a multiple of KVH. alibi_slopes (H,) adds slope * (key - query position). Under autocast
    the inputs are cast to the autocast dtype, as SDPA's are. Returns q's shape and dtype.
    """
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    elif not q.dtype == k.dtype == v.dtype:
        raise KilnError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return FlashAttentionFunction.apply(q, k, v, causal, softmax_scale, alibi_slopes, cu_seqlens, max_seqlen)


def attention_flops(batch: int, num_heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, causal: bool):
    """Forward matmul FLOPs (2 * 2 * B * H * T * S * D, halved when causal); backward is 2.5x this."""
    flops = 4 * batch * num_heads * seqlen_q * seqlen_k * head_dim
    return flops // 2 if causal else flops
