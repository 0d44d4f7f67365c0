"""AdamW with decoupled weight decay on matrices only, and warmup + cosine learning-rate decay."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float = 1e-8
) -> torch.optim.AdamW:
    """AdamW; weight decay applies to 2-D weights (matmuls, embeddings), not to norms and biases.

    Uses the fused implementation where torch has one for the device (CUDA, and CPU since torch 2.4),
    else foreach: one multi-tensor kernel per step instead of a Python loop over parameters.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = []
    for experts in (False, True):
        # MoE experts are a group of their own in every layout: under expert parallelism they live on
        # another device mesh than the rest (the multi-tensor kernels take one mesh at a time). Empty
        # groups are left out: checkpoints store the optimizer flat, by parameter name, and torch cannot
        # unflatten a group without parameters (a LoRA run has no 1-D trainable tensors).
        params = [(n, p) for n, p in named if (".experts." in n) == experts]
        decay = [p for _, p in params if p.dim() >= 2]
        no_decay = [p for _, p in params if p.dim() < 2]
        groups += [{"params": decay, "weight_decay": weight_decay}] if decay else []
        groups += [{"params": no_decay, "weight_decay": 0.0}] if no_decay else []
    device = next(model.parameters()).device
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(
        groups, lr=lr, betas=betas, eps=eps, fused=fused, foreach=None if fused else True
    )


def learning_rate(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from 0 to max_lr over warmup_steps, then cosine decay to min_lr at total_steps."""
    if warmup_steps and step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
