"""Paged attention: the KV pool every sequence's blocks live in, and the two engine backends over it.

The model hands each layer's q/k/v to an attention backend (`kiln.models.layers.AttentionBackend`). A
paged backend is built per step from a `PagedBatch` (where each sequence's new tokens sit in the
flattened batch and in the KV pool): it writes the new keys/values to their slots, then attends each
sequence's queries over its own blocks. `TorchPagedAttention` is the reference; `TritonPagedAttention`
runs the decodes on the kernel of kiln/kernels/paged_attention.py; `paged_attention_backend` picks one
by the `kernels` switch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kiln.config import ModelConfig
from kiln.kernels.kv_quant import PARAM_BYTES, dequantize_kv, kv_cache_bits, packed_dim, quantize_kv
from kiln.kernels.paged_attention import paged_decode_attention
from kiln.kernels.paged_attention_quantized import paged_decode_attention_quantized
from kiln.kernels.runtime import use_triton
from kiln.models.layers import alibi_slopes


class KVPool:
    """Preallocated keys and values of every layer, (num_layers, num_blocks * block_size, KVH, D) each;
    slot `block * block_size + offset` holds one token.

    With kv_cache_dtype int8/int4 (kiln/kernels/kv_quant.py) `keys`/`values` hold uint8 codes
    (num_layers, slots, KVH, D or D / 2) and `key_params`/`value_params` each row's fp16 scale and uint8
    zero point, (num_layers, slots, KVH, 3) bytes, slot for slot beside them; `bits` is 8 or 4 (0 when
    unquantized). `dtype` is the model's, the dtype attention computes in."""

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        kv_cache_dtype: str | None = None,
    ) -> None:
        self.bits = kv_cache_bits(kv_cache_dtype, config.head_dim)
        self.dtype = dtype
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.key_params = self.value_params = None
        shape = (config.num_layers, num_blocks * block_size, config.num_kv_heads, config.head_dim)
        if not self.bits:
            self.keys = torch.zeros(shape, dtype=dtype, device=device)
            self.values = torch.zeros(shape, dtype=dtype, device=device)
            return
        codes = (*shape[:3], packed_dim(self.bits, config.head_dim))
        self.keys = torch.zeros(codes, dtype=torch.uint8, device=device)
        self.values = torch.zeros(codes, dtype=torch.uint8, device=device)
        self.key_params = torch.zeros((*shape[:3], PARAM_BYTES), dtype=torch.uint8, device=device)
        self.value_params = torch.zeros((*shape[:3], PARAM_BYTES), dtype=torch.uint8, device=device)

    @property
    def num_bytes(self) -> int:
        params = 0 if not self.bits else 2 * self.key_params.numel() * self.key_params.element_size()
        return 2 * self.keys.numel() * self.keys.element_size() + params

    def write(self, layer_index: int, slot_mapping: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor):
        """Quantize the new k/v rows (N, KVH, D) into their slots of a quantized pool."""
        for rows, codes, params in (
            (k_rows, self.keys, self.key_params),
            (v_rows, self.values, self.value_params),
        ):
            row_codes, row_params = quantize_kv(rows, self.bits)
            codes[layer_index].index_copy_(0, slot_mapping, row_codes)
            params[layer_index].index_copy_(0, slot_mapping, row_params)

    def gather(self, layer_index: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized keys and values (len(slots), KVH, D) in `dtype` of a quantized pool's slots."""
        return tuple(
            dequantize_kv(codes[layer_index][slots], params[layer_index][slots], self.bits, self.dtype)
            for codes, params in ((self.keys, self.key_params), (self.values, self.value_params))
        )


@dataclass(kw_only=True, slots=True)
class PagedBatch:
    """One step's layout. Sequence i's new tokens are rows [query_starts[i], + query_lens[i]) of the
    flattened batch and the last query_lens[i] of its context_lens[i] tokens."""

    slot_mapping: torch.Tensor  # (N,) long: the pool slot of every new token
    query_starts: list[int]
    query_lens: list[int]
    context_lens: list[int]  # cached + new tokens
    block_tables: list[list[int]]


@dataclass(kw_only=True, slots=True)
class _Group:
    """Sequences attended by one SDPA call: rows [start, end) = num_seqs x num_queries new tokens."""

    start: int
    end: int
    num_seqs: int
    num_queries: int
    key_slots: torch.Tensor | None  # (num_seqs * S,) pool slots to gather keys from; None = the new k/v
    num_keys: int  # S, the longest context in the group
    mask: torch.Tensor | None  # bool (G, 1, T, S) or ALiBi float bias (G, H, T, S)
    is_causal: bool


# A decode joins the previous decodes' SDPA call when the padding that adds costs at most this many key
# elements (KVH * D per padded token); else it gets a call of its own. On a 2-core CPU one more call
# costs about as much as gathering ~6k key elements (python -m kiln.bench.paged_attention).
DECODE_PADDING_BUDGET = 8192


class TorchPagedAttention:
    """Reference paged attention in plain torch: gather each group's keys/values from the pool, then SDPA.

    Decodes (one query each) of similar context length are padded into one batched SDPA call; each
    prefill chunk gets its own call, and a prompt computed from scratch attends its new keys directly.
    Causality, Mistral's sliding window and BLOOM's ALiBi bias are applied through the mask.
    """

    def __init__(self, pool: KVPool, batch: PagedBatch, config: ModelConfig) -> None:
        self.pool = pool
        self.dtype = pool.dtype
        self.slot_mapping = batch.slot_mapping
        self.num_heads = config.num_heads
        self.window = config.sliding_window
        self.slopes = alibi_slopes(config.num_heads) if config.position == "alibi" else None
        elements_per_token = config.num_kv_heads * config.head_dim
        self.groups = [self._group(batch, members) for members in _group_members(batch, elements_per_token)]

    def __call__(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, H, N, D), k/v (1, KVH, N, D) for the N new tokens -> attention output (1, H, N, D)."""
        q_rows, k_rows, v_rows = q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)  # (N, *, D)
        if self.pool.bits:
            self.pool.write(layer_index, self.slot_mapping, k_rows, v_rows)
        else:
            keys, values = self.pool.keys[layer_index], self.pool.values[layer_index]  # (slots, KVH, D)
            keys.index_copy_(0, self.slot_mapping, k_rows)
            values.index_copy_(0, self.slot_mapping, v_rows)
        out = torch.empty_like(q_rows)  # (N, H, D)
        self.attend(layer_index, q_rows, k_rows, v_rows, out)
        return out.transpose(0, 1)[None]

    def attend(
        self,
        layer_index: int,
        q_rows: torch.Tensor,
        k_rows: torch.Tensor,
        v_rows: torch.Tensor,
        out: torch.Tensor,
    ) -> None:
        """Write the attention of this batch's sequences into their rows of `out` (N, H, D); q_rows (N, H, D),
        k/v_rows (N, KVH, D). The step's new keys/values must already be in the pool. A quantized pool's
        group keys/values are dequantized as they are gathered (this is the reference backend)."""
        keys, values = self.pool.keys[layer_index], self.pool.values[layer_index]  # (slots, KVH, D)
        for group in self.groups:
            rows = slice(group.start, group.end)
            shape = (group.num_seqs, group.num_queries, -1, q_rows.shape[-1])  # (G, T, H|KVH, D)
            if group.key_slots is None:
                k_group, v_group = k_rows[rows].reshape(shape), v_rows[rows].reshape(shape)
            else:
                shape = (group.num_seqs, group.num_keys, -1, q_rows.shape[-1])  # (G, S, KVH, D)
                if self.pool.bits:
                    k_group, v_group = (t.view(shape) for t in self.pool.gather(layer_index, group.key_slots))
                else:
                    k_group = keys.index_select(0, group.key_slots).view(shape)
                    v_group = values.index_select(0, group.key_slots).view(shape)
            result = F.scaled_dot_product_attention(
                q_rows[rows].reshape(group.num_seqs, group.num_queries, *q_rows.shape[1:]).transpose(1, 2),
                k_group.transpose(1, 2),
                v_group.transpose(1, 2),
                attn_mask=group.mask,
                is_causal=group.is_causal,
                enable_gqa=q_rows.shape[1] != k_rows.shape[1],
            )  # (G, H, T, D)
            out[rows] = result.transpose(1, 2).reshape(group.end - group.start, *q_rows.shape[1:])

    def _group(self, batch: PagedBatch, members: list[int]) -> _Group:
        first, last = members[0], members[-1]
        num_queries = batch.query_lens[first]
        context_lens = [batch.context_lens[i] for i in members]
        num_keys = max(context_lens)
        device = batch.slot_mapping.device
        # A whole prompt computed from scratch attends its new keys as they are, but over a quantized pool
        # as the pool holds them, as every later step (and a prefix-cache hit) will see them.
        fresh = len(members) == 1 and num_keys == num_queries and not self.pool.bits
        key_slots = (
            None if fresh else self._key_slots([batch.block_tables[i] for i in members], num_keys, device)
        )
        mask, is_causal = self._mask(context_lens, num_queries, num_keys, device)
        return _Group(
            start=batch.query_starts[first],
            end=batch.query_starts[last] + batch.query_lens[last],
            num_seqs=len(members),
            num_queries=num_queries,
            key_slots=key_slots,
            num_keys=num_keys,
            mask=mask,
            is_causal=is_causal,
        )

    def _key_slots(self, block_tables: list[list[int]], num_keys: int, device: torch.device) -> torch.Tensor:
        """(G * S,) slots of positions 0..S-1 of each sequence; past a sequence's blocks, slot 0 (masked)."""
        num_blocks = -(-num_keys // self.pool.block_size)
        padded = [table[:num_blocks] + [0] * (num_blocks - len(table[:num_blocks])) for table in block_tables]
        positions = torch.arange(num_keys)
        size = self.pool.block_size
        slots = torch.tensor(padded)[:, positions // size] * size + positions % size  # (G, S)
        return slots.flatten().to(device)

    def _mask(
        self, context_lens: list[int], num_queries: int, num_keys: int, device: torch.device
    ) -> tuple[torch.Tensor | None, bool]:
        """The attention mask of a group and whether SDPA's own causal mask can stand in for it."""
        windowed = self.window is not None and self.window < num_keys
        if self.slopes is None and not windowed and len(context_lens) == 1:
            if num_queries == 1:
                return None, False  # one query sees every key
            if num_queries == num_keys:
                return None, True  # plain causal prompt
        query_positions = (
            torch.tensor(context_lens)[:, None, None] - num_queries + torch.arange(num_queries)[:, None]
        )
        key_positions = torch.arange(num_keys)
        allowed = key_positions <= query_positions  # (G, T, S)
        if windowed:
            allowed &= query_positions - key_positions < self.window
        allowed = allowed[:, None]  # (G, 1, T, S)
        if self.slopes is None:
            return allowed.to(device), False
        # ALiBi as in BLOOM (and the model's own path): slope * key position; softmax turns it into
        # -slope * distance.
        bias = self.slopes[None, :, None, None] * key_positions.float()  # (1, H, 1, S)
        return bias.to(self.dtype).masked_fill(~allowed, float("-inf")).to(device), False


def _group_members(batch: PagedBatch, elements_per_token: int) -> list[list[int]]:
    """Sequence indices per SDPA call: runs of decodes whose padding stays cheap, each prefill alone."""
    groups: list[list[int]] = []
    longest = total = 0  # context lengths in the last group
    for index, (num_queries, length) in enumerate(zip(batch.query_lens, batch.context_lens, strict=True)):
        if groups and num_queries == 1 and batch.query_lens[groups[-1][0]] == 1:
            size = len(groups[-1])
            padding_before = longest * size - total
            padding_after = max(longest, length) * (size + 1) - total - length
            if (padding_after - padding_before) * elements_per_token <= DECODE_PADDING_BUDGET:
                groups[-1].append(index)
                longest, total = max(longest, length), total + length
                continue
        groups.append([index])
        longest = total = length
    return groups


class TritonPagedAttention:
    """The engine's paged attention with decodes on the Triton kernel (see `TorchPagedAttention`).

    Prefill chunks (more than one new token) go through the torch reference backend, which also writes
    every new token's key/value to the pool; the decodes then read their whole context from the pool.
    """

    def __init__(self, pool: KVPool, batch: PagedBatch, config: ModelConfig) -> None:
        self.pool = pool
        self.slot_mapping = batch.slot_mapping
        device = batch.slot_mapping.device
        decodes = [i for i, n in enumerate(batch.query_lens) if n == 1]
        prefills = [i for i, n in enumerate(batch.query_lens) if n != 1]
        self.prefill = None
        if prefills:
            pick = lambda values: [values[i] for i in prefills]  # noqa: E731
            sub_batch = PagedBatch(
                slot_mapping=batch.slot_mapping,  # all new tokens: this backend writes them all
                query_starts=pick(batch.query_starts),
                query_lens=pick(batch.query_lens),
                context_lens=pick(batch.context_lens),
                block_tables=pick(batch.block_tables),
            )
            self.prefill = TorchPagedAttention(pool, sub_batch, config)
        rows = [batch.query_starts[i] for i in decodes]
        self.decode_rows = torch.tensor(rows, dtype=torch.long, device=device)
        self.all_decodes = not prefills and rows == list(range(len(rows)))
        context_lens = [batch.context_lens[i] for i in decodes]
        self.max_context = max(context_lens, default=0)
        self.context_lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
        width = max((len(batch.block_tables[i]) for i in decodes), default=1)
        tables = [batch.block_tables[i] + [0] * (width - len(batch.block_tables[i])) for i in decodes]
        self.block_tables = torch.tensor(tables, dtype=torch.int32, device=device).reshape(
            len(decodes), width
        )
        self.slopes = alibi_slopes(config.num_heads).to(device) if config.position == "alibi" else None
        self.window = config.sliding_window

    def __call__(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, H, N, D), k/v (1, KVH, N, D) for the N new tokens -> attention output (1, H, N, D)."""
        keys, values = self.pool.keys[layer_index], self.pool.values[layer_index]  # (slots, KVH, D)
        if self.prefill is not None:
            out = self.prefill(layer_index, q, k, v)
        elif self.pool.bits:
            self.pool.write(layer_index, self.slot_mapping, k[0].transpose(0, 1), v[0].transpose(0, 1))
            out = torch.empty_like(q)
        else:
            keys.index_copy_(0, self.slot_mapping, k[0].transpose(0, 1))
            values.index_copy_(0, self.slot_mapping, v[0].transpose(0, 1))
            out = torch.empty_like(q)
        if self.decode_rows.numel() == 0:
            return out
        q_rows = q[0].transpose(0, 1)  # (N, H, D)
        q_decode = q_rows if self.all_decodes else q_rows.index_select(0, self.decode_rows)
        if self.pool.bits:
            pool = self.pool
            result = paged_decode_attention_quantized(
                q_decode, keys, values, pool.key_params[layer_index], pool.value_params[layer_index],
                pool.bits, self.block_tables, self.context_lens, pool.block_size, self.max_context,
                alibi_slopes=self.slopes, sliding_window=self.window,
            )  # fmt: skip
        else:
            result = paged_decode_attention(
                q_decode, keys, values, self.block_tables, self.context_lens, self.pool.block_size,
                self.max_context, alibi_slopes=self.slopes, sliding_window=self.window,
            )  # fmt: skip
        if self.all_decodes:
            return result.transpose(0, 1)[None]
        out[0].transpose(0, 1).index_copy_(0, self.decode_rows, result)
        return out


def paged_attention_backend(kernels: str, weight: torch.Tensor):
    """The engine backend class (`ModelRunner(attention=...)`) the switch picks for weights on `weight`'s
    device: TritonPagedAttention under "triton" (or "auto" on CUDA), else TorchPagedAttention."""
    return TritonPagedAttention if use_triton(kernels, weight) else TorchPagedAttention
