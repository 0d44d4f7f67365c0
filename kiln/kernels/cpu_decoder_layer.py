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
from kiln.kernels.packed_weight import packed_rows
from kiln.kernels.rope import rope_reference
from kiln.kernels.swiglu import swiglu_reference

W8A8_BITS = -8  # LayerWeights.bits of a w8a8 projection (csrc/decoder_layer.cpp's W8A8)


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
    # Weight-only quantized projections (kiln/quant's int8/int4 layout; the weight above is then the integer
    # one): bits 8 or 4 per projection, 0 for a float weight; scale (N, G) fp32 and offset = scale * zero.
    bits: tuple[int, ...] = (0,) * 7
    scales: tuple[torch.Tensor | None, ...] = (None,) * 7
    offsets: tuple[torch.Tensor | None, ...] = (None,) * 7
    # oneDNN-packed copies of float projections (kiln/kernels/packed_weight.py), None where unpacked: used for
    # steps of more rows than kiln's small-row op takes, up to packed_rows(dtype). For a w8a8 projection
    # (bits W8A8_BITS: int8 weight, scale (N, 1), no offset) its int8 copy, which kiln::w8a8_linear takes
    # above w8a8_max_op_rows rows; w8a8_int8_mm as kiln/quant/linear.py's W8A8_KILN_INT8_MM.
    packed: tuple[torch.Tensor | None, ...] = (None,) * 7
    w8a8_max_op_rows: int = 16
    w8a8_int8_mm: bool = False

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
    # Loki (kiln/engine/loki.py), decoder_layers only: the (num_layers, KVH, D, D) bases the keys and queries
    # are rotated by, the scored coordinates and the fraction of the context kept
    loki_basis: torch.Tensor | None = None
    loki_rank: int = 0
    loki_top_k: float = 1.0


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
        *_step_arguments(step, layer, max_linear_rows),
    )  # fmt: skip


@dataclass(slots=True)
class LayerStack:
    """Layers' arguments to `decoder_layers`, flattened once (rebuilt when a layer's LayerWeights change)."""

    layers: tuple[LayerWeights, ...]
    weights: list[torch.Tensor]  # 9 a layer
    biases: list[torch.Tensor | None]  # 7 a layer, as scales, offsets, bits and packed
    scales: list[torch.Tensor | None]
    offsets: list[torch.Tensor | None]
    bits: list[int]
    packed: list[torch.Tensor | None]
    packed_rows: list[int]  # 1 a layer
    eps: float

    @staticmethod
    def takes(layers: tuple[LayerWeights, ...]) -> bool:
        """Whether the op can run `layers` together: it takes one eps and one w8a8 setting for all."""
        return len({(layer.eps, layer.w8a8_max_op_rows, layer.w8a8_int8_mm) for layer in layers}) == 1

    @classmethod
    def of(cls, layers: tuple[LayerWeights, ...]) -> LayerStack:
        assert cls.takes(layers), "decoder_layers takes layers with one eps and one w8a8 setting"
        return cls(
            layers, [w for layer in layers for w in layer.weights()],
            [b for layer in layers for b in layer.biases], [s for layer in layers for s in layer.scales],
            [o for layer in layers for o in layer.offsets], [b for layer in layers for b in layer.bits],
            [p for layer in layers for p in layer.packed], [_packed_rows(layer) for layer in layers],
            layers[0].eps,
        )  # fmt: skip


def decoder_layers(
    x: torch.Tensor,
    stack: LayerStack,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    caches: list[torch.Tensor],
    kv_bits: int,
    step: PagedDecode,
    max_linear_rows: list[int],
    loki_bases: list[torch.Tensor] = (),
) -> torch.Tensor:
    """`decoder_layer` (kv_bits 0: caches = [key_cache, value_cache] a layer) or `decoder_layer_quantized`
    (kv_bits 8/4: [key_codes, value_codes, key_params, value_params] a layer) for each layer of `stack` in
    turn, in one call (`kiln::decoder_layers`); max_linear_rows holds one entry per layer. With `loki_bases`
    (one (KVH, D, D) basis a layer, a step of decodes) each layer attends by Loki, with
    step.loki_rank and step.loki_top_k."""
    layer = stack.layers[0]
    return torch.ops.kiln.decoder_layers(
        x, stack.weights, stack.biases, stack.eps, cos, sin, caches, kv_bits, *_placement(step),
        max_linear_rows, stack.scales, stack.offsets, stack.bits, stack.packed, stack.packed_rows,
        layer.w8a8_max_op_rows, layer.w8a8_int8_mm, list(loki_bases), step.loki_rank, step.loki_top_k,
    )  # fmt: skip


