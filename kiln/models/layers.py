"""The parts of a decoder block: norms, positions (RoPE, ALiBi), attention and MLPs.

Numerics follow the Hugging Face reference implementations of each family (fp32 RMSNorm statistics,
RoPE with the `rotate_half` layout, BLOOM's ALiBi slopes) so logits match them to fp32 round-off.

Every module with a `kernels` attribute ("torch" | "triton" | "auto", see kiln.kernels.runtime) runs
its fused Triton kernels from kiln/kernels/ when that selects Triton, and the plain torch code otherwise
(here, or the reference beside a kernel, as RoPE's `apply_rope`); the torch code is the kernels' reference.
With "auto" on CPU, when no gradient is needed, RMSNorm, RoPE and SwiGLU run kiln's fused C++ ops instead
(kiln.kernels.cpu_fused: one call each where the torch code runs several small ops, decode's overhead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import ModelConfig, RopeScaling
from kiln.kernels import cpu_fused
from kiln.kernels.block_sparse_attention import block_sparse_attention
from kiln.kernels.cpu_fused import fused_applies
from kiln.kernels.flash_attention_common import MAX_HEAD_DIM
from kiln.kernels.rope import apply_rope, apply_rope_
from kiln.kernels.runtime import KernelChoice, check_kernels, use_triton

# ----------------------------------------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, kernels: KernelChoice = "torch") -> None:
        super().__init__()
        self.eps = eps
        self.kernels = check_kernels(kernels)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(self.kernels, x):
            from kiln.kernels.norms import rms_norm

            return rms_norm(x, self.weight, self.eps)
        if fused_applies(self.kernels, x, self.weight):  # CPU decode: one C++ op
            return cpu_fused.rms_norm(x, self.weight, self.eps)
        # Statistics in fp32 even for half inputs; cast back before the scale, as Llama does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` with the `kernels` switch."""

    def __init__(self, dim: int, eps: float, kernels: KernelChoice = "torch") -> None:
        super().__init__(dim, eps=eps)
        self.kernels = check_kernels(kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(self.kernels, x):
            from kiln.kernels.norms import layer_norm

            # CUDA autocast runs F.layer_norm in fp32; the kernel reads x as it is and writes fp32.
            fp32 = x.is_cuda and torch.is_autocast_enabled("cuda")
            return layer_norm(x, self.weight, self.bias, self.eps, torch.float32 if fp32 else None)
        return super().forward(x)


def make_norm(config: ModelConfig, kernels: KernelChoice = "torch") -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.hidden_size, config.norm_eps, kernels)
    return LayerNorm(config.hidden_size, config.norm_eps, kernels)


# ------------------------------------------------------------------------------------------- positions


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """(head_dim / 2,) fp32 inverse frequencies, with optional context-extension scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    # llama3: wavelengths longer than the original context are stretched by `factor`, short ones kept,
    # and the band between is interpolated smoothly.
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for given positions. Holds no state, so models can be built on the meta device."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self.scaling = config.rope_scaling
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, sin each (B, T, head_dim) in `dtype`."""
        inv_freq = self._inv_freq.get(positions.device)
        if inv_freq is None:
            inv_freq = rope_inverse_frequencies(self.head_dim, self.theta, self.scaling).to(positions.device)
            self._inv_freq[positions.device] = inv_freq
        freqs = positions.float()[..., None] * inv_freq  # (B, T, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """(num_heads,) fp32 ALiBi slopes: a geometric sequence, interleaved for non-powers of two (BLOOM)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra_base = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        num_extra = min(closest, num_heads - closest)
        slopes += [extra_base ** (2 * i + 1) for i in range(num_extra)]
    return torch.tensor(slopes, dtype=torch.float32)


# ------------------------------------------------------------------------------------------- attention


