"""A contiguous per-batch KV cache for reference generation (the engine has its own paged cache)."""

from __future__ import annotations

import torch

from kiln.config import ModelConfig


class KVCache:
    """Preallocated keys and values for every layer: (num_layers, B, KVH, max_length, D).

    Layers write their new keys/values at `[length, length + T)` during a forward pass; the model
    calls `advance(T)` once the pass is complete, so all layers see the same offset.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (config.num_layers, batch_size, config.num_kv_heads, max_length, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_length = max_length
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, KVH, T, D) for `layer`; return all keys/values so far (B, KVH, S, D)."""
        end = self.length + k.shape[2]
        assert end <= self.max_length, f"KV cache overflow: {end} > {self.max_length}"
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens
