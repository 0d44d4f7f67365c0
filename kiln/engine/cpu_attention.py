"""CppPagedAttention: the engine's paged attention on CPU through kiln's C++ op, reading the KV pool in place.

Same interface as `kiln.engine.attention.TorchPagedAttention` (built per step from the pool, the step's
`PagedBatch` and the model config; called per layer). Decodes and prefill chunks over cached context go
through `kiln.kernels.cpu_paged_attention.paged_attention` in one call per layer, with no gather of any
context out of the pool. Sequences with several new queries go through the torch backend's SDPA groups
(`TorchPagedAttention.attend`, after this backend has written the pool): a whole prompt computed from
scratch attends its own new keys there, which was as fast as the op at 128 tokens and 7-12% faster at 512,
and a prefill chunk over cached context (1 < query_len < context_len) is gathered and batched, which ran a
64-token chunk over 448 cached tokens 1.5-1.75x faster than the op (134M shape, fp32 and bf16, one thread,
python -m kiln.bench.paged_attention --mode cpp). Over a quantized pool (kv_cache_dtype int8/int4) every
sequence goes to `paged_attention_quantized`, which dequantizes key tiles as it reads them.
"""

from __future__ import annotations

import torch

from kiln.config import ModelConfig
from kiln.engine.attention import KVPool, PagedBatch, TorchPagedAttention
from kiln.kernels.cpu_decoder_layer import PagedDecode
from kiln.kernels.cpu_paged_attention import paged_attention, paged_attention_quantized
from kiln.models.layers import alibi_slopes


class CppPagedAttention:
    """Paged attention with the C++ CPU op; see the module docstring."""

    def __init__(self, pool: KVPool, batch: PagedBatch, config: ModelConfig) -> None:
        self.pool = pool
        self.slot_mapping = batch.slot_mapping
        self.window = config.sliding_window
        self.slopes = alibi_slopes(config.num_heads) if config.position == "alibi" else None
        self.scale = config.head_dim**-0.5  # SDPA's default, as the torch backend uses
        # Decodes go to the op; prompts computed from scratch and chunks over cached context (several
        # queries each) to the torch backend's SDPA groups, over the same pool.
        paged = [i for i, n in enumerate(batch.query_lens) if n == 1]
        several = [i for i, n in enumerate(batch.query_lens) if n > 1]
        self.torch_backend = None
        if pool.bits:  # a quantized pool: every sequence to the op, so no context is copied out dequantized
            paged = list(range(len(batch.query_lens)))
        elif several:
            self.torch_backend = TorchPagedAttention(pool, _members(batch, several), config)
        # Metadata of the op, built once per step rather than per layer.
        int32 = dict(dtype=torch.int32)
        self.query_starts = torch.tensor([batch.query_starts[i] for i in paged], **int32)
        self.query_lens = torch.tensor([batch.query_lens[i] for i in paged], **int32)
        self.context_lens = torch.tensor([batch.context_lens[i] for i in paged], **int32)
        width = max((len(batch.block_tables[i]) for i in paged), default=1)
        tables = [batch.block_tables[i] + [0] * (width - len(batch.block_tables[i])) for i in paged]
        self.block_tables = torch.tensor(tables, **int32).reshape(len(paged), width)
        # A step of decodes only can run whole layers in one C++ call (kiln/engine/cpu_decoder.py;
        # kiln::decoder_layer_quantized over a quantized pool).
        self.decode_step = None
        if paged and not several:
            self.decode_step = PagedDecode(
                slot_mapping=self.slot_mapping, block_tables=self.block_tables,
                query_starts=self.query_starts, query_lens=self.query_lens, context_lens=self.context_lens,
                block_size=pool.block_size,
                scale=self.scale, alibi_slopes=self.slopes, sliding_window=self.window,
            )  # fmt: skip

    def __call__(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, H, N, D), k/v (1, KVH, N, D) for the N new tokens -> attention output (1, H, N, D)."""
        q_rows, k_rows, v_rows = q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)  # (N, *, D)
        if self.pool.bits:
            out = self._quantized(layer_index, q_rows, k_rows, v_rows)
        else:
            out = self._unquantized(layer_index, q_rows, k_rows, v_rows)
        if self.torch_backend is not None:
            self.torch_backend.attend(layer_index, q_rows, k_rows, v_rows, out)
        return out.transpose(0, 1)[None]

    def _unquantized(self, layer_index: int, q_rows, k_rows, v_rows) -> torch.Tensor:
        """Write the new rows into the pool; the op's output (N, H, D) for the decodes and prefill chunks."""
        keys, values = self.pool.keys[layer_index], self.pool.values[layer_index]  # (slots, KVH, D)
        keys.index_copy_(0, self.slot_mapping, k_rows)
        values.index_copy_(0, self.slot_mapping, v_rows)
        if not self.query_lens.numel():
            return torch.empty(q_rows.shape, dtype=q_rows.dtype)
        return paged_attention(
            q_rows if q_rows.stride(-1) == 1 else q_rows.contiguous(), keys, values, self.block_tables,
            self.query_starts, self.query_lens, self.context_lens, self.pool.block_size, self.scale,
            self.slopes, self.window,
        )  # fmt: skip  # (N, H, D); the rows of multi-query sequences are zero, filled below

    def _quantized(self, layer_index: int, q_rows, k_rows, v_rows) -> torch.Tensor:
        """Write the new rows into the quantized pool; the op's output (N, H, D) for the decodes."""
        pool = self.pool
        pool.write(layer_index, self.slot_mapping, k_rows, v_rows)
        if not self.query_lens.numel():
            return torch.empty(q_rows.shape, dtype=q_rows.dtype)
        return paged_attention_quantized(
            q_rows if q_rows.stride(-1) == 1 else q_rows.contiguous(), pool.keys[layer_index],
            pool.values[layer_index], pool.key_params[layer_index], pool.value_params[layer_index], pool.bits,
            self.block_tables, self.query_starts, self.query_lens, self.context_lens, pool.block_size,
            self.scale, self.slopes, self.window,
        )  # fmt: skip


def _members(batch: PagedBatch, members: list[int]) -> PagedBatch:
    """The sequences `members` of `batch`, rows where they are (slot_mapping still covers every row)."""
    return PagedBatch(
        slot_mapping=batch.slot_mapping,
        query_starts=[batch.query_starts[i] for i in members],
        query_lens=[batch.query_lens[i] for i in members],
        context_lens=[batch.context_lens[i] for i in members],
        block_tables=[batch.block_tables[i] for i in members],
    )
