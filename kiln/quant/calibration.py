"""GPTQ (Frantar et al., 2022) for int4: quantize a weight's input columns one at a time and push each
column's rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's
inputs (H = X^T X over a few hundred calibration tokens), so the layer's *outputs* on such inputs move as
little as possible. Groups take their scale and zero point from the error-updated weights as they start.

`collect_hessians` runs calibration batches through any module tree (kiln's Transformer included) and
sums X^T X at the input of every plain nn.Linear; `collect_input_maxima` keeps each input channel's largest
|x| there instead (SmoothQuant's statistic, kiln/quant/smoothing.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from kiln.quant.weights import TINY

DAMPING = 0.01  # fraction of the mean diagonal added to H, as the GPTQ reference does


@torch.no_grad()
def _observe_linear_inputs(
    model: nn.Module, batches: Iterable[torch.Tensor], observe: Callable[[str, torch.Tensor], None]
) -> None:
    """Run `model` over `batches`, calling observe(dotted name, x (rows, in_features) fp32 on CPU) at the
    input of every plain nn.Linear."""
    handles = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear:

            def hook(_module, args, name=name):
                observe(name, args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu())

            handles.append(module.register_forward_pre_hook(hook))
    head = getattr(model, "lm_head", None)
    try:
        for batch in batches:
            hidden = model.hidden_states(batch) if hasattr(model, "hidden_states") else model(batch)
            if type(head) is nn.Linear:  # kiln's Transformer computes its head without calling the Linear
                head(hidden)
    finally:
        for handle in handles:
            handle.remove()


def collect_hessians(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dotted Linear name -> mean X^T X (K, K) fp32 of its inputs over `model(batch)` for every batch."""
    sums: dict[str, list] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        total = sums.setdefault(name, [torch.zeros(x.shape[1], x.shape[1]), 0])
        total[0] += x.T @ x
        total[1] += x.shape[0]

    _observe_linear_inputs(model, batches, observe)
    return {name: total / max(count, 1) for name, (total, count) in sums.items() if count}


def collect_input_maxima(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dotted Linear name -> (in_features,) fp32 largest |x| per input channel over `model(batch)`."""
    maxima: dict[str, torch.Tensor] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        largest = x.abs().amax(dim=0)
        maxima[name] = torch.maximum(maxima[name], largest) if name in maxima else largest

    _observe_linear_inputs(model, batches, observe)
    return maxima


def _group_params(w: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale (N,), zero (N,)) of a (N, g) block, as weights.quantize_int4 computes them."""
    if symmetric:
        scale = (w.abs().amax(dim=1) / 7.5).clamp_min(TINY)
        return scale, torch.full_like(scale, 8)
    low, high = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
    scale = ((high - low) / 15).clamp_min(TINY)
    return scale, torch.round(-low / scale).clamp_(0, 15)


@torch.no_grad()
def gptq_int4(
    weight: torch.Tensor, hessian: torch.Tensor, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u (N, K) uint8, scale (N, G), zero (N, G) uint8) as weights.quantize_int4 returns them."""
    w = weight.detach().float().clone()
    out_features, in_features = w.shape
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += DAMPING * torch.diagonal(h).mean() * torch.eye(in_features, dtype=h.dtype)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    groups = in_features // group_size
    u = torch.zeros(out_features, in_features, dtype=torch.uint8)
    scale, zero = torch.zeros(out_features, groups), torch.zeros(out_features, groups)
    for start in range(0, in_features, group_size):
        end, g = start + group_size, start // group_size
        block, errors = w[:, start:end].clone(), torch.zeros(out_features, group_size)
        scale[:, g], zero[:, g] = _group_params(block, symmetric)
        inverse = h_inv[start:end, start:end]
        for i in range(group_size):
            column = block[:, i]
            q = torch.clamp(torch.round(column / scale[:, g]) + zero[:, g], 0, 15)
            u[:, start + i] = q.to(torch.uint8)
            error = (column - (q - zero[:, g]) * scale[:, g]) / inverse[i, i]
            block[:, i:] -= error[:, None] * inverse[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return u, scale, zero.to(torch.uint8)
