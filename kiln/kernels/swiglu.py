"""Fused SwiGLU: silu(gate) * up in one pass, and its backward in one pass (silu recomputed, not stored).

The reference is the gated MLP's own expression (`kiln.models.layers.MLP`): `F.silu(gate) * up`. The
kernels compute in fp32 and round once to the inputs' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.kernels.jit import tl, triton

BLOCK = 1024


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@triton.jit
def _swiglu_forward_kernel(Gate, Up, Out, num_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_elements
    gate = tl.load(Gate + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(Up + offs, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(Out + offs, out.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(GradOut, Gate, Up, GradGate, GradUp, num_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_elements
    grad = tl.load(GradOut + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(Gate + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(Up + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    # d silu(g) / dg = sig * (1 + g * (1 - sig))
    tl.store(GradGate + offs, (grad * up * sig * (1.0 + gate * (1.0 - sig))).to(GradGate.dtype.element_ty),
             mask=mask)  # fmt: skip
    tl.store(GradUp + offs, (grad * silu).to(GradUp.dtype.element_ty), mask=mask)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate, dtype=torch.promote_types(gate.dtype, up.dtype))
        num_elements = gate.numel()
        _swiglu_forward_kernel[(triton.cdiv(num_elements, BLOCK),)](gate, up, out, num_elements, BLOCK=BLOCK)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
        num_elements = gate.numel()
        _swiglu_backward_kernel[(triton.cdiv(num_elements, BLOCK),)](
            grad_out, gate, up, grad_gate, grad_up, num_elements, BLOCK=BLOCK
        )
        return grad_gate, grad_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with the Triton kernels; gate and up share a shape."""
    return SwiGLUFunction.apply(gate, up)
