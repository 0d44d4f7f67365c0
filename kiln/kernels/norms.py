"""Fused RMSNorm and LayerNorm, forward and backward: one pass over each row in each direction.

The torch references are the model's own modules (`kiln.models.layers.RMSNorm`, `nn.LayerNorm`); the
kernels reproduce their numerics: statistics in fp32, RMSNorm's normalised row rounded to the input dtype
before the scale (as Llama does). RMSNorm's output has the promoted dtype of input and weight (fp32 for
bf16 activations and fp32 weights, as the module's `weight * x` gives); LayerNorm's has the input's, as
`F.layer_norm`'s does, unless the caller asks for another (autocast runs it in fp32 on CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.kernels.jit import tl, triton
from kiln.kernels.runtime import interpreted


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


@triton.jit
def _norm_forward_kernel(
    X, W, B, Y, Mean, Rstd, stride_x, stride_y, num_rows, num_cols, eps,
    RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # grid (cdiv(rows, BLOCK_ROWS),): a (BLOCK_ROWS, cols) tile per program; Mean/Rstd (rows,) fp32
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < num_rows
    col_ok = cols < num_cols
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if RMS:
        rstd = tl.math.rsqrt(tl.sum(x * x, 1) / num_cols + eps)
        y = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32) * w
    else:
        mean = tl.sum(x, 1) / num_cols
        centred = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.math.rsqrt(tl.sum(centred * centred, 1) / num_cols + eps)
        y = centred * rstd[:, None] * w
        if HAS_BIAS:
            y += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_backward_kernel(
    DY, X, W, Mean, Rstd, DX, PartialDW, PartialDB, stride_dy, stride_x, stride_dx,
    num_rows, num_cols, rows_per_program,
    RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # grid (programs,): each takes rows_per_program rows (a multiple of BLOCK_ROWS), BLOCK_ROWS at a
    # time, and writes its partial dW/dB row into (programs, cols)
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < num_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    dw = tl.zeros([BLOCK_ROWS, BLOCK], tl.float32)
    db = tl.zeros([BLOCK_ROWS, BLOCK], tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, num_rows)
    for start in range(first, last, BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < last
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)[:, None]
        d_normed = dy * w
        if RMS:
            x_hat = x * rstd
            dw += dy * x_hat.to(X.dtype.element_ty).to(tl.float32)  # the rounded row the scale multiplied
            dx = rstd * (d_normed - x_hat * (tl.sum(d_normed * x_hat, 1) / num_cols)[:, None])
        else:
            mean = tl.load(Mean + rows, mask=row_ok, other=0.0)[:, None]
            x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
            dw += dy * x_hat
            db += dy
            mean_d = tl.sum(d_normed, 1) / num_cols
            dx = rstd * (
                d_normed - mean_d[:, None] - x_hat * (tl.sum(d_normed * x_hat, 1) / num_cols)[:, None]
            )
        tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(PartialDW + pid * num_cols + cols, tl.sum(dw, 0), mask=col_ok)
    if HAS_BIAS:
        tl.store(PartialDB + pid * num_cols + cols, tl.sum(db, 0), mask=col_ok)


def _tile(cols: int) -> tuple[int, int, int]:
    """(BLOCK, BLOCK_ROWS, num_warps): rows of up to ~4k elements per tile on a GPU (one row per
    program for hidden sizes >= 4096), many more under the interpreter, which prefers few big steps."""
    block = triton.next_power_of_2(cols)
    rows = max(1, (2**14 if interpreted() else 4096) // block)
    return block, rows, min(max(block * rows // 512, 1), 16)


def _num_programs(rows: int, block_rows: int, device: torch.device) -> int:
    """Programs for the backward: about four per SM, each with at least one tile of rows."""
    tiles = triton.cdiv(rows, block_rows)
    if device.type != "cuda":
        return min(tiles, 4)
    return min(tiles, 4 * torch.cuda.get_device_properties(device).multi_processor_count)


class NormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms, out_dtype):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        rows, cols = x2.shape
        y = torch.empty(rows, cols, dtype=out_dtype, device=x.device)
        mean = torch.empty(rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        block, block_rows, warps = _tile(cols)
        _norm_forward_kernel[(triton.cdiv(rows, block_rows),)](
            x2, weight, bias if bias is not None else weight, y, mean, rstd, x2.stride(0), y.stride(0),
            rows, cols, eps, RMS=rms, HAS_BIAS=bias is not None, BLOCK_ROWS=block_rows, BLOCK=block,
            num_warps=warps,
        )  # fmt: skip
        ctx.save_for_backward(x2, weight, bias, mean, rstd)
        ctx.rms, ctx.shape = rms, shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight, bias, mean, rstd = ctx.saved_tensors
        rows, cols = x2.shape
        grad_y = grad_y.reshape(rows, cols)
        if grad_y.stride(-1) != 1 or grad_y.stride(0) == 0:
            grad_y = grad_y.contiguous()
        grad_x = torch.empty_like(x2)
        block, block_rows, warps = _tile(cols)
        programs = _num_programs(rows, block_rows, x2.device)
        partial_dw = torch.empty(programs, cols, dtype=torch.float32, device=x2.device)
        partial_db = torch.empty_like(partial_dw) if bias is not None else partial_dw
        rows_per_program = triton.cdiv(triton.cdiv(rows, programs), block_rows) * block_rows
        _norm_backward_kernel[(programs,)](
            grad_y, x2, weight, mean, rstd, grad_x, partial_dw, partial_db,
            grad_y.stride(0), x2.stride(0), grad_x.stride(0), rows, cols, rows_per_program,
            RMS=ctx.rms, HAS_BIAS=bias is not None, BLOCK_ROWS=block_rows, BLOCK=block, num_warps=warps,
        )  # fmt: skip
        grad_w = partial_dw.sum(0).to(weight.dtype)
        grad_b = partial_db.sum(0).to(bias.dtype) if bias is not None else None
        return grad_x.view(ctx.shape), grad_w, grad_b, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm over the last dimension: weight * (x / rms(x)), as `rms_norm_reference`."""
    return NormFunction.apply(x, weight, None, eps, True, torch.promote_types(x.dtype, weight.dtype))


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Triton LayerNorm over the last dimension, as `layer_norm_reference`; output in x's dtype by default."""
    return NormFunction.apply(x, weight, bias, eps, False, out_dtype or x.dtype)
