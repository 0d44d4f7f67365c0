"""kiln module names <-> Hugging Face module names, read off a family's declarative weight map.

A rule that renames (or transposes, GPT-2's Conv1D) one `<module>.weight` names a linear both sides
agree on; a LoRA there is the same tensors under either name. A rule that fuses several kiln linears into
one HF tensor (GPT-2's c_attn, BLOOM's query_key_value) has no per-projection HF name, so a LoRA on one
of them cannot be written in the PEFT format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.config import ModelConfig
from kiln.models.hf import FAMILIES


@dataclass(frozen=True, slots=True)
class LinearName:
    hf: str  # the HF module name, e.g. model.layers.0.self_attn.q_proj
    fused: bool  # the HF tensor holds several kiln linears (no PEFT name for one of them)
    transposed: bool  # the HF layer stores (in, out) weights (GPT-2's Conv1D: PEFT's fan_in_fan_out)


def linear_names(config: ModelConfig, family: str | None = None) -> dict[str, LinearName]:
    """kiln linear module name -> its HF name, for every weight rule of the family over every layer."""
    rules = FAMILIES[family or config.family].weights
    names: dict[str, LinearName] = {}
    for rule in rules:
        if not rule.hf.endswith(".weight"):
            continue
        for hf, kiln in rule.expand(config.num_layers):
            if not all(k.endswith(".weight") for k in kiln):
                continue
            fused = len(kiln) > 1
            transposed = not fused and rule.split(torch.zeros(2, 3), config)[0].shape == (3, 2)
            for name in kiln:
                names[name.removesuffix(".weight")] = LinearName(
                    hf.removesuffix(".weight"), fused, transposed
                )
    return names


def kiln_names(config: ModelConfig, family: str | None = None) -> dict[str, str]:
    """HF module name -> kiln module name, for the linears that are not fused."""
    return {v.hf: k for k, v in linear_names(config, family).items() if not v.fused}
