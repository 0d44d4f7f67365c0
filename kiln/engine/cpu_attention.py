"""CppPagedAttention: the engine's paged attention on CPU through kiln's C++ op, reading the KV pool in place.

Same interface as `kiln.engine.attention.TorchPagedAttention` (built per step from the pool, the step's
`PagedBatch` and the model config; called per layer). Decodes and prefill chunks over cached context go
through `kiln.kernels.cpu_paged_attention.paged_attention` in one call per layer, with no gather of any
context out of the pool; a whole prompt computed from scratch attends its own new keys through SDPA,
which was as fast as the op at 128 tokens and 7-12% faster at 512 (134M shape, fp32 and bf16, one thread).
A prefill chunk over cached context (1 < query_len < context_len) goes through the torch backend's gather
+ SDPA: its batched matmuls ran a 64-token chunk over 448 cached tokens 1.5-1.75x faster than the op
(fp32 and bf16, one thread, python -m kiln.bench.paged_attention --mode cpp).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.config import ModelConfig
from kiln.engine.attention import KVPool, PagedBatch, TorchPagedAttention
from kiln.kernels.cpu_paged_attention import paged_attention
from kiln.models.layers import alibi_slopes


class CppPagedAttention:
    """Paged attention with the C++ CPU op; see the module docstring."""

    def __init__(self, pool: KVPool, batch: PagedBatch, config: ModelConfig) -> None:
        self.pool = pool
        self.slot_mapping = batch.slot_mapping
        self.window = config.sliding_window
        self.slopes = alibi_slopes(config.num_heads) if config.position == "alibi" else None
        self.scale = config.head_dim**-0.5  # SDPA's default, as the torch backend uses
        fresh = [
            i for i, (n, length) in enumerate(zip(batch.query_lens, batch.context_lens, strict=True))
            if n == length and n > 1
        ]  # fmt: skip
        chunks = [
            i for i, (n, length) in enumerate(zip(batch.query_lens, batch.context_lens, strict=True))
            if 1 < n < length
        ]  # fmt: skip
        paged = sorted(set(range(len(batch.query_lens))) - set(fresh) - set(chunks))
        # The chunks' backend; its own index_copy_ of the step's new keys/values rewrites the same slots.
        self.chunks = (
            TorchPagedAttention(pool, _members(batch, chunks), config) if chunks else None,
            [slice(batch.query_starts[i], batch.query_starts[i] + batch.query_lens[i]) for i in chunks],
        )
        # Metadata of the op, built once per step rather than per layer.
        int32 = dict(dtype=torch.int32)
        self.query_starts = torch.tensor([batch.query_starts[i] for i in paged], **int32)
        self.query_lens = torch.tensor([batch.query_lens[i] for i in paged], **int32)
        self.context_lens = torch.tensor([batch.context_lens[i] for i in paged], **int32)
        width = max((len(batch.block_tables[i]) for i in paged), default=1)
        tables = [batch.block_tables[i] + [0] * (width - len(batch.block_tables[i])) for i in paged]
        self.block_tables = torch.tensor(tables, **int32).reshape(len(paged), width)
        # (rows, mask, is_causal) of each fresh prompt's SDPA call
        self.fresh = [
            self._fresh_call(batch.query_starts[i], batch.query_lens[i], pool.keys.dtype) for i in fresh
        ]

    def __call__(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, H, N, D), k/v (1, KVH, N, D) for the N new tokens -> attention output (1, H, N, D)."""
        q_rows = q[0].transpose(0, 1)  # (N, H, D)
        keys, values = self.pool.keys[layer_index], self.pool.values[layer_index]  # (slots, KVH, D)
        keys.index_copy_(0, self.slot_mapping, k[0].transpose(0, 1))
        values.index_copy_(0, self.slot_mapping, v[0].transpose(0, 1))
        if self.query_lens.numel():
            out = paged_attention(
                q_rows if q_rows.stride(-1) == 1 else q_rows.contiguous(), keys, values, self.block_tables,
                self.query_starts, self.query_lens, self.context_lens, self.pool.block_size, self.scale,
                self.slopes, self.window,
            )  # fmt: skip  # (N, H, D), rows of fresh prompts zero
        else:
            out = torch.empty(q_rows.shape, dtype=q.dtype)
        backend, chunk_rows = self.chunks
        if backend is not None:
            chunk_out = backend(layer_index, q, k, v)[0].transpose(0, 1)  # (N, H, D), valid on chunk rows
            for rows in chunk_rows:
                out[rows] = chunk_out[rows]
        for rows, mask, is_causal in self.fresh:
            result = F.scaled_dot_product_attention(
                q[:, :, rows], k[:, :, rows], v[:, :, rows], attn_mask=mask, is_causal=is_causal,
                enable_gqa=q.shape[1] != k.shape[1],
            )  # fmt: skip  # (1, H, T, D)
            out[rows] = result[0].transpose(0, 1)
        return out.transpose(0, 1)[None]

    def _fresh_call(self, start: int, length: int, dtype: torch.dtype):
        """A prompt of `length` tokens at rows [start, + length) attending only itself: SDPA's causal mask
        when that suffices, else the window's bool mask or ALiBi's float bias (as the torch backend)."""
        rows = slice(start, start + length)
        windowed = self.window is not None and self.window < length
        if self.slopes is None and not windowed:
            return rows, None, True
        positions = torch.arange(length)
        allowed = positions <= positions[:, None]  # (T, S)
        if windowed:
            allowed &= positions[:, None] - positions < self.window
        if self.slopes is None:
            return rows, allowed, False
        bias = self.slopes[:, None, None] * positions.float()  # (H, 1, S)
        return rows, bias.to(dtype).masked_fill(~allowed, float("-inf"))[None], False


def _members(batch: PagedBatch, members: list[int]) -> PagedBatch:
    """The sequences `members` of `batch`, rows where they are (slot_mapping still covers every row)."""
    return PagedBatch(
        slot_mapping=batch.slot_mapping,
        query_starts=[batch.query_starts[i] for i in members],
        query_lens=[batch.query_lens[i] for i in members],
        context_lens=[batch.context_lens[i] for i in members],
        block_tables=[batch.block_tables[i] for i in members],
    )
