"""Quantize a whole model in place: every plain `nn.Linear` becomes a `QuantizedLinear`.

Works on any module tree (kiln's Transformer included: its untied LM head is an nn.Linear, which
Transformer.logits calls when it is replaced), so this layer needs nothing from kiln.models. A tied LM
head is the embedding table and stays in 16/32-bit, as vLLM and compressed-tensors keep it.
"""

from __future__ import annotations

import torch
from torch import nn

from kiln.quant.calibration import gptq_int4
from kiln.quant.linear import QuantizedLinear
from kiln.quant.scheme import QuantScheme, parse_scheme


def _linears(model: nn.Module) -> list[tuple[nn.Module, str, str, nn.Linear]]:
    """(parent, attribute, dotted name, linear) of every plain nn.Linear."""
    found = []
    for parent_name, parent in model.named_modules():
        for attribute, child in parent.named_children():
            if type(child) is nn.Linear:
                name = f"{parent_name}.{attribute}" if parent_name else attribute
                found.append((parent, attribute, name, child))
    return found


def quantize_model(
    model: nn.Module,
    scheme: QuantScheme | str,
    *,
    skip: tuple[str, ...] = (),
    hessians: dict[str, torch.Tensor] | None = None,
) -> int:
    """Replace every nn.Linear (but those whose dotted name contains a `skip` entry) by a QuantizedLinear
    of `scheme`; returns how many. Round to nearest, or for int4 with `hessians` (calibration's X^T X by
    Linear name, `kiln.quant.calibration.collect_hessians`) GPTQ. Every shape is checked first."""
    scheme = parse_scheme(scheme)
    targets = [t for t in _linears(model) if not any(s in t[2] for s in skip)]
    for _, _, name, linear in targets:
        scheme.check_shape(f"{name}.weight", linear.out_features, linear.in_features)
    for parent, attribute, name, linear in targets:
        if scheme.name == "int4" and hessians is not None and name in hessians:
            u, scale, zero = gptq_int4(linear.weight, hessians[name], scheme.group_size, scheme.symmetric)
            quantized = QuantizedLinear.from_integers(u, scale, scheme, zero, linear.bias, name)
        else:
            quantized = QuantizedLinear.from_float(linear.weight, linear.bias, scheme, name)
        setattr(parent, attribute, quantized.to(linear.weight.device))
    return len(targets)


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights occupy: parameters plus the quantized layers' integer weights, scales,
    zero points and biases."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            total += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
    return total
