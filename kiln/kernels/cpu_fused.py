"""Fused elementwise ops on CPU for decode: kiln's C++ ops `torch.ops.kiln.rms_norm`, `.rope` and
`.swiglu` (csrc/rms_norm.cpp, rope.cpp, swiglu.cpp), each one pass over its rows instead of a chain of
small torch ops.

At batch-1 decode these ops touch a few thousand values each, so the per-op overhead of the torch
reference (RMSNorm is six ops, RoPE five per tensor, SwiGLU two) outweighs the arithmetic. Each C++ op
rounds to the tensor's dtype where the torch reference does, so bf16 results match it bit for bit up to
the order of RMSNorm's fp32 sum.

`fused_applies(kernels, *tensors)` is the routing rule kiln/models/layers.py asks first: kernels="auto",
CPU tensors of one dtype (fp32 or bf16), nothing that needs gradients (the ops have no backward) and
the library built. Otherwise the models run their torch code, which stays the reference.
"""

from __future__ import annotations

import torch

from kiln.kernels.cpu_extension import cpu_ops_built as _op_built

DTYPES = (torch.float32, torch.bfloat16)


def fused_applies(kernels: str, *tensors: torch.Tensor) -> bool:
    """Whether a module with the switch `kernels` runs the fused C++ op on `tensors` (else torch)."""
    if kernels != "auto":
        return False
    dtype = tensors[0].dtype
    if dtype not in DTYPES or any(t.device.type != "cpu" or t.dtype != dtype for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False  # the ops have no backward
    return _op_built()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D), weight (D,) -> (..., D): `weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)`."""
    return torch.ops.kiln.rms_norm(x, weight, eps)


def rope_applies(
    kernels: str, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> bool:
    """`fused_applies` for `rope`, which also needs one cos/sin row per q/k row (no broadcast tables)."""
    rows = q.shape[:-1]
    if k.shape[:-1] != rows or cos.shape != sin.shape or cos.shape[:-1] != rows or cos.shape[-1] % 2:
        return False
    return fused_applies(kernels, q, k, cos, sin)


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (..., H * D) and k (..., KVH * D) rotated by cos/sin (..., D) in one call (rotate_half layout,
    `apply_rope` per head), out of place; returns them in q's and k's shapes."""
    head_dim = cos.shape[-1]
    q_rows, k_rows = q.reshape(-1, q.shape[-1]), k.reshape(-1, k.shape[-1])
    cos_rows, sin_rows = cos.reshape(-1, head_dim), sin.reshape(-1, head_dim)
    q_out, k_out = torch.ops.kiln.rope(q_rows, k_rows, cos_rows, sin_rows)
    return q_out.view(q.shape), k_out.view(k.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`F.silu(gate) * up` for gate and up of one shape."""
    return torch.ops.kiln.swiglu(gate, up)
