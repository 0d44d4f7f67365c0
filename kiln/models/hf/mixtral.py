"""Mixtral: Mistral's attention with every MLP a sparse mixture of 8 (or any number of) SwiGLU experts.

Checkpoints hold each expert's w1 (gate), w3 (up) and w2 (down) separately; kiln stacks them.
"""

from __future__ import annotations

from typing import Any

from kiln.config import ModelConfig
from kiln.models.hf.llama import WEIGHTS, _from_hf, _to_hf
from kiln.models.hf.spec import ConfigReader, ExpertStack, Family, rename, require

_MOE = "model.layers.{i}.block_sparse_moe."
_KILN = "layers.{i}.mlp."

EXPERT_STACKS = (
    ExpertStack(_MOE + "experts.{e}.w1.weight", _KILN + "experts.gate_proj"),
    ExpertStack(_MOE + "experts.{e}.w3.weight", _KILN + "experts.up_proj"),
    ExpertStack(_MOE + "experts.{e}.w2.weight", _KILN + "experts.down_proj"),
)


def _mixtral_from_hf(hf: ConfigReader) -> ModelConfig:
    return _from_hf(
        hf,
        "mixtral",
        sliding_window=hf.get("sliding_window"),
        num_experts=hf["num_local_experts"],
        num_experts_per_token=hf["num_experts_per_tok"],
        moe_intermediate_size=hf["intermediate_size"],
        router_renormalize=True,
        router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
    )


def _mixtral_to_hf(config: ModelConfig) -> dict[str, Any]:
    require(
        config,
        "mixtral",
        qkv_bias=False,
        out_bias=False,
        mlp_bias=False,
        router_renormalize=True,
        shared_expert_intermediate_size=0,
        dense_layers=[],
        moe_intermediate_size=config.intermediate_size,
    )
    if config.num_experts == 0:
        require(config, "mixtral", num_experts="at least 2")
    return {
        **_to_hf(config, "mixtral", moe=True),
        "sliding_window": config.sliding_window,
        "num_local_experts": config.num_experts,
        "num_experts_per_tok": config.num_experts_per_token,
        "router_aux_loss_coef": config.router_aux_loss_coef,
    }


MIXTRAL = Family(
    "mixtral",
    "MixtralForCausalLM",
    _mixtral_from_hf,
    _mixtral_to_hf,
    (*WEIGHTS, rename(_MOE + "gate.weight", _KILN + "router.weight")),
    "model.",
    ("rotary_emb.inv_freq",),
    expert_stacks=EXPERT_STACKS,
)