class AttentionBackend(Protocol):
    """Attention computed outside the model, e.g. the engine's paged KV cache.

    Called by every layer with its index and the projected q (B, H, T, D), k and v (B, KVH, T, D), after
    RoPE; returns the attention output (B, H, T, D). The backend stores k/v itself and applies causality,
    sliding windows and ALiBi biases: the model hands it nothing else.
    """

    def __call__(
        self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor: ...


@dataclass
class AttentionInputs:
    """What every layer's attention needs for one forward pass; built once per pass by the model.

    `mask` is None (plain causal or no masking, see `is_causal`), a bool tensor (B|1, 1, T, S) of
    allowed key positions, or a float additive bias (B, H, T, S) when ALiBi is in use. A `backend`, when
    set, replaces the built-in attention (and `mask`, `is_causal` and the KV cache are unused).
    """

    mask: torch.Tensor | None
    is_causal: bool
    cos: torch.Tensor | None = None  # (B, T, D) RoPE tables
    sin: torch.Tensor | None = None
    backend: AttentionBackend | None = None
    # (H,) ALiBi slopes, set when `mask` is exactly causal ALiBi (no padding, window or cache offset), so
    # a fused kernel can compute the bias instead of reading `mask`.
    alibi_slopes: torch.Tensor | None = None


class Attention(nn.Module):
    """Projections, RoPE, then attention through the backend, or SDPA / flash attention over the KV cache.

    Head counts come from the projections' widths (head_dim is fixed), so the same code runs the local
    heads of a tensor-parallel shard. With Triton kernels, RoPE rotates the projections in place and
    flash attention runs wherever no mask tensor is needed and the head dim fits its tiles.
    """

    def __init__(self, config: ModelConfig, layer_index: int, kernels: KernelChoice = "torch") -> None:
        super().__init__()
        self.layer_index = layer_index
        self.kernels = check_kernels(kernels)
        self.head_dim = config.head_dim
        h, q, kv = (
            config.hidden_size,
            config.num_heads * config.head_dim,
            config.num_kv_heads * config.head_dim,
        )
        self.q_proj = nn.Linear(h, q, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, kv, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, kv, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q, h, bias=config.out_bias)
        # Qwen3: each head's q and k RMS-normalised over head_dim (one weight shared by the heads)
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps, kernels) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps, kernels) if config.qk_norm else None
        self.bigbird = config if config.attention_pattern == "bigbird" else None

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, kv_cache=None) -> torch.Tensor:
        fused = use_triton(self.kernels, x)
        batch, length, _ = x.shape
        q, k, v = self._project(x, inputs, fused)
        if inputs.backend is not None:
            out = inputs.backend(self.layer_index, q, k, v)
        else:
            if kv_cache is not None:
                k, v = kv_cache.update(self.layer_index, k, v)  # (B, KVH, S, D)
            if self.bigbird is not None:
                out = bigbird_attention(self.bigbird, self.layer_index, q, k, v, inputs)
            else:
                out = self._attend(q, k, v, inputs, fused)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))

    def _project(
        self, x: torch.Tensor, inputs: AttentionInputs, fused: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, H, T, D), k and v (B, KVH, T, D), with RoPE applied."""
        batch, length, hidden = x.shape
        rotate = inputs.cos is not None
        if fused:
            # (N, hidden): 2-D projections are not views, so RoPE may overwrite them in place
            rows = x.reshape(-1, hidden)
            q, k, v = self.q_proj(rows), self.k_proj(rows), self.v_proj(rows)  # (N, H|KVH * D)
            q, k = self._normalize_heads(q, k)
            if rotate:
                cos, sin = inputs.cos.reshape(-1, self.head_dim), inputs.sin.reshape(-1, self.head_dim)
                q, k = apply_rope_(q, k, cos, sin)
                rotate = False
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, H|KVH * D)
            q, k = self._normalize_heads(q, k)
            if rotate and cpu_fused.rope_applies(self.kernels, q, k, inputs.cos, inputs.sin):
                q, k = cpu_fused.rope(q, k, inputs.cos, inputs.sin)  # CPU decode: q and k in one C++ op
                rotate = False
        q, k, v = (t.view(batch, length, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if rotate:
            q, k = apply_rope(q, inputs.cos, inputs.sin), apply_rope(k, inputs.cos, inputs.sin)
        return q, k, v

    def _normalize_heads(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q/k (..., heads * D) -> the same with each head's D values RMS-normalised (when qk_norm); the
        norms see (rows * heads, D), so under tensor parallelism they act on a rank's local heads."""
        if self.q_norm is None:
            return q, k
        q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
        return q, self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs, fused: bool
    ) -> torch.Tensor:
        """q (B, H, T, D), k/v (B, KVH, S, D) -> (B, H, T, D)."""
        no_mask_needed = inputs.mask is None or inputs.alibi_slopes is not None
        if fused and no_mask_needed and self.head_dim <= MAX_HEAD_DIM:
            from kiln.kernels.flash_attention import flash_attention

            causal = inputs.is_causal or inputs.alibi_slopes is not None
            return flash_attention(q, k, v, causal=causal, alibi_slopes=inputs.alibi_slopes)
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=inputs.mask,
            is_causal=inputs.is_causal,
            enable_gqa=q.shape[1] != k.shape[1],  # no materialised K/V repeat
        )


def bigbird_attention(
    config: ModelConfig, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    inputs: AttentionInputs,
) -> torch.Tensor:  # fmt: skip
    """BigBird's block-sparse pattern (kiln/models/bigbird.py): a plain causal pass runs the block-sparse
    op; a pass over a KV cache or with padding intersects the pattern with the pass's mask under SDPA."""
    from kiln.models import bigbird

    size = config.bigbird_block_size
    if inputs.mask is None and q.shape[2] == k.shape[2]:
        table = bigbird.key_blocks(config, layer_index, -(-q.shape[2] // size), q.device)
        return block_sparse_attention(q, k, v, table, size)
    num_queries, num_keys = q.shape[2], k.shape[2]
    query_positions = torch.arange(num_keys - num_queries, num_keys, device=q.device)
    mask = bigbird.token_allowed(config, layer_index, query_positions, num_keys)  # (T, S)
    if inputs.mask is not None:
        mask = mask & inputs.mask  # padding (B, 1, T, S); the pattern counts cache slots, as the mask does
        mask = mask | (torch.arange(num_keys, device=q.device) == query_positions[:, None])  # never empty
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


# ------------------------------------------------------------------------------------------------- MLP

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


class MLP(nn.Module):
    """`plain`: down(act(up(x))). `gated` (SwiGLU with silu): down(act(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, kernels: KernelChoice = "torch") -> None:
        super().__init__()
        self.kernels = check_kernels(kernels)
        self.swiglu = config.mlp == "gated" and config.activation == "silu"
        h, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, inner, bias=bias) if config.mlp == "gated" else None
        self.up_proj = nn.Linear(h, inner, bias=bias)
        self.down_proj = nn.Linear(inner, h, bias=bias)
        self.act = _ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu and use_triton(self.kernels, x):
            from kiln.kernels.swiglu import swiglu

            return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
        if self.gate_proj is not None:
            gate, up = self.gate_proj(x), self.up_proj(x)
            if self.swiglu and fused_applies(self.kernels, gate, up):  # CPU decode: one C++ op
                return self.down_proj(cpu_fused.swiglu(gate, up))
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.up_proj(x)))