def decoder_layer_quantized(
    x: torch.Tensor,
    layer: LayerWeights,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    caches: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    bits: int,
    step: PagedDecode,
    max_linear_rows: int,
) -> torch.Tensor:
    """`decoder_layer` over a quantized pool (kiln/kernels/kv_quant.py): caches = (key_codes, value_codes,
    key_params, value_params) of one layer; the rows' keys/values are quantized into them."""
    return torch.ops.kiln.decoder_layer_quantized(
        x, layer.weights(), list(layer.biases), layer.eps, cos, sin, *caches, bits,
        *_step_arguments(step, layer, max_linear_rows),
    )  # fmt: skip


def _step_arguments(step: PagedDecode, layer: LayerWeights, max_linear_rows: int) -> tuple:
    """The arguments both ops take after the pool: the step's placement and attention options, then the
    layer's quantized-projection parameters."""
    return (
        *_placement(step), max_linear_rows, list(layer.scales), list(layer.offsets), list(layer.bits),
        list(layer.packed), _packed_rows(layer), layer.w8a8_max_op_rows, layer.w8a8_int8_mm,
    )  # fmt: skip


def _placement(step: PagedDecode) -> tuple:
    """The step's placement and attention options, as every layer op takes them after the pool."""
    return (
        step.slot_mapping, step.block_tables, step.query_starts, step.query_lens, step.context_lens,
        step.block_size, step.scale, step.alibi_slopes, step.sliding_window or 0,
    )  # fmt: skip


def _packed_rows(layer: LayerWeights) -> int:
    """Most rows the layer's packed float copies serve (0: none packed)."""
    return packed_rows(layer.attn_norm.dtype) if any(p is not None for p in layer.packed) else 0


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
    rows, (_, kv_heads, head_dim) = x.shape[0], key_cache.shape
    weights = layer.weights()[1:5] + layer.weights()[6:]  # the projections: q, k, v, o, gate, up, down

    def project(h: torch.Tensor, i: int) -> torch.Tensor:
        weight, bits, bias = weights[i], layer.bits[i], layer.biases[i]
        if bits == W8A8_BITS:  # rows quantized per token (kiln/quant/weights.py's quantize_rows), exact sums
            x_scale = (h.float().abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12)
            q = torch.round(h.float() / x_scale).clamp(-127, 127)
            y = (q.double() @ weight.double().T * x_scale.double() * layer.scales[i].double().T).to(h.dtype)
            return y if bias is None else y + bias.to(h.dtype)
        if bits:
            weight = dequantize_reference(weight, layer.scales[i], layer.offsets[i], bits).to(h.dtype)
        return F.linear(h, weight, None if bias is None else bias.to(h.dtype))

    h = rms_norm_reference(x, layer.attn_norm, layer.eps)
    q, k, v = project(h, 0), project(h, 1), project(h, 2)
    if cos is not None:
        q, k = rope_reference(q, k, cos, sin)
    key_cache.index_copy_(0, step.slot_mapping, k.view(rows, kv_heads, head_dim))
    value_cache.index_copy_(0, step.slot_mapping, v.view(rows, kv_heads, head_dim))
    attended = paged_attention_reference(
        q.view(rows, -1, head_dim), key_cache, value_cache, step.block_tables, step.query_starts,
        step.query_lens, step.context_lens, step.block_size, step.scale, step.alibi_slopes,
        step.sliding_window,
    )  # fmt: skip
    x = x + project(attended.view(rows, -1), 3)
    h = rms_norm_reference(x, layer.mlp_norm, layer.eps)
    gated = swiglu_reference(project(h, 4), project(h, 5))
    return x + project(gated, 6)


def dequantize_reference(
    qweight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """(N, K) fp32 from kiln::quant_linear's weight layout (csrc/quant_linear.cpp): int8 (N, K), or int4
    packed (N, K / 2) uint8 in 32-element chunks whose byte j holds element j (low nibble) and j + 16
    (high); w = u * scale - offset per group (offset = scale * zero, absent for int8)."""
    if bits == 4:
        chunks = qweight.view(qweight.shape[0], -1, 16)
        u = torch.cat((chunks & 0xF, chunks >> 4), dim=-1).reshape(qweight.shape[0], -1)
    else:
        u = qweight
    out_features, in_features = u.shape
    groups = scale.shape[1]
    w = u.float().view(out_features, groups, in_features // groups) * scale[..., None]
    if offset is not None:
        w = w - offset[..., None]
    return w.view(out_features, in_features)
