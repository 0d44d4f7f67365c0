"""Fused LM head + cross-entropy: mean loss of `hidden @ weight.T` against targets, computed over chunks of
tokens so the full (tokens, vocab) logits are never materialised.

The gradients are computed during the forward pass, chunk by chunk (as Liger-Kernel's fused linear
cross-entropy does): d logits = softmax - onehot is formed in place in the chunk's logits buffer and
immediately contracted into d hidden and d weight. Peak extra memory is one (chunk, vocab) buffer
instead of logits, log-probabilities and their gradient at full size, and the separate log-softmax
backward pass disappears. The matmul FLOPs equal those of the unfused path.

Two implementations of the per-chunk step share the chunk loop: the torch reference (an fp32 chunk
buffer, several passes over it) and a Triton kernel that reads each row's logits twice (an online
log-sum-exp, then the gradient written in place, in the matmul's dtype). Optional z-loss (PaLM) adds
z_loss * logsumexp^2 per kept token. Targets equal to ignore_index (padding, or Goldfish-dropped tokens)
contribute neither loss nor gradient; the mean is over the kept ones.
"""

from __future__ import annotations

import torch

from kiln.kernels.jit import tl, triton
from kiln.kernels.runtime import interpreted, use_triton

IGNORE_INDEX = -100


def _torch_chunk(logits, targets, ignore_index: int, num_kept: torch.Tensor, z_loss: float, needs_grad: bool):
    """Summed loss of a chunk of fp32 logits (C, V); the gradient of the mean loss overwrites them."""
    valid = targets != ignore_index
    safe_targets = targets.clamp(min=0)[:, None]
    log_normaliser = torch.logsumexp(logits, dim=-1)
    target_logits = logits.gather(1, safe_targets).squeeze(1)
    losses = log_normaliser - target_logits
    if z_loss:
        losses = losses + z_loss * log_normaliser.square()
    total = (losses * valid).sum()
    if needs_grad:
        grad_logits = logits.sub_(log_normaliser[:, None]).exp_()  # softmax, in place
        if z_loss:  # d(z * lse^2) = 2 z lse softmax
            grad_logits.mul_((1 + 2 * z_loss * log_normaliser)[:, None])
        grad_logits.scatter_add_(1, safe_targets, -torch.ones_like(target_logits)[:, None])
        grad_logits.mul_((valid / num_kept)[:, None])
    return total


@triton.jit
def _cross_entropy_rows_kernel(
    Logits, stride_row, Targets, Losses, NumKept, num_rows, num_classes, ignore_index, z_loss,
    WRITE_GRAD: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    # grid (cdiv(C, BLOCK_ROWS),): BLOCK_ROWS rows of logits per program (1 on a GPU); Losses (C,) fp32
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < num_rows
    row_logits = Logits + rows.to(tl.int64)[:, None] * stride_row  # (R, 1)
    targets = tl.load(Targets + rows, mask=row_ok, other=ignore_index).to(tl.int32)
    valid = targets != ignore_index
    targets = tl.where(valid, targets, 0)
    # read before the rows are overwritten by their gradient
    target_logits = tl.sum(tl.load(row_logits + targets[:, None], mask=row_ok[:, None], other=0.0), 1).to(
        tl.float32
    )
    running_max = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_ROWS], tl.float32)
    for start in range(0, num_classes, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = row_ok[:, None] & (cols < num_classes)[None, :]
        x = tl.load(row_logits + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, 1))
        new_max = tl.where(row_ok, new_max, 0.0)  # rows past the end: keep exp() finite
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), 1)
        running_max = new_max
    lse = running_max + tl.log(tl.where(row_ok, running_sum, 1.0))
    loss = lse - target_logits + z_loss * lse * lse
    tl.store(Losses + rows, tl.where(valid, loss, 0.0), mask=row_ok)
    if WRITE_GRAD:
        row_scale = tl.where(valid, 1.0 / tl.load(NumKept), 0.0)[:, None]
        grad_scale = (1.0 + 2.0 * z_loss * lse)[:, None]  # z-loss: d(z lse^2) = 2 z lse softmax
        for start in range(0, num_classes, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = row_ok[:, None] & (cols < num_classes)[None, :]
            x = tl.load(row_logits + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            onehot = tl.where(cols[None, :] == targets[:, None], 1.0, 0.0)
            grad = tl.exp(x - lse[:, None]) * grad_scale - onehot
            tl.store(row_logits + cols[None, :], (grad * row_scale).to(Logits.dtype.element_ty), mask=mask)


def _triton_chunk(
    logits, targets, ignore_index: int, num_kept: torch.Tensor, z_loss: float, needs_grad: bool
):
    """As `_torch_chunk`, for logits (C, V) of any float dtype, with the Triton kernel."""
    num_rows, num_classes = logits.shape
    losses = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    # One row per program on a GPU, looping over 4k-wide tiles of the vocabulary; the interpreter
    # prefers a few big tiles.
    block_rows = min(triton.next_power_of_2(num_rows), 64) if interpreted() else 1
    _cross_entropy_rows_kernel[(triton.cdiv(num_rows, block_rows),)](
        logits, logits.stride(0), targets, losses, num_kept, num_rows, num_classes, ignore_index, z_loss,
        WRITE_GRAD=needs_grad, BLOCK_ROWS=block_rows, BLOCK_V=min(triton.next_power_of_2(num_classes), 4096),
        num_warps=8,
    )  # fmt: skip
    return losses.sum()


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, ignore_index: int, z_loss: float, use_kernel):
        # hidden (N, H), weight (V, H), targets (N,)
        num_tokens = hidden.shape[0]
        num_kept = (targets != ignore_index).sum().clamp(min=1).to(torch.float32)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = None
        if needs_grad:  # accumulated over chunks in fp32
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        chunk_step = _triton_chunk if use_kernel else _torch_chunk
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            chunk_hidden = hidden[start:end]
            logits = chunk_hidden @ weight.t()  # (C, V), in the autocast dtype under autocast
            if not use_kernel or logits.dtype == torch.float16:  # fp16 would underflow the gradients
                logits = logits.float()
            total += chunk_step(logits, targets[start:end], ignore_index, num_kept, z_loss, needs_grad)
            if not needs_grad:
                continue
            grad_logits = logits  # overwritten in place by the chunk step
            # Under autocast these matmuls run in the autocast dtype, as the unfused backward would.
            grad_hidden[start:end] = grad_logits @ weight
            grad_weight += grad_logits.t() @ chunk_hidden
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total / num_kept

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, grad_weight * grad_output, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 256,
    ignore_index: int = IGNORE_INDEX,
    z_loss: float = 0.0,
    kernels: str = "torch",
) -> torch.Tensor:
    """Mean cross-entropy of logits = hidden @ weight.T over targets != ignore_index (+ z-loss).

    hidden (..., H), weight (V, H), targets (...). Chunked; see the module docstring. `kernels` picks the
    per-chunk step: "torch" (fp32 reference), "triton", or "auto" (Triton on CUDA).
    """
    return LinearCrossEntropyFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        targets.reshape(-1),
        chunk_size,
        ignore_index,
        z_loss,
        use_triton(kernels, hidden),
    )


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """The unfused definition: full logits, then F.cross_entropy (fp32), plus z_loss * mean(lse^2)."""
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.t()).float()
    targets = targets.reshape(-1)
    loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index)
    if z_loss:
        valid = targets != ignore_index
        loss = loss + z_loss * (torch.logsumexp(logits, -1).square() * valid).sum() / valid.sum().clamp(min=1)
    return loss
