"""Block-sparse causal attention: each query block attends a fixed, small list of key blocks (BigBird's
window, global and random blocks, kiln/models/bigbird.py), so time and memory grow linearly in the
sequence length. Plain torch (gather + batched matmul), so it runs on CPU and GPU and has autograd; the
dense-masked SDPA reference is `block_sparse_attention_reference` beside it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Query blocks per chunk: the chunk's scores (B, H, chunk * S, K * S) stay within a few MB, so the working
# set stays in cache as T grows (unchunked, the 8k step cost 3.6x the 4k one instead of 2x).
QUERY_BLOCKS_PER_CHUNK = 16


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_blocks: torch.Tensor,
    block_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """q (B, H, T, D), k/v (B, KVH, T, D); key_blocks long (num_blocks, K): the key blocks query block i
    attends (-1 = none), num_blocks = ceil(T / block_size), each list without repeats. Causal inside every
    block. Returns (B, H, T, D); scores and softmax in fp32."""
    batch, num_heads, length, head_dim = q.shape
    num_blocks = key_blocks.shape[0]
    assert num_blocks == -(-length // block_size), "one key-block list per query block"
    scale = head_dim**-0.5 if scale is None else scale
    pad = num_blocks * block_size - length
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    chunk = QUERY_BLOCKS_PER_CHUNK * block_size
    outs = [
        _attend_blocks(
            q[:, :, start : start + chunk],
            k,
            v,
            key_blocks[start // block_size : (start + chunk) // block_size],
            start // block_size,
            block_size,
            length,
            scale,
        )
        for start in range(0, num_blocks * block_size, chunk)
    ]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 2)
    return out[:, :, :length]


def _attend_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_blocks: torch.Tensor,
    first_block: int,
    block_size: int,
    length: int,
    scale: float,
) -> torch.Tensor:
    """Query blocks first_block.. (q (B, H, n * S, D), their key_blocks (n, K)) over the padded k/v."""
    batch, num_heads, _, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    num_blocks = key_blocks.shape[0]
    index = key_blocks.clamp(min=0)  # (n, K)
    width = index.shape[1] * block_size
    key_rows = (batch, num_kv_heads, -1, block_size, head_dim)
    k_blocks = k.view(key_rows)[:, :, index].reshape(batch, num_kv_heads, num_blocks, width, head_dim)
    v_blocks = v.view(key_rows)[:, :, index].reshape(batch, num_kv_heads, num_blocks, width, head_dim)
    q_blocks = q.view(batch, num_kv_heads, group, num_blocks, block_size, head_dim)
    scores = torch.einsum("bkgnqd,bknsd->bkgnqs", q_blocks.float(), k_blocks.float()) * scale
    scores = scores.masked_fill(~_allowed(key_blocks, first_block, block_size, length), float("-inf"))
    probabilities = scores.softmax(-1).to(v.dtype)  # (B, KVH, G, n, S, K * S)
    out = torch.einsum("bkgnqs,bknsd->bkgnqd", probabilities, v_blocks)
    return out.reshape(batch, num_heads, num_blocks * block_size, head_dim)


def _allowed(key_blocks: torch.Tensor, first_block: int, block_size: int, length: int) -> torch.Tensor:
    """Bool (n, S, K * S): query q of block first_block + i may see key s of its i-th list's blocks."""
    num_blocks = key_blocks.shape[0]
    offsets = torch.arange(block_size, device=key_blocks.device)
    blocks = torch.arange(first_block, first_block + num_blocks, device=key_blocks.device)
    query_at = blocks[:, None] * block_size + offsets  # (n, S)
    key_at = (key_blocks.clamp(min=0)[:, :, None] * block_size + offsets).flatten(1)  # (n, K * S)
    listed = (key_blocks >= 0).repeat_interleave(block_size, 1)  # (n, K * S)
    return listed[:, None] & (key_at[:, None] <= query_at[:, :, None]) & (key_at[:, None] < length)


def block_sparse_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_allowed: torch.Tensor, block_size: int
) -> torch.Tensor:
    """The same attention through SDPA with a dense (T, T) mask: block_allowed bool (N, N) of key blocks per
    query block, intersected with causality."""
    length = q.shape[2]
    blocks = torch.arange(length, device=q.device) // block_size
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    mask = block_allowed[blocks][:, blocks] & causal
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
