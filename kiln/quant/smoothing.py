"""SmoothQuant (Xiao et al., 2023) for w8a8: move activation outliers into the weights before quantizing.

w8a8 quantizes each token's activations with one scale, so a few input channels far larger than the rest
(LLMs grow such channels, largely through their norms' weights) set that scale and leave the other
channels a handful of integer levels. For a linear y = x W^T and a per-input-channel s > 0,
y = (x / s)(W * s)^T exactly: dividing channel j of the activations by s_j and multiplying column j of the
weight by s_j flattens the activations at the cost of the weight's range, and the division is folded
into whatever produced x (a norm's weight and bias, or the rows of the linear before), so nothing is
added at run time and the result is an ordinary model directory. With a_j the largest |x_j| over
calibration text and w_j the largest |W[:, j]| over every linear reading x,

    s_j = a_j ** alpha / w_j ** (1 - alpha)      (alpha = 0.5 balances the two; the paper's default)

rounded here to the nearest power of two, so that x / s and W * s are exact in any float format: the
smoothed model computes exactly what the original did (tests/quant/test_smoothing.py checks it bit for
bit) and only the quantization sees the difference. A channel that never fired (a_j = 0) or whose
weights are all zero keeps s_j = 1.

Which linears share an input and what produces it is the model's business: the caller passes
SmoothGroups (kiln.models.hf.quantize builds them for kiln's Transformer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kiln.errors import KilnError


@dataclass(frozen=True, slots=True)
class SmoothGroup:
    """Linears that read one input, and the tensors whose dim-0 index j produces that input's channel j
    linearly (a norm's weight and bias, or the previous linear's weight rows and bias)."""

    name: str  # for messages, e.g. "layers.0.attn_norm -> q_proj, k_proj, v_proj"
    consumers: tuple[tuple[str, nn.Linear], ...]  # (dotted name, linear): their input maxima are looked up
    producers: tuple[torch.Tensor, ...]


def smoothing_scales(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """(K,) fp32 powers of two: a ** alpha / w ** (1 - alpha) to the nearest power, 1 where a or w is 0."""
    a, w = act_max.float(), weight_max.float()
    usable = (a > 0) & (w > 0) & torch.isfinite(a) & torch.isfinite(w)
    exponent = alpha * torch.log2(a.where(usable, 1.0)) - (1 - alpha) * torch.log2(w.where(usable, 1.0))
    return torch.exp2(torch.round(exponent)).where(usable, 1.0)


def check_alpha(alpha: float) -> None:
    """Refuse a migration strength outside (0, 1] (`kiln quantize --smooth-alpha` checks before loading)."""
    if not 0 < alpha <= 1:
        raise KilnError(f"SmoothQuant alpha (--smooth-alpha) must be in (0, 1], got {alpha}")


@torch.no_grad()
def smooth(groups: list[SmoothGroup], maxima: dict[str, torch.Tensor], alpha: float = 0.5) -> int:
    """Apply SmoothQuant to every group in place, given calibration input maxima by Linear name
    (kiln.quant.calibration.collect_input_maxima); returns how many groups were smoothed."""
    check_alpha(alpha)
    for group in groups:
        names = [name for name, _ in group.consumers]
        missing = [name for name in names if name not in maxima]
        if missing:
            raise KilnError(f"{group.name}: no calibration input reached {', '.join(missing)}")
        act_max = torch.stack([maxima[name] for name in names]).amax(dim=0)
        weight_max = torch.stack([linear.weight.abs().amax(dim=0).float() for _, linear in group.consumers])
        scales = smoothing_scales(act_max, weight_max.amax(dim=0), alpha)
        for _, linear in group.consumers:
            linear.weight.mul_(scales.to(linear.weight)[None, :])
        for tensor in group.producers:
            shape = (-1,) + (1,) * (tensor.dim() - 1)
            tensor.div_(scales.to(tensor).view(shape))
    return len(groups)
