"""GPT-BigCode (StarCoder): GPT-2's shape with nn.Linear weights and multi-query attention."""

from __future__ import annotations

from typing import Any

from kiln.config import ModelConfig
from kiln.models.hf.spec import (
    ConfigReader,
    Family,
    WeightRule,
    activation_from_hf,
    activation_to_hf,
    concatenated_qkv,
    interleaved_qkv,
    rename,
    require,
    special_tokens,
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


def _pair(hf: str, kiln: str) -> tuple[WeightRule, WeightRule]:
    return rename(hf + ".weight", kiln + ".weight"), rename(hf + ".bias", kiln + ".bias")


WEIGHTS = (
    rename("transformer.wte.weight", "embed_tokens.weight"),
    rename("transformer.wpe.weight", "embed_positions.weight"),
    *_pair(_LAYER + "ln_1", _KILN + "attn_norm"),
    _fused_qkv("weight"),
    _fused_qkv("bias"),
    *_pair(_LAYER + "attn.c_proj", _KILN + "attn.o_proj"),
    *_pair(_LAYER + "ln_2", _KILN + "mlp_norm"),
    *_pair(_LAYER + "mlp.c_fc", _KILN + "mlp.up_proj"),
    *_pair(_LAYER + "mlp.c_proj", _KILN + "mlp.down_proj"),
    *_pair("transformer.ln_f", "norm"),
    rename("lm_head.weight", "lm_head.weight"),
)


def _from_hf(hf: ConfigReader) -> ModelConfig:
    hf.unsupported("scale_attn_weights", lambda v: not v, "unscaled attention")
    hf.get("num_key_value_heads")  # derived from multi_query
    hidden, heads = hf["n_embd"], hf["n_head"]
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf["n_layer"],
        num_heads=heads,
        num_kv_heads=1 if hf.get("multi_query", True) else heads,
        intermediate_size=hf.get("n_inner", 4 * hidden),
        max_position_embeddings=hf.get("n_positions", 1024),
        position="learned",
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp="plain",
        activation=activation_from_hf(hf.get("activation_function", "gelu_pytorch_tanh"), hf.source),
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        initializer_range=hf.get("initializer_range", 0.02),
        family="gpt_bigcode",
        extra_hf_config=hf.unused(),
    )


def _to_hf(config: ModelConfig) -> dict[str, Any]:
    require(config, "gpt_bigcode", position="learned", norm="layernorm", mlp="plain", embedding_norm=False)
    require(config, "gpt_bigcode", qkv_bias=True, out_bias=True, mlp_bias=True, sliding_window=None)
    require(config, "gpt_bigcode", head_dim=config.hidden_size // config.num_heads)
    if config.num_kv_heads not in (1, config.num_heads):
        require(config, "gpt_bigcode", num_kv_heads=1)
    return {
        "vocab_size": config.vocab_size,
        "n_embd": config.hidden_size,
        "n_layer": config.num_layers,
        "n_head": config.num_heads,
        "n_inner": config.intermediate_size,
        "n_positions": config.max_position_embeddings,
        "layer_norm_epsilon": config.norm_eps,
        "activation_function": activation_to_hf(config.activation, "gelu_pytorch_tanh"),
        "multi_query": config.num_kv_heads == 1,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.initializer_range,
        **special_tokens(config),
    }


GPT_BIGCODE = Family("gpt_bigcode", "GPTBigCodeForCausalLM", _from_hf, _to_hf, WEIGHTS, "transformer.")
