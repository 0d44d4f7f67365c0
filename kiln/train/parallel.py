"""Transformations applied to a model from outside (the model code stays single-device and plain)."""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from kiln.models.transformer import Transformer


def apply_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block's activations during backward instead of storing them: memory per layer
    drops to the block's input, for about one extra forward pass of compute."""
    model.layers = nn.ModuleList(
        checkpoint_wrapper(block, preserve_rng_state=False) for block in model.layers
    )
