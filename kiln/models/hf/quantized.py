"""Quantized model directories: compressed-tensors (read and written) and HF GPTQ int4 (read).

The family's declarative map gives each Linear's HF name; a quantized checkpoint stores that Linear's
integer tensors under the same prefix (`model.layers.0.mlp.up_proj.weight_packed`, `...qweight`) instead
of its `.weight`. Only Linears whose map is a plain rename can be quantized this way (GPT-2's transposed
Conv1D and fused QKV layouts cannot); kiln.LLM(quantization=...) quantizes any family in memory.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kiln.config import ModelConfig
from kiln.errors import KilnError, ModelLoadError
from kiln.models.hf.spec import Family
from kiln.quant import QuantizedLinear, gptq
from kiln.quant import compressed_tensors as ct

# suffix of the stored tensor that marks a quantized Linear, per checkpoint kind
MARKERS = {"compressed-tensors": ("weight_scale",), "gptq": ("qweight",)}


def linear_names(family: Family, config: ModelConfig) -> dict[str, str]:
    """HF module prefix -> kiln module name, for every Linear weight the family maps by plain rename."""
    names = {}
    for rule in family.weights:
        if rule.to_kiln is not None or not rule.hf.endswith(".weight"):
            continue
        for hf_name, (kiln_name,) in rule.expand(config.num_layers):
            names[hf_name.removesuffix(".weight")] = kiln_name.removesuffix(".weight")
    return names


def read_quantized(
    values: dict[str, Any], files, family: Family, config: ModelConfig, source: str
) -> tuple[dict[str, QuantizedLinear], set[str]]:
    """The QuantizedLinears of a checkpoint (kiln module name -> layer) and the HF tensor names they
    used; ({}, set()) for an unquantized one."""
    settings = values.get("quantization_config")
    if not settings:
        return {}, set()
    method = settings.get("quant_method")
    if method not in MARKERS:
        raise ModelLoadError(
            f"{source}: quant_method {method!r} is not supported; kiln reads {', '.join(MARKERS)}"
        )
    marker = MARKERS[method][0]
    prefixes = sorted(
        {name.removesuffix("." + marker) for name in files.file_of if name.endswith("." + marker)}
    )
    names = linear_names(family, config)
    layers, used = {}, set()

    def read(name: str) -> torch.Tensor:
        if name not in files.file_of:
            if name.endswith("g_idx"):  # optional in GPTQ
                raise KeyError(name)
            raise ModelLoadError(f"{source}: tensor {name!r} is missing from the quantized checkpoint")
        used.add(name)
        return files.read(name)

    for prefix in prefixes:
        stored = next((n for n in (prefix, family.base_prefix + prefix) if n in names), None)
        if stored is None:
            raise ModelLoadError(
                f"{source}: tensor {prefix}.{marker} is quantized, but kiln's {family.name} map has no plain "
                "Linear of that name to hold it"
            )
        layers[names[stored]] = _build(method, settings, prefix, read, source)
    return layers, used


def _build(method: str, settings: dict[str, Any], prefix: str, read, source: str) -> QuantizedLinear:
    try:
        if method == "gptq":
            return gptq.from_gptq(prefix, gptq.scheme_of(settings, source), read, gptq.zero_offset(settings))
        scheme, form = ct.scheme_of(settings, source)
        return ct.from_compressed(prefix, scheme, form, read)
    except ModelLoadError:
        raise
    except (KilnError, RuntimeError) as error:  # a shape that cannot be unpacked: a corrupt tensor
        raise ModelLoadError(f"{source}: quantized tensors of {prefix} are corrupt: {error}") from None


def install_quantized(
    model: nn.Module, layers: dict[str, QuantizedLinear], dtype: torch.dtype | None
) -> None:
    """Put each QuantizedLinear in place of its (loaded or meta) nn.Linear, keeping that Linear's bias."""
    for name, layer in layers.items():
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, attribute)
        if (linear.out_features, linear.in_features) != (layer.out_features, layer.in_features):
            raise ModelLoadError(
                f"quantized tensor {layer.name} holds a {layer.out_features}x{layer.in_features} weight but "
                f"config.json implies {linear.out_features}x{linear.in_features}; the checkpoint is corrupt"
            )
        if linear.bias is not None:
            layer.bias = linear.bias.detach().to(dtype or linear.bias.dtype)
        layer.name = name
        setattr(parent, attribute, layer)


def quantized_state(
    model: nn.Module, family: Family, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], Any]:
    """The compressed-tensors tensors of the model's QuantizedLinears by HF name, and their scheme."""
    by_kiln = {kiln: hf for hf, kiln in linear_names(family, model.config).items()}
    tensors, schemes = {}, set()
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedLinear):
            continue
        if name not in by_kiln:
            raise KilnError(f"{name} is quantized but the {family.name} layout cannot store it quantized")
        schemes.add(module.scheme)
        for suffix, tensor in ct.to_compressed(module, dtype).items():
            tensors[f"{by_kiln[name]}.{suffix}"] = tensor
    if len(schemes) > 1:
        raise KilnError("the model mixes quantization schemes; kiln writes one scheme per model")
    return tensors, next(iter(schemes), None)


def unquantized_linears(model: nn.Module, family: Family) -> list[str]:
    """HF names of the Linears left unquantized (compressed-tensors' `ignore` list)."""
    by_kiln = {kiln: hf for hf, kiln in linear_names(family, model.config).items()}
    return [by_kiln[name] for name, m in model.named_modules() if type(m) is nn.Linear and name in by_kiln]
