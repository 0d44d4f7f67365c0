"""BLOOM: ALiBi instead of positions, LayerNorm on the embeddings, per-head interleaved fused QKV."""

from __future__ import annotations

from typing import Any

from kiln.config import ModelConfig
from kiln.models.hf.spec import (
    ConfigReader,
    Family,
    interleaved_qkv,
    rename,
    rename_pair,
    require,
    special_tokens,
)

_LAYER = "transformer.h.{i}."
_KILN = "layers.{i}."
_QKV = tuple(f"{_KILN}attn.{p}_proj." for p in "qkv")


WEIGHTS = (
    rename("transformer.word_embeddings.weight", "embed_tokens.weight"),
    *rename_pair("transformer.word_embeddings_layernorm", "embed_norm"),
    *rename_pair(_LAYER + "input_layernorm", _KILN + "attn_norm"),
    interleaved_qkv(_LAYER + "self_attention.query_key_value.weight", tuple(p + "weight" for p in _QKV)),
    interleaved_qkv(_LAYER + "self_attention.query_key_value.bias", tuple(p + "bias" for p in _QKV)),
    *rename_pair(_LAYER + "self_attention.dense", _KILN + "attn.o_proj"),
    *rename_pair(_LAYER + "post_attention_layernorm", _KILN + "mlp_norm"),
    *rename_pair(_LAYER + "mlp.dense_h_to_4h", _KILN + "mlp.up_proj"),
    *rename_pair(_LAYER + "mlp.dense_4h_to_h", _KILN + "mlp.down_proj"),
    *rename_pair("transformer.ln_f", "norm"),
    rename("lm_head.weight", "lm_head.weight"),
)


def _from_hf(hf: ConfigReader) -> ModelConfig:
    hf.unsupported("apply_residual_connection_post_layernorm", bool, "post-norm residuals")
    hf.unsupported("slow_but_exact", bool, "tensor-parallel-sliced evaluation")
    hidden = hf.get("hidden_size") or hf["n_embed"]
    hf.get("n_embed")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf["n_layer"],
        num_heads=hf["n_head"],
        intermediate_size=4 * hidden,  # fixed by BLOOM's architecture
        # ALiBi has no trained position table; this only bounds the context kiln will plan for.
        max_position_embeddings=hf.get("seq_length", 2048),
        position="alibi",
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp="plain",
        activation="gelu_tanh",
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        embedding_norm=True,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        initializer_range=hf.get("initializer_range", 0.02),
        family="bloom",
        extra_hf_config=hf.unused(),
    )


def _to_hf(config: ModelConfig) -> dict[str, Any]:
    require(
        config, "bloom", position="alibi", norm="layernorm", mlp="plain", embedding_norm=True, qk_norm=False
    )
    require(config, "bloom", qkv_bias=True, out_bias=True, mlp_bias=True, num_kv_heads=config.num_heads)
    require(config, "bloom", intermediate_size=4 * config.hidden_size, activation="gelu_tanh")
    require(config, "bloom", head_dim=config.hidden_size // config.num_heads, sliding_window=None)
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "n_layer": config.num_layers,
        "n_head": config.num_heads,
        "seq_length": config.max_position_embeddings,
        "layer_norm_epsilon": config.norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.initializer_range,
        **special_tokens(config),
    }


BLOOM = Family("bloom", "BloomForCausalLM", _from_hf, _to_hf, WEIGHTS, "transformer.")
