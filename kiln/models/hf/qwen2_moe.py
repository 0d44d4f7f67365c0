"""Qwen2-MoE: Qwen2's attention (q/k/v biases) with routed SwiGLU experts plus one shared expert whose
output a per-token sigmoid gate scales; some layers may keep a dense MLP (`mlp_only_layers`,
`decoder_sparse_step`). The top-k probabilities are renormalised only when `norm_topk_prob` is set.
"""

from __future__ import annotations

from typing import Any

from kiln.config import ModelConfig
from kiln.models.hf.llama import WEIGHTS, _from_hf, _to_hf
from kiln.models.hf.spec import ConfigReader, ExpertStack, Family, rename, require

_MLP = "model.layers.{i}.mlp."
_KILN = "layers.{i}.mlp."

EXPERT_STACKS = tuple(
    ExpertStack(f"{_MLP}experts.{{e}}.{proj}_proj.weight", f"{_KILN}experts.{proj}_proj")
    for proj in ("gate", "up", "down")
)
MOE_WEIGHTS = (
    rename(_MLP + "gate.weight", _KILN + "router.weight"),
    *(
        rename(f"{_MLP}shared_expert.{proj}_proj.weight", f"{_KILN}shared.{proj}_proj.weight")
        for proj in ("gate", "up", "down")
    ),
    rename(_MLP + "shared_expert_gate.weight", _KILN + "shared_gate.weight"),
)


def _dense_layers(hf: ConfigReader, num_layers: int) -> list[int]:
    """Qwen2-MoE's rule: layer i is sparse unless listed in mlp_only_layers or (i + 1) % step != 0."""
    only_mlp, step = set(hf.get("mlp_only_layers", [])), hf.get("decoder_sparse_step", 1)
    return [i for i in range(num_layers) if i in only_mlp or (i + 1) % step]


def _qwen2_moe_from_hf(hf: ConfigReader) -> ModelConfig:
    hf.unsupported("use_sliding_window", bool, "per-layer sliding windows")
    for key in ("sliding_window", "max_window_layers", "layer_types"):
        hf.get(key)
    return _from_hf(
        hf,
        "qwen2_moe",
        qkv_bias=hf.get("qkv_bias", True),
        out_bias=False,
        mlp_bias=False,
        num_experts=hf["num_experts"],
        num_experts_per_token=hf["num_experts_per_tok"],
        moe_intermediate_size=hf["moe_intermediate_size"],
        router_renormalize=hf.get("norm_topk_prob", False),
        num_shared_experts=1,
        shared_expert_intermediate_size=hf["shared_expert_intermediate_size"],
        shared_expert_gate=True,
        dense_layers=_dense_layers(hf, hf["num_hidden_layers"]),
        router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
    )


def _qwen2_moe_to_hf(config: ModelConfig) -> dict[str, Any]:
    require(config, "qwen2_moe", out_bias=False, mlp_bias=False, sliding_window=None, shared_expert_gate=True)
    if config.num_experts == 0 or config.shared_expert_intermediate_size == 0:
        require(config, "qwen2_moe", num_experts="at least 2, with a shared expert")
    return {
        **_to_hf(config, "qwen2_moe", moe=True),
        "use_sliding_window": False,
        "qkv_bias": config.qkv_bias,
        "num_experts": config.num_experts,
        "num_experts_per_tok": config.num_experts_per_token,
        "moe_intermediate_size": config.moe_intermediate_size,
        "shared_expert_intermediate_size": config.shared_expert_intermediate_size,
        "norm_topk_prob": config.router_renormalize,
        "mlp_only_layers": list(config.dense_layers),
        "decoder_sparse_step": 1,
        "router_aux_loss_coef": config.router_aux_loss_coef,
    }


QWEN2_MOE = Family(
    "qwen2_moe",
    "Qwen2MoeForCausalLM",
    _qwen2_moe_from_hf,
    _qwen2_moe_to_hf,
    (*WEIGHTS, *MOE_WEIGHTS),
    "model.",
    ("rotary_emb.inv_freq",),
    expert_stacks=EXPERT_STACKS,
)
