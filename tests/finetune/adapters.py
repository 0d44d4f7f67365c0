"""Adapters with random, non-trivial weights for serving tests: two LoRAs and one prompt tuning."""

from __future__ import annotations

from pathlib import Path

import torch

import kiln
from kiln.finetune import LoraConfig, PromptTuningConfig, apply_lora, apply_prompt_tuning, save_adapter


def random_lora(base: Path, target: Path, targets: str, seed: int, scale: float = 0.5) -> Path:
    model = kiln.load_model(base)
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return save_adapter(model, target, base_model=str(base))


def random_prompt(base: Path, target: Path, num_virtual_tokens: int, seed: int) -> Path:
    model = apply_prompt_tuning(
        kiln.load_model(base), PromptTuningConfig(num_virtual_tokens=num_virtual_tokens), seed=seed
    )
    with torch.no_grad():
        model.prompt.mul_(3.0)  # far from the vocabulary's embeddings: clearly different outputs
    return save_adapter(model, target, base_model=str(base))


def three_adapters(base: Path, folder: Path) -> dict[str, Path]:
    return {
        "lora-a": random_lora(base, folder / "lora-a", "q,v,down", seed=1),
        "lora-b": random_lora(base, folder / "lora-b", "k,o,gate,up", seed=2),
        "soft": random_prompt(base, folder / "soft", 6, seed=3),
    }
