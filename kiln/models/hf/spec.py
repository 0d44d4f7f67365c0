"""The vocabulary of a declarative Hugging Face family map.

A family is a config translation (HF config.json <-> ModelConfig) plus a list of weight rules. A rule
names one HF tensor and the kiln tensor(s) it holds, with an optional pair of transforms for the few
layouts that differ (GPT-2's Conv1D transpose, fused QKV projections). `{i}` in a name is the layer.
A rule applies to a model when every kiln tensor it names exists in that model, so optional tensors
(biases, untied heads, learned positions) need no special cases.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.config import ModelConfig, RopeScaling
from kiln.errors import KilnError, ModelLoadError

Split = Callable[[torch.Tensor, ModelConfig], list[torch.Tensor]]
Merge = Callable[[list[torch.Tensor], ModelConfig], torch.Tensor]


@dataclass(frozen=True)
class WeightRule:
    hf: str
    kiln: tuple[str, ...]
    to_kiln: Split | None = None  # HF tensor -> kiln tensors; None = identity (one kiln tensor)
    to_hf: Merge | None = None

    def expand(self, num_layers: int) -> Iterator[tuple[str, tuple[str, ...]]]:
        """(hf name, kiln names) for every layer when the rule is per layer, else once."""
        if "{i}" not in self.hf:
            yield self.hf, self.kiln
            return
        for i in range(num_layers):
            yield self.hf.format(i=i), tuple(name.format(i=i) for name in self.kiln)

    def split(self, tensor: torch.Tensor, config: ModelConfig) -> list[torch.Tensor]:
        return [tensor] if self.to_kiln is None else self.to_kiln(tensor, config)

    def merge(self, tensors: list[torch.Tensor], config: ModelConfig) -> torch.Tensor:
        return tensors[0] if self.to_hf is None else self.to_hf(tensors, config)


def rename(hf: str, kiln: str) -> WeightRule:
    return WeightRule(hf, (kiln,))


def rename_pair(hf: str, kiln: str) -> tuple[WeightRule, WeightRule]:
    """`.weight` and `.bias` of one layer (LayerNorm, biased Linear) under a new name."""
    return rename(hf + ".weight", kiln + ".weight"), rename(hf + ".bias", kiln + ".bias")


def transposed(hf: str, kiln: str) -> WeightRule:
    """GPT-2's Conv1D stores linear weights as (in, out); kiln's nn.Linear holds (out, in)."""
    return WeightRule(hf, (kiln,), to_kiln=lambda t, c: [t.t()], to_hf=lambda ts, c: ts[0].t())


def _qkv_sizes(config: ModelConfig) -> list[int]:
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return [q, kv, kv]


def concatenated_qkv(hf: str, kiln: tuple[str, str, str], conv1d: bool = False) -> WeightRule:
    """One fused tensor holding [all of Q; all of K; all of V] along the output dimension."""

    def split(t: torch.Tensor, c: ModelConfig) -> list[torch.Tensor]:
        t = t.t() if conv1d and t.dim() == 2 else t
        return list(t.split(_qkv_sizes(c), dim=0))

    def merge(ts: list[torch.Tensor], c: ModelConfig) -> torch.Tensor:
        t = torch.cat(ts, dim=0)
        return t.t() if conv1d and t.dim() == 2 else t

    return WeightRule(hf, kiln, split, merge)


def interleaved_qkv(hf: str, kiln: tuple[str, str, str]) -> WeightRule:
    """One fused tensor laid out per head as (H, 3, D): BLOOM, and GPT-BigCode without multi-query."""

    def split(t: torch.Tensor, c: ModelConfig) -> list[torch.Tensor]:
        per_head = t.reshape(c.num_heads, 3, c.head_dim, *t.shape[1:])
        return [per_head[:, j].reshape(c.num_heads * c.head_dim, *t.shape[1:]) for j in range(3)]

    def merge(ts: list[torch.Tensor], c: ModelConfig) -> torch.Tensor:
        rest = ts[0].shape[1:]
        stacked = torch.stack([t.reshape(c.num_heads, c.head_dim, *rest) for t in ts], dim=1)
        return stacked.reshape(3 * c.num_heads * c.head_dim, *rest)

    return WeightRule(hf, kiln, split, merge)


@dataclass(frozen=True)
class ExpertStack:
    """One HF tensor per expert (`{i}` the layer, `{e}` the expert) <-> one stacked kiln tensor (E, ...).

    Mixtral and Qwen-MoE checkpoints store each expert's projections separately; kiln holds each
    projection of all experts as one (E, out, in) parameter (grouped matmuls, expert-parallel sharding).
    Stacking and unbinding copy bytes unchanged, so a load -> save round trip is exact.
    """

    hf: str
    kiln: str

    def expand(self, num_layers: int, num_experts: int) -> Iterator[tuple[tuple[str, ...], str]]:
        """(the per-expert HF names, the stacked kiln name) for every layer."""
        for i in range(num_layers):
            yield tuple(self.hf.format(i=i, e=e) for e in range(num_experts)), self.kiln.format(i=i)


@dataclass(frozen=True)
class Family:
    """One Hugging Face model family: how its config and weights map onto kiln's."""

    name: str  # the HF model_type written on save
    architecture: str  # the HF class name written into config.json "architectures"
    config_from_hf: Callable[[ConfigReader], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    weights: tuple[WeightRule, ...]
    base_prefix: str  # checkpoints saved from the base model (no LM head) omit this prefix
    ignore: tuple[str, ...] = ()  # substrings of HF tensor names that hold no weights (masks, caches)
    read_types: tuple[str, ...] = field(default=())  # extra model_type values this family reads
    expert_stacks: tuple[ExpertStack, ...] = ()  # per-expert HF tensors <-> stacked kiln experts (MoE)


class ConfigReader:
    """Reads an HF config dict and remembers which keys were used; the rest ride along unchanged."""

    # Keys that describe a particular save, not the model; rewritten on every save.
    TRANSIENT = (
        "transformers_version",
        "dtype",
        "torch_dtype",
        "_name_or_path",
        "architectures",
        "model_type",
    )

    def __init__(self, values: dict[str, Any], source: str) -> None:
        self.values = values
        self.source = source
        self.used: set[str] = set(self.TRANSIENT)

    def __getitem__(self, key: str) -> Any:
        if key not in self.values:
            raise ModelLoadError(
                f"{self.source}: config.json has no {key!r}, which a {self.model_type} model needs"
            )
        self.used.add(key)
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        value = self.values.get(key)
        return default if value is None else value

    @property
    def model_type(self) -> str:
        return self.values.get("model_type", "?")

    def unsupported(self, key: str, bad: Callable[[Any], bool], why: str) -> None:
        """Refuse a config whose `key` holds a value kiln does not implement."""
        if key in self.values and bad(self.values[key]):
            raise ModelLoadError(
                f"{self.source}: {key}={self.values[key]!r} is not supported by kiln ({why})"
            )
        self.used.add(key)

    def unused(self) -> dict[str, Any]:
        return {k: v for k, v in self.values.items() if k not in self.used}

    def rope(self) -> tuple[float, RopeScaling | None]:
        """rope_theta and scaling from either transformers 5 `rope_parameters` or the older top-level keys."""
        params = dict(self.get("rope_parameters") or self.get("rope_scaling") or {})
        theta = float(params.get("rope_theta", self.get("rope_theta", 10000.0)))
        kind = params.get("rope_type", params.get("type", "default"))
        if kind == "default":
            return theta, None
        if kind not in ("linear", "llama3"):
            raise ModelLoadError(
                f"{self.source}: RoPE scaling {kind!r} is not supported (kiln has linear, llama3)"
            )
        optional = {
            k: params[k]
            for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            if k in params
        }
        return theta, RopeScaling(kind=kind, factor=float(params["factor"]), **optional)


def activation_from_hf(name: str, source: str) -> str:
    names = {
        "gelu_new": "gelu_tanh",
        "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_fast": "gelu_tanh",
        "gelu": "gelu",
        "silu": "silu",
        "swish": "silu",
        "relu": "relu",
    }
    if name not in names:
        raise ModelLoadError(f"{source}: activation {name!r} is not supported; kiln has {', '.join(names)}")
    return names[name]


def activation_to_hf(name: str, tanh_name: str) -> str:
    return {"gelu_tanh": tanh_name}.get(name, name)


def rope_to_hf(config: ModelConfig) -> dict[str, Any]:
    """transformers 5 reads `rope_parameters`; the top-level `rope_theta` serves older readers."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    scaling = config.rope_scaling
    if scaling is not None:
        params.update(rope_type=scaling.kind, factor=scaling.factor)
        if scaling.kind == "llama3":
            params.update(
                low_freq_factor=scaling.low_freq_factor,
                high_freq_factor=scaling.high_freq_factor,
                original_max_position_embeddings=scaling.original_max_position_embeddings,
            )
    return {"rope_parameters": params, "rope_theta": config.rope_theta}


def require(config: ModelConfig, family: str, **expected: Any) -> None:
    """Refuse to save a model in a family that cannot express it."""
    for key, value in expected.items():
        actual = getattr(config, key)
        if actual != value:
            raise KilnError(
                f"this model cannot be saved as {family!r}: it has {key}={actual!r}, the family needs "
                f"{value!r}; save it as another family (e.g. family='llama')"
            )


def special_tokens(config: ModelConfig) -> dict[str, Any]:
    return {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }
