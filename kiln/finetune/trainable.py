"""Freezing a base model and counting what still trains."""

from __future__ import annotations

from torch import nn


def freeze(model: nn.Module) -> None:
    """Stop gradients for every parameter of `model` (the adapters are added, trainable, afterwards)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def count_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters); a tensor shared by two modules counts once."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, sum(p.numel() for p in seen.values())
