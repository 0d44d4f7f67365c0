"""Adapters in the PEFT format: `adapter_config.json` + `adapter_model.safetensors`, the keys PEFT uses
for LORA (`base_model.model.<hf module>.lora_A.weight` / `.lora_B.weight`) and PROMPT_TUNING
(`prompt_embeddings`), so `peft.PeftModel.from_pretrained` reads what kiln writes and the other way round.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor

from kiln.errors import KilnError
from kiln.finetune.lora import LoRALinear, install_lora, lora_layers
from kiln.finetune.peft_names import kiln_names, linear_names
from kiln.finetune.prompt_tuning import PromptTunedModel
from kiln.finetune.trainable import freeze

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PROMPT_KEY = "prompt_embeddings"


@dataclass(kw_only=True)
class AdapterWeights:
    """One adapter as read from disk: `method` "lora" (tensors by HF module) or "prompt" (the embeddings)."""

    method: str
    source: str
    config: dict[str, Any]
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # hf module -> (A, B)
    scaling: float = 1.0
    prompt: torch.Tensor | None = None  # (num_virtual_tokens, hidden)

    @property
    def rank(self) -> int:
        return int(self.config.get("r", 0))

    def lora_for(self, model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """kiln module name -> (A (r, in), B (out, r)), checked against `model`'s linears."""
        names = kiln_names(model.config)
        modules = dict(model.named_modules())
        out = {}
        for hf, (a, b) in self.lora.items():
            if hf not in names or names[hf] not in modules:
                raise KilnError(
                    f"{self.source}: the adapter targets {hf}, which this {model.config.family} base model "
                    f"({model.config.num_layers} layers) does not have; it was trained on another base model"
                )
            layer = modules[names[hf]]
            want_a, want_b = (a.shape[0], layer.in_features), (layer.out_features, b.shape[1])
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise KilnError(
                    f"{self.source}: {hf} has LoRA shapes A {list(a.shape)}, B {list(b.shape)} but this base "
                    f"model's layer is {layer.in_features} -> {layer.out_features}; the adapter was trained "
                    "on another base model"
                )
            out[names[hf]] = (a, b)
        return out

    def check_prompt(self, model: nn.Module) -> torch.Tensor:
        hidden = model.config.hidden_size
        if self.prompt is None or self.prompt.dim() != 2 or self.prompt.shape[1] != hidden:
            shape = None if self.prompt is None else list(self.prompt.shape)
            raise KilnError(
                f"{self.source}: prompt embeddings of shape {shape} do not fit this base model "
                f"(hidden_size {hidden}); the adapter was trained on another base model"
            )
        return self.prompt


# -------------------------------------------------------------------------------------------- writing


def save_adapter(model: nn.Module, directory: str | Path, base_model: str | None = None) -> Path:
    """Write the adapter of `model` (a PromptTunedModel, or a model with LoRALinears) as a PEFT directory."""
    return write_adapter(*adapter_state(model, base_model), directory)


