"""Qwen3 and Qwen3-MoE: Llama's attention with each head's q and k RMS-normalised before RoPE (`qk_norm`).
Qwen3-MoE has routed SwiGLU experts without a shared expert; some layers may keep a dense MLP
(`mlp_only_layers`, `decoder_sparse_step`). The top-k probabilities are renormalised only when
`norm_topk_prob` is set.
"""

from __future__ import annotations

from typing import Any

from kiln.config import ModelConfig
from kiln.models.hf.llama import WEIGHTS, _from_hf, _to_hf
from kiln.models.hf.qwen2_moe import EXPERT_STACKS, _dense_layers
from kiln.models.hf.spec import ConfigReader, Family, rename, require

QK_NORM_WEIGHTS = tuple(
    rename(f"model.layers.{{i}}.self_attn.{name}.weight", f"layers.{{i}}.attn.{name}.weight")
    for name in ("q_norm", "k_norm")
)
_IGNORE = ("rotary_emb.inv_freq",)
ROUTER = rename("model.layers.{i}.mlp.gate.weight", "layers.{i}.mlp.router.weight")


def _qwen3_from_hf(hf: ConfigReader) -> ModelConfig:
    # Qwen3 layers switch to sliding-window attention per layer; kiln applies one rule to all layers.
    hf.unsupported("use_sliding_window", bool, "per-layer sliding windows")
    for key in ("sliding_window", "max_window_layers", "layer_types"):
        hf.get(key)
    return _from_hf(hf, "qwen3", qk_norm=True, out_bias=hf.get("attention_bias", False))


def _qwen3_to_hf(config: ModelConfig) -> dict[str, Any]:
    require(config, "qwen3", out_bias=config.qkv_bias, mlp_bias=False, sliding_window=None)
    return {
        **_to_hf(config, "qwen3", qk_norm=True),
        "attention_bias": config.qkv_bias,
        "use_sliding_window": False,
    }


def _qwen3_moe_from_hf(hf: ConfigReader) -> ModelConfig:
    window = hf.get("sliding_window")  # Qwen3-MoE applies it to every layer, and only when enabled
    return _from_hf(
        hf,
        "qwen3_moe",
        qk_norm=True,
        sliding_window=window if hf.get("use_sliding_window", False) else None,
        num_experts=hf["num_local_experts"],  # transformers' attribute_map names it num_experts
        num_experts_per_token=hf["num_experts_per_tok"],
        moe_intermediate_size=hf["moe_intermediate_size"],
        router_renormalize=hf.get("norm_topk_prob", False),
        dense_layers=_dense_layers(hf, hf["num_hidden_layers"]),
        router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
    )


def _qwen3_moe_to_hf(config: ModelConfig) -> dict[str, Any]:
    require(config, "qwen3_moe", out_bias=config.qkv_bias, mlp_bias=False, shared_expert_intermediate_size=0)
    if config.num_experts == 0:
        require(config, "qwen3_moe", num_experts="at least 2")
    return {
        **_to_hf(config, "qwen3_moe", moe=True, qk_norm=True),
        "attention_bias": config.qkv_bias,
        "use_sliding_window": config.sliding_window is not None,
        "sliding_window": config.sliding_window,
        "num_local_experts": config.num_experts,
        "num_experts_per_tok": config.num_experts_per_token,
        "moe_intermediate_size": config.moe_intermediate_size,
        "norm_topk_prob": config.router_renormalize,
        "mlp_only_layers": list(config.dense_layers),
        "decoder_sparse_step": 1,
        "router_aux_loss_coef": config.router_aux_loss_coef,
    }


QWEN3 = Family(
    "qwen3", "Qwen3ForCausalLM", _qwen3_from_hf, _qwen3_to_hf, (*WEIGHTS, *QK_NORM_WEIGHTS), "model.", _IGNORE
)
QWEN3_MOE = Family(
    "qwen3_moe",
    "Qwen3MoeForCausalLM",
    _qwen3_moe_from_hf,
    _qwen3_moe_to_hf,
    (*WEIGHTS, *QK_NORM_WEIGHTS, ROUTER),
    "model.",
    _IGNORE,
    expert_stacks=EXPERT_STACKS,
)
