"""BigBird block-sparse attention (Zaheer et al., 2020), causal variant: `ModelConfig.attention_pattern =
"bigbird"`.

The sequence is cut into blocks of `bigbird_block_size` tokens. Query block i attends key blocks
- window: i - num_window_blocks + 1 .. i (its own block, causally, and the ones just before it),
- global: 0 .. num_global_blocks - 1 (the start of the sequence, seen by every later block),
- random: num_random_blocks blocks drawn from the earlier blocks not already listed, seeded by
  (bigbird_seed, layer, i), so the pattern is fixed per layer and block i's list never depends on how long
  the sequence is (a prefix sees the same pattern as the whole).
Each query block sees at most window + global + random blocks: attention costs O(T) rather than O(T^2).
Training and full-sequence forwards run kiln/kernels/block_sparse_attention.py; a forward over a KV cache
(kiln.generation) or with padding applies the same pattern as a dense mask (`token_allowed`).
"""

from __future__ import annotations

import functools
import random

import torch

from kiln.config import ModelConfig


@functools.lru_cache(maxsize=256)
def _key_block_lists(
    window: int, num_global: int, num_random: int, seed: int, layer_index: int, num_blocks: int
) -> tuple[tuple[int, ...], ...]:
    lists = []
    for block in range(num_blocks):
        listed = set(range(max(0, block - window + 1), block + 1)) | set(range(min(num_global, block + 1)))
        candidates = [j for j in range(block + 1) if j not in listed]
        if candidates and num_random:
            draw = random.Random(f"{seed}/{layer_index}/{block}")
            listed |= set(draw.sample(candidates, min(num_random, len(candidates))))
        lists.append(tuple(sorted(listed)))
    return tuple(lists)


def key_blocks(config: ModelConfig, layer_index: int, num_blocks: int, device=None) -> torch.Tensor:
    """Long (num_blocks, K): the key blocks each query block attends, padded with -1; K = the longest list."""
    lists = _key_block_lists(
        config.bigbird_num_window_blocks, config.bigbird_num_global_blocks, config.bigbird_num_random_blocks,
        config.bigbird_seed, layer_index, num_blocks,
    )  # fmt: skip
    width = max(len(blocks) for blocks in lists)
    rows = [list(blocks) + [-1] * (width - len(blocks)) for blocks in lists]
    return torch.tensor(rows, dtype=torch.long, device=device)


def block_allowed(config: ModelConfig, layer_index: int, num_blocks: int, device=None) -> torch.Tensor:
    """Bool (num_blocks, num_blocks): whether query block i attends key block j."""
    table = key_blocks(config, layer_index, num_blocks)
    allowed = torch.zeros(num_blocks, num_blocks + 1, dtype=torch.bool)
    allowed.scatter_(1, table.where(table >= 0, num_blocks), True)
    return allowed[:, :num_blocks].to(device)


def token_allowed(
    config: ModelConfig, layer_index: int, query_positions: torch.Tensor, num_keys: int
) -> torch.Tensor:
    """Bool (..., T, S) of the pattern (causality included) for queries at `query_positions` (..., T) over
    key positions 0..num_keys-1."""
    size = config.bigbird_block_size
    num_blocks = -(-max(num_keys, int(query_positions.max()) + 1) // size)
    allowed = block_allowed(config, layer_index, num_blocks, query_positions.device)
    key_positions = torch.arange(num_keys, device=query_positions.device)
    by_block = allowed[query_positions // size][..., key_positions // size]  # (..., T, S)
    return by_block & (key_positions <= query_positions[..., None])
