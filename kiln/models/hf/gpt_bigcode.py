"""GPT-BigCode (StarCoder): GPT-2's shape with nn.Linear weights and multi-query attention."""

from __future__ import annotations

from typing import Any

from kiln.config import ModelConfig
from kiln.models.hf.gpt2 import gpt2_style_config, gpt2_style_to_hf
from kiln.models.hf.spec import (
    ConfigReader,
    Family,
    WeightRule,
    concatenated_qkv,
    interleaved_qkv,
    rename,
    rename_pair,
    require,
)

_LAYER = "transformer.h.{i}."
_KILN = "layers.{i}."
_QKV = tuple(f"{_KILN}attn.{p}_proj." for p in "qkv")


def _fused_qkv(kind: str) -> WeightRule:
    """Multi-query checkpoints concatenate [Q; K; V]; multi-head ones interleave them per head."""
    names = tuple(p + kind for p in _QKV)
    concatenated = concatenated_qkv(_LAYER + "attn.c_attn." + kind, names)
    interleaved = interleaved_qkv(_LAYER + "attn.c_attn." + kind, names)

    def pick(config: ModelConfig) -> WeightRule:
        return concatenated if config.num_kv_heads == 1 else interleaved

    return WeightRule(
        _LAYER + "attn.c_attn." + kind,
        names,
        to_kiln=lambda t, c: pick(c).split(t, c),
        to_hf=lambda ts, c: pick(c).merge(ts, c),
    )


WEIGHTS = (
    rename("transformer.wte.weight", "embed_tokens.weight"),
    rename("transformer.wpe.weight", "embed_positions.weight"),
    *rename_pair(_LAYER + "ln_1", _KILN + "attn_norm"),
    _fused_qkv("weight"),
    _fused_qkv("bias"),
    *rename_pair(_LAYER + "attn.c_proj", _KILN + "attn.o_proj"),
    *rename_pair(_LAYER + "ln_2", _KILN + "mlp_norm"),
    *rename_pair(_LAYER + "mlp.c_fc", _KILN + "mlp.up_proj"),
    *rename_pair(_LAYER + "mlp.c_proj", _KILN + "mlp.down_proj"),
    *rename_pair("transformer.ln_f", "norm"),
    rename("lm_head.weight", "lm_head.weight"),
)


def _from_hf(hf: ConfigReader) -> ModelConfig:
    hf.get("num_key_value_heads")  # derived from multi_query
    num_kv_heads = 1 if hf.get("multi_query", True) else hf["n_head"]
    return gpt2_style_config(hf, "gpt_bigcode", "gelu_pytorch_tanh", num_kv_heads=num_kv_heads)


def _to_hf(config: ModelConfig) -> dict[str, Any]:
    if config.num_kv_heads not in (1, config.num_heads):
        require(config, "gpt_bigcode", num_kv_heads=1)
    values = gpt2_style_to_hf(config, "gpt_bigcode", "gelu_pytorch_tanh")
    return {**values, "multi_query": config.num_kv_heads == 1}


GPT_BIGCODE = Family("gpt_bigcode", "GPTBigCodeForCausalLM", _from_hf, _to_hf, WEIGHTS, "transformer.")
