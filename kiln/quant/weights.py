"""Round-to-nearest quantization of weights and activations, its inverse, and kiln's int4 packing.

Integer conventions (those of compressed-tensors, so its files map one-to-one):
- int8: q in [-127, 127], w ~= q * scale, scale = max |w| / 127 per output channel (error <= scale / 2).
- int4: stored unsigned u in [0, 15] with zero z per group: w ~= (u - z) * scale. Symmetric: z = 8 and
  scale = max |w| / 7.5 (q = u - 8 in [-8, 7]); with zero points: scale = (max - min) / 15 over a range
  that includes 0. Either way the error is at most scale / 2 per element.
- activations (w8a8): q in [-127, 127] per token (row), scale = max |x| / 127, computed on the fly.
"""

from __future__ import annotations

import torch

TINY = 1e-12  # floor of a scale, so an all-zero row or group quantizes to zeros instead of dividing by 0


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q (N, K) int8, scale (N, 1) fp32), symmetric per output channel."""
    w = weight.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(TINY)
    return torch.round(w / scale).clamp_(-127, 127).to(torch.int8), scale


def quantize_int4(
    weight: torch.Tensor, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u (N, K) uint8 in [0, 15], scale (N, G) fp32, zero (N, G) uint8), G = K / group_size."""
    out_features, in_features = weight.shape
    w = weight.float().view(out_features, in_features // group_size, group_size)
    if symmetric:
        scale = (w.abs().amax(dim=-1) / 7.5).clamp_min(TINY)
        zero = torch.full_like(scale, 8)
    else:
        low, high = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
        scale = ((high - low) / 15).clamp_min(TINY)
        zero = torch.round(-low / scale).clamp_(0, 15)
    u = torch.round(w / scale[..., None]) + zero[..., None]
    u = u.clamp_(0, 15).to(torch.uint8).view(out_features, in_features)
    return u, scale, zero.to(torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 (N, K) weights of integers q (N, K) with scale (N, G) and zero (N, G) (None: 0)."""
    out_features, in_features = q.shape
    groups = scale.shape[1]
    values = q.float().view(out_features, groups, in_features // groups)
    if zero is not None:
        values = values - zero.float()[..., None]
    return (values * scale.float()[..., None]).view(out_features, in_features)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (row) dynamic int8: (q (M, K) int8, scale (M, 1) fp32)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / 127).clamp_min(TINY)
    return torch.round(xf / scale).clamp_(-127, 127).to(torch.int8), scale


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15] -> (N, K / 2) uint8 in the C++ op's chunk layout: per 32 elements,
    16 bytes, byte j = element j | element j + 16 << 4 (K a multiple of 32)."""
    out_features, in_features = u.shape
    chunks = u.to(torch.uint8).view(out_features, in_features // 32, 2, 16)
    return (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(out_features, in_features // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: (N, K / 2) uint8 -> (N, K) uint8 in [0, 15]."""
    out_features, half = packed.shape
    chunks = packed.view(out_features, half // 16, 1, 16)
    return torch.cat([chunks & 0xF, chunks >> 4], dim=2).reshape(out_features, half * 2)