def adapter_state(model: nn.Module, base_model: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(PEFT tensors, adapter_config) of `model`'s adapter, full tensors on the CPU. Under FSDP2 the
    parameters are sharded DTensors: every rank must call this (it gathers them), then one writes."""
    if isinstance(model, PromptTunedModel):
        return {PROMPT_KEY: _full_cpu(model.prompt)}, _prompt_config(model, base_model)
    return _lora_tensors_and_config(model, base_model)


def _full_cpu(tensor: torch.Tensor) -> torch.Tensor:
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().float().cpu().contiguous()


def write_adapter(tensors: dict[str, torch.Tensor], config: dict, directory: str | Path) -> Path:
    """Write `adapter_state`'s tensors and config as a PEFT directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def _prompt_config(model: PromptTunedModel, base_model: str | None) -> dict[str, Any]:
    config = model.config
    return {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "num_virtual_tokens": model.num_virtual_tokens,
        "token_dim": config.hidden_size,
        "num_transformer_submodules": 1,
        "num_attention_heads": config.num_heads,
        "num_layers": config.num_layers,
        "prompt_tuning_init": "RANDOM",
        "inference_mode": True,
    }


def _lora_tensors_and_config(model: nn.Module, base_model: str | None):
    layers = lora_layers(model)
    if not layers:
        raise KilnError("the model has no LoRA layers or prompt to save as an adapter")
    names = linear_names(model.config)
    tensors, targets, transposed = {}, [], set()
    for kiln_name, layer in layers.items():
        name = names.get(kiln_name)
        if name is None or name.fused:
            raise KilnError(
                f"LoRA on {kiln_name} cannot be written in the PEFT format: the {model.config.family} "
                "layout fuses it with other projections into one tensor; target other linears "
                "(e.g. o,up,down) or export a merged model (kiln export --merge)"
            )
        tensors[f"{PREFIX}{name.hf}.lora_A.weight"] = _full_cpu(layer.lora_A)
        tensors[f"{PREFIX}{name.hf}.lora_B.weight"] = _full_cpu(layer.lora_B)
        targets.append(name.hf)
        transposed.add(name.transposed)
    ranks = {layer.rank for layer in layers.values()}
    scalings = {layer.scaling for layer in layers.values()}
    if len(ranks) > 1 or len(scalings) > 1 or len(transposed) > 1:
        raise KilnError("save_adapter writes one rank, alpha and layout for all LoRA layers; these differ")
    rank, scaling = ranks.pop(), scalings.pop()
    dropouts = {layer.dropout.p for layer in layers.values() if isinstance(layer.dropout, nn.Dropout)}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": scaling * rank,
        "lora_dropout": dropouts.pop() if dropouts else 0.0,
        "target_modules": _target_modules(targets, names),
        "fan_in_fan_out": transposed.pop(),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return tensors, config


def _target_modules(targets: list[str], names) -> list[str]:
    """Leaf names (q_proj, v_proj) when they select exactly the targeted modules, else full names
    (GPT-2's attention and MLP output projections are both called c_proj)."""
    leaves = {t.rsplit(".", 1)[-1] for t in targets}
    selected = {n.hf for n in names.values() if not n.fused and n.hf.rsplit(".", 1)[-1] in leaves}
    return sorted(leaves) if selected == set(targets) else sorted(targets)


# -------------------------------------------------------------------------------------------- reading


def read_adapter(directory: str | Path) -> AdapterWeights:
    """Read a PEFT adapter directory (LORA or PROMPT_TUNING) without a model."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise KilnError(
            f"{directory} is not a PEFT adapter directory (it needs {CONFIG_NAME} and {WEIGHTS_NAME})"
        )
    try:
        config = json.loads(config_path.read_text())
        tensors = load_file(str(weights_path))
    except (json.JSONDecodeError, SafetensorError, OSError) as error:
        raise KilnError(f"{directory}: unreadable adapter ({error})") from None
    kind = config.get("peft_type")
    if kind == "PROMPT_TUNING":
        if PROMPT_KEY not in tensors:
            raise KilnError(f"{weights_path} has no {PROMPT_KEY!r} tensor")
        return AdapterWeights(
            method="prompt", source=str(directory), config=config, prompt=tensors[PROMPT_KEY]
        )
    if kind != "LORA":
        raise KilnError(
            f"{config_path}: peft_type {kind!r} is not supported; kiln reads LORA and PROMPT_TUNING"
        )
    _refuse_lora_options(config, config_path)
    rank = int(config["r"])
    scaling = config["lora_alpha"] / (rank**0.5 if config.get("use_rslora") else rank)
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            b_key = key.replace(".lora_A.weight", ".lora_B.weight")
            if b_key not in tensors:
                raise KilnError(f"{weights_path}: {key} has no matching {b_key}")
            pairs[module] = (tensors[key], tensors[b_key])
        elif not key.endswith(".lora_B.weight"):
            raise KilnError(f"{weights_path}: unexpected tensor {key!r} (kiln reads LoRA A/B pairs only)")
    return AdapterWeights(method="lora", source=str(directory), config=config, lora=pairs, scaling=scaling)


def _refuse_lora_options(config: dict[str, Any], path: Path) -> None:
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "modules_to_save": bool(config.get("modules_to_save")),
        "bias": config.get("bias", "none") != "none",
    }
    for option, used in unsupported.items():
        if used:
            raise KilnError(f"{path}: LoRA option {option}={config.get(option)!r} is not supported by kiln")


def attach_adapter(
    model: nn.Module, adapter: AdapterWeights | str | Path, trainable: bool = False
) -> nn.Module:
    """Put a read adapter onto a kiln Transformer (frozen base): LoRALinears in place (returns `model`) or
    a PromptTunedModel around it (returned). `trainable` leaves the adapter's own tensors trainable."""
    if not isinstance(adapter, AdapterWeights):
        adapter = read_adapter(adapter)
    freeze(model)
    if adapter.method == "prompt":
        prompt = adapter.check_prompt(model)
        wrapped = PromptTunedModel(model, prompt)
        wrapped.prompt.requires_grad_(trainable)
        return wrapped
    dropout = float(adapter.config.get("lora_dropout") or 0.0) if trainable else 0.0
    for name, (a, b) in adapter.lora_for(model).items():
        layer: LoRALinear = install_lora(model, name, a.shape[0], adapter.scaling, dropout)
        with torch.no_grad():
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
        layer.lora_A.requires_grad_(trainable)
        layer.lora_B.requires_grad_(trainable)
    return model
