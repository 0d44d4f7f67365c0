"""LoRA applied from outside: named linears of any kiln model become `LoRALinear`s that keep the frozen
base weight under its own name (so HF export and the engine see the same tensors) and add a trained
low-rank update B A beside it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kiln.errors import KilnError
from kiln.finetune.config import LORA_TARGETS, LoraConfig
from kiln.finetune.trainable import freeze


class LoRALinear(nn.Linear):
    """An nn.Linear (same `weight` and `bias` tensors) plus `lora_A` (rank, in) and `lora_B` (out, rank).

    forward: x W^T + b + scaling * dropout(x) A^T B^T. B starts at zero, so a fresh adapter changes
    nothing; A starts as PEFT's (Kaiming-uniform). `merge` folds the update into `weight`, `unmerge` takes
    it out again.
    """

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        weight = base.weight
        self.scaling = scaling
        self.lora_A = nn.Parameter(
            torch.empty(rank, self.in_features, dtype=weight.dtype, device=weight.device)
        )
        self.lora_B = nn.Parameter(
            torch.zeros(self.out_features, rank, dtype=weight.dtype, device=weight.device)
        )
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.merged = False

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        low_rank = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (..., out)
        return out + low_rank * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A: (out, in), the update `merge` adds to `weight`."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


def target_modules(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """The names of the kiln linears `targets` (short names, see LORA_TARGETS) select in `model`, in order.

    A target the model does not have (e.g. 'gate' in a GPT-2, whose MLP is not gated) is a one-line error.
    """
    modules = dict(model.named_modules())
    names = []
    for target in targets:
        suffix = "." + LORA_TARGETS[target]
        found = [n for n, m in modules.items() if n.endswith(suffix) and isinstance(m, nn.Linear)]
        if not found:
            present = [t for t, s in LORA_TARGETS.items() if any(n.endswith("." + s) for n in modules)]
            raise KilnError(
                f"this model has no {target!r} linear to put LoRA on; its targets are {','.join(present)}",
                param="targets",
            )
        names.extend(found)
    return sorted(names, key=_module_order(list(modules)))


def _module_order(order: list[str]):
    position = {name: i for i, name in enumerate(order)}
    return lambda name: position[name]


def apply_lora(model: nn.Module, config: LoraConfig, *, freeze_base: bool = True) -> list[str]:
    """Freeze `model` and put a fresh LoRA on every linear `config.targets` selects; returns their names."""
    names = target_modules(model, config.targets)
    if freeze_base:
        freeze(model)
    for name in names:
        install_lora(model, name, config.rank, config.scaling, config.dropout)
    return names


def install_lora(model: nn.Module, name: str, rank: int, scaling: float, dropout: float = 0.0) -> LoRALinear:
    """Replace the nn.Linear called `name` in `model` by a LoRALinear around it (returned)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    base = getattr(parent, child)
    if isinstance(base, LoRALinear):
        raise KilnError(f"{name} already has a LoRA adapter; merge it first (merge_lora) to stack another")
    if type(base) is not nn.Linear:
        raise KilnError(f"{name} is a {type(base).__name__}, not a plain linear layer; LoRA cannot wrap it")
    layer = LoRALinear(base, rank, scaling, dropout)
    setattr(parent, child, layer)
    return layer


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """LoRA layers by their model names (activation checkpointing's wrappers left out of the names)."""
    return {
        name.replace("_checkpoint_wrapped_module.", ""): m
        for name, m in model.named_modules()
        if isinstance(m, LoRALinear)
    }


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA into its base weight and put plain nn.Linears back (for a merged export); returns
    how many it merged."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    for name, layer in layers.items():
        layer.merge()
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight = layer.weight
        plain.bias = layer.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    return len(layers)
