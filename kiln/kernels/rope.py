"""Fused rotary position embedding, applied in place to q and k in one launch (forward and backward).

The torch reference is `apply_rope` below, which the models run when the switch picks torch (Llama's
`rotate_half` layout: the first and second halves of each head are the two coordinates of every rotated
pair). The kernel reads both halves of
cos/sin, so it matches the reference for any tables, not only ones whose halves repeat. The backward is
the inverse rotation: the same kernel with the sines negated and swapped between the halves.

It works on token rows, (N, heads * D) as the q/k projections of a flattened batch produce them: those
are not views, so autograd lets one function overwrite both (it refuses that for views of other tensors).
"""

from __future__ import annotations

import torch

from kiln.kernels.jit import tl, triton
from kiln.kernels.runtime import interpreted


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); cos/sin (B, T, D). The torch reference, out of place."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q (N, H * D), k (N, KVH * D), cos/sin (N, D) -> rotated (q, k), out of place."""
    head_dim = cos.shape[-1]
    rows = q.shape[0]
    # apply_rope takes (B, H, T, D) and (B, T, D): here B = 1, T = N
    q4, k4 = (
        q.view(rows, -1, head_dim).transpose(0, 1)[None],
        k.view(rows, -1, head_dim).transpose(0, 1)[None],
    )
    q_out, k_out = apply_rope(q4, cos[None], sin[None]), apply_rope(k4, cos[None], sin[None])
    return q_out[0].transpose(0, 1).reshape(rows, -1), k_out[0].transpose(0, 1).reshape(rows, -1)


@triton.jit
def _rotate_rows(
    X, Cos, Sin, block, stride_x, stride_cos, stride_sin, num_tokens, num_heads,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_R: tl.constexpr, INVERSE: tl.constexpr,
):  # fmt: skip
    """Rotate BLOCK_R (token, head) rows of X in place: x1' = x1 cos1 - x2 sin1, x2' = x2 cos2 + x1 sin2."""
    pairs = block * BLOCK_R + tl.arange(0, BLOCK_R)  # token * num_heads + head
    token = (pairs // num_heads).to(tl.int64)
    head = pairs % num_heads
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (pairs < num_tokens * num_heads)[:, None] & (offs_d < HALF)[None, :]
    cos = Cos + token[:, None] * stride_cos + offs_d[None, :]  # (BLOCK_R, BLOCK_HALF)
    sin = Sin + token[:, None] * stride_sin + offs_d[None, :]
    cos1 = tl.load(cos, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos + HALF, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin + HALF, mask=mask, other=0.0).to(tl.float32)
    if INVERSE:  # the transpose of the rotation: g1' = g1 cos1 + g2 sin2, g2' = g2 cos2 - g1 sin1
        sin1, sin2 = -sin2, -sin1
    first = X + token[:, None] * stride_x + head[:, None] * (2 * HALF) + offs_d[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos1 - x2 * sin1).to(X.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos2 + x1 * sin2).to(X.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K, Cos, Sin, stride_q, stride_k, stride_cos, stride_sin, num_tokens, num_q_heads, num_k_heads,
    q_programs, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_R: tl.constexpr, INVERSE: tl.constexpr,
):  # fmt: skip
    # grid (q_programs + k_programs,): the first programs rotate q's (token, head) rows, the rest k's
    pid = tl.program_id(0)
    if pid < q_programs:
        _rotate_rows(Q, Cos, Sin, pid, stride_q, stride_cos, stride_sin, num_tokens, num_q_heads,
                     HALF, BLOCK_HALF, BLOCK_R, INVERSE)  # fmt: skip
    else:
        _rotate_rows(K, Cos, Sin, pid - q_programs, stride_k, stride_cos, stride_sin, num_tokens, num_k_heads,
                     HALF, BLOCK_HALF, BLOCK_R, INVERSE)  # fmt: skip


def _rotate_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> None:
    num_tokens, head_dim = q.shape[0], cos.shape[-1]
    assert q.stride(-1) == k.stride(-1) == cos.stride(-1) == sin.stride(-1) == 1
    num_q_heads, num_k_heads, half = q.shape[1] // head_dim, k.shape[1] // head_dim, head_dim // 2
    block_half = triton.next_power_of_2(half)
    # 2k elements of each half per program on a GPU (no register spills at 4 warps); the interpreter
    # prefers few, large programs
    block_rows = max(1, (2**13 if interpreted() else 2048) // block_half)
    q_programs = triton.cdiv(num_tokens * num_q_heads, block_rows)
    k_programs = triton.cdiv(num_tokens * num_k_heads, block_rows)
    _rope_kernel[(q_programs + k_programs,)](
        q, k, cos, sin, q.stride(0), k.stride(0), cos.stride(0), sin.stride(0), num_tokens, num_q_heads,
        num_k_heads, q_programs, HALF=half, BLOCK_HALF=block_half, BLOCK_R=block_rows, INVERSE=inverse,
        num_warps=4,
    )  # fmt: skip


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        if q._is_view() or k._is_view():  # autograd cannot mark two views dirty: rotate copies instead
            q, k = q.clone(), k.clone()
        else:
            ctx.mark_dirty(q, k)
        _rotate_(q, k, cos, sin, inverse=False)
        ctx.save_for_backward(cos, sin)
        return q, k

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        # Incoming gradients may be shared with other consumers, or expanded: rotate dense copies.
        grad_q = grad_q.clone(memory_format=torch.contiguous_format)
        grad_k = grad_k.clone(memory_format=torch.contiguous_format)
        _rotate_(grad_q, grad_k, cos, sin, inverse=True)
        return grad_q, grad_k, None, None


def apply_rope_(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate token rows q (N, H * D) and k (N, KVH * D) in place with cos/sin (N, D); returns them.

    Rows may be strided; each row's heads must be contiguous. q and k must not be views of other
    tensors for the rotation to happen in place (a view is rotated into a copy, which is returned).
    """
    return RopeFunction.apply(q, k, cos, sin)
