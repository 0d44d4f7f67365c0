"""Fused LM head + cross-entropy: mean loss of `hidden @ weight.T` against targets, computed over chunks of
tokens so the full (tokens, vocab) logits are never materialised.

The gradients are computed during the forward pass, chunk by chunk (as Liger-Kernel's fused linear
cross-entropy does): d logits = softmax - onehot is formed in place in the chunk's logits buffer and
immediately contracted into d hidden and d weight. Peak extra memory is one (chunk, vocab) fp32 buffer
instead of logits, log-probabilities and their gradient at full size, and the separate log-softmax
backward pass disappears. The matmul FLOPs equal those of the unfused path.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, ignore_index: int):
        # hidden (N, H), weight (V, H), targets (N,)
        num_tokens = hidden.shape[0]
        valid = targets != ignore_index
        num_kept = valid.sum().clamp(min=1).to(torch.float32)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = None
        if needs_grad:  # accumulated over chunks in fp32
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            chunk_hidden = hidden[start:end]
            logits = (chunk_hidden @ weight.t()).float()  # (C, V)
            chunk_targets = targets[start:end]
            chunk_valid = valid[start:end]
            safe_targets = chunk_targets.clamp(min=0)[:, None]
            log_normaliser = torch.logsumexp(logits, dim=-1)
            target_logits = logits.gather(1, safe_targets).squeeze(1)
            total += ((log_normaliser - target_logits) * chunk_valid).sum()
            if not needs_grad:
                continue
            grad_logits = logits.sub_(log_normaliser[:, None]).exp_()  # softmax, in place
            grad_logits.scatter_add_(1, safe_targets, -torch.ones_like(target_logits)[:, None])
            grad_logits.mul_((chunk_valid / num_kept)[:, None])
            # Under autocast these matmuls run in the autocast dtype, as the unfused backward would.
            grad_hidden[start:end] = grad_logits @ weight
            grad_weight += grad_logits.t() @ chunk_hidden
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total / num_kept

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, grad_weight * grad_output, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 256,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Mean cross-entropy of logits = hidden @ weight.T over targets != ignore_index.

    hidden (..., H), weight (V, H), targets (...). Chunked; see the module docstring.
    """
    return LinearCrossEntropyFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), chunk_size, ignore_index
    )


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """The unfused definition: full logits, then F.cross_entropy (fp32)."""
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.t()).float()
    return torch.nn.functional.cross_entropy(logits, targets.reshape(-1), ignore_index=ignore_index)
