"""One pre-norm decoder layer for a step of decode rows in one call: kiln's C++ op `kiln::decoder_layer`
(csrc/decoder_layer.cpp) and its torch reference.

The layer is the Llama block: RMSNorm, q/k/v projections, RoPE (or none, e.g. ALiBi), the new keys/values
written into the paged KV pool, paged attention over the pool in place, the output projection and residual,
RMSNorm, the SwiGLU MLP and residual. The op runs kiln's registered CPU ops back to back from C++, so a
decode step pays Python's per-op cost once per layer instead of about twenty times (BENCHMARKS.md, issue 12).
The engine decides when a step may take it: kiln/engine/cpu_decoder.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kiln.kernels.cpu_paged_attention import paged_attention_reference
from kiln.kernels.norms import rms_norm_reference
from kiln.kernels.rope import rope_reference
from kiln.kernels.swiglu import swiglu_reference


@dataclass(kw_only=True, slots=True)
class LayerWeights:
    """A layer's parameters in the op's order; biases are None where the layer has none."""

    attn_norm: torch.Tensor  # (hidden,)
    q: torch.Tensor  # (H * D, hidden)
    k: torch.Tensor  # (KVH * D, hidden)
    v: torch.Tensor
    o: torch.Tensor  # (hidden, H * D)
    mlp_norm: torch.Tensor
    gate: torch.Tensor  # (inner, hidden)
    up: torch.Tensor
    down: torch.Tensor  # (hidden, inner)
    biases: tuple[torch.Tensor | None, ...] = (None,) * 7  # q, k, v, o, gate, up, down
    eps: float = 1e-6

    def weights(self) -> list[torch.Tensor]:
        return [self.attn_norm, self.q, self.k, self.v, self.o, self.mlp_norm, self.gate, self.up, self.down]


@dataclass(kw_only=True, slots=True)
class PagedDecode:
    """Where a step's rows go in the pool and what each sequence attends (see cpu_paged_attention)."""

    slot_mapping: torch.Tensor  # (N,) int64
    block_tables: torch.Tensor  # (S, max_blocks) int32
    query_starts: torch.Tensor  # (S,) int32
    query_lens: torch.Tensor
    context_lens: torch.Tensor
    block_size: int
    scale: float
    alibi_slopes: torch.Tensor | None = None
    sliding_window: int | None = None


def decoder_layer(
    x: torch.Tensor,
    layer: LayerWeights,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    step: PagedDecode,
    max_linear_rows: int,
) -> torch.Tensor:
    """x (N, hidden) -> (N, hidden); writes the rows' keys/values into key/value_cache (slots, KVH, D).
    cos/sin (N, D) or None. Linears of up to `max_linear_rows` rows use kiln's small-row op."""
    return torch.ops.kiln.decoder_layer(
        x, layer.weights(), list(layer.biases), layer.eps, cos, sin, key_cache, value_cache,
        step.slot_mapping, step.block_tables, step.query_starts, step.query_lens, step.context_lens,
        step.block_size, step.scale, step.alibi_slopes, step.sliding_window or 0, max_linear_rows,
    )  # fmt: skip


def decoder_layer_reference(
    x: torch.Tensor,
    layer: LayerWeights,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    step: PagedDecode,
) -> torch.Tensor:
    """`decoder_layer` in plain torch from the kernels' references (attention in float64)."""
    q_bias, k_bias, v_bias, o_bias, gate_bias, up_bias, down_bias = layer.biases
    rows, (_, kv_heads, head_dim) = x.shape[0], key_cache.shape
    h = rms_norm_reference(x, layer.attn_norm, layer.eps)
    q, k, v = F.linear(h, layer.q, q_bias), F.linear(h, layer.k, k_bias), F.linear(h, layer.v, v_bias)
    if cos is not None:
        q, k = rope_reference(q, k, cos, sin)
    key_cache.index_copy_(0, step.slot_mapping, k.view(rows, kv_heads, head_dim))
    value_cache.index_copy_(0, step.slot_mapping, v.view(rows, kv_heads, head_dim))
    attended = paged_attention_reference(
        q.view(rows, -1, head_dim), key_cache, value_cache, step.block_tables, step.query_starts,
        step.query_lens, step.context_lens, step.block_size, step.scale, step.alibi_slopes,
        step.sliding_window,
    )  # fmt: skip
    x = x + F.linear(attended.view(rows, -1), layer.o, o_bias)
    h = rms_norm_reference(x, layer.mlp_norm, layer.eps)
    gated = swiglu_reference(F.linear(h, layer.gate, gate_bias), F.linear(h, layer.up, up_bias))
    return x + F.linear(gated, layer.down, down_bias)
