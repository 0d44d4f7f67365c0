"""GPT-2: learned positions, LayerNorm, GELU MLP, Conv1D (in, out) weights with a fused QKV."""

from __future__ import annotations

from typing import Any

from kiln.config import ModelConfig
from kiln.models.hf.spec import (
    ConfigReader,
    Family,
    activation_from_hf,
    activation_to_hf,
    concatenated_qkv,
    rename,
    require,
    special_tokens,
    transposed,
)

_LAYER = "transformer.h.{i}."
_KILN = "layers.{i}."
_QKV = tuple(f"{_KILN}attn.{p}_proj." for p in "qkv")

WEIGHTS = (
    rename("transformer.wte.weight", "embed_tokens.weight"),
    rename("transformer.wpe.weight", "embed_positions.weight"),
    rename(_LAYER + "ln_1.weight", _KILN + "attn_norm.weight"),
    rename(_LAYER + "ln_1.bias", _KILN + "attn_norm.bias"),
    concatenated_qkv(_LAYER + "attn.c_attn.weight", tuple(p + "weight" for p in _QKV), conv1d=True),
    concatenated_qkv(_LAYER + "attn.c_attn.bias", tuple(p + "bias" for p in _QKV)),
    transposed(_LAYER + "attn.c_proj.weight", _KILN + "attn.o_proj.weight"),
    rename(_LAYER + "attn.c_proj.bias", _KILN + "attn.o_proj.bias"),
    rename(_LAYER + "ln_2.weight", _KILN + "mlp_norm.weight"),
    rename(_LAYER + "ln_2.bias", _KILN + "mlp_norm.bias"),
    transposed(_LAYER + "mlp.c_fc.weight", _KILN + "mlp.up_proj.weight"),
    rename(_LAYER + "mlp.c_fc.bias", _KILN + "mlp.up_proj.bias"),
    transposed(_LAYER + "mlp.c_proj.weight", _KILN + "mlp.down_proj.weight"),
    rename(_LAYER + "mlp.c_proj.bias", _KILN + "mlp.down_proj.bias"),
    rename("transformer.ln_f.weight", "norm.weight"),
    rename("transformer.ln_f.bias", "norm.bias"),
    rename("lm_head.weight", "lm_head.weight"),
)


def gpt2_style_config(
    hf: ConfigReader, family: str, default_activation: str, **overrides: Any
) -> ModelConfig:
    """GPT-2's config keys (n_embd, n_layer, ...), shared by GPT-BigCode."""
    hf.unsupported("scale_attn_by_inverse_layer_idx", bool, "per-layer attention scaling")
    hf.unsupported("scale_attn_weights", lambda v: not v, "unscaled attention")
    hidden = hf["n_embd"]
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf["n_layer"],
        num_heads=hf["n_head"],
        intermediate_size=hf.get("n_inner", 4 * hidden),
        max_position_embeddings=hf.get("n_positions", 1024),
        position="learned",
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp="plain",
        activation=activation_from_hf(hf.get("activation_function", default_activation), hf.source),
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        initializer_range=hf.get("initializer_range", 0.02),
        family=family,
        **overrides,
        extra_hf_config=hf.unused(),
    )


def gpt2_style_to_hf(config: ModelConfig, family: str, tanh_name: str) -> dict[str, Any]:
    require(
        config, family, position="learned", norm="layernorm", mlp="plain", embedding_norm=False, qk_norm=False
    )
    require(config, family, qkv_bias=True, out_bias=True, mlp_bias=True, sliding_window=None)
    require(config, family, head_dim=config.hidden_size // config.num_heads)
    return {
        "vocab_size": config.vocab_size,
        "n_embd": config.hidden_size,
        "n_layer": config.num_layers,
        "n_head": config.num_heads,
        "n_inner": config.intermediate_size,
        "n_positions": config.max_position_embeddings,
        "layer_norm_epsilon": config.norm_eps,
        "activation_function": activation_to_hf(config.activation, tanh_name),
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.initializer_range,
        **special_tokens(config),
    }


def _from_hf(hf: ConfigReader) -> ModelConfig:
    return gpt2_style_config(hf, "gpt2", "gelu_new")


def _to_hf(config: ModelConfig) -> dict[str, Any]:
    values = gpt2_style_to_hf(config, "gpt2", "gelu_new")
    require(config, "gpt2", num_kv_heads=config.num_heads)
    return values


GPT2 = Family(
    "gpt2",
    "GPT2LMHeadModel",
    _from_hf,
    _to_hf,
    WEIGHTS,
    "transformer.",
    ignore=(".attn.bias", ".attn.masked_bias"),
)
