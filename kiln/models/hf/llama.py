"""Llama, Mistral and Qwen2: the same tensor layout, separate q/k/v projections, RMSNorm, RoPE, SwiGLU."""

from __future__ import annotations

from typing import Any

from kiln.config import ModelConfig
from kiln.errors import ModelLoadError
from kiln.models.hf.spec import (
    ConfigReader,
    Family,
    activation_from_hf,
    rename,
    require,
    rope_to_hf,
    special_tokens,
)

_LAYER = "model.layers.{i}."
_KILN = "layers.{i}."

WEIGHTS = (
    rename("model.embed_tokens.weight", "embed_tokens.weight"),
    rename(_LAYER + "input_layernorm.weight", _KILN + "attn_norm.weight"),
    *(
        rename(f"{_LAYER}self_attn.{proj}_proj.{kind}", f"{_KILN}attn.{proj}_proj.{kind}")
        for proj in ("q", "k", "v", "o")
        for kind in ("weight", "bias")
    ),
    rename(_LAYER + "post_attention_layernorm.weight", _KILN + "mlp_norm.weight"),
    *(
        rename(f"{_LAYER}mlp.{proj}_proj.{kind}", f"{_KILN}mlp.{proj}_proj.{kind}")
        for proj in ("gate", "up", "down")
        for kind in ("weight", "bias")
    ),
    rename("model.norm.weight", "norm.weight"),
    rename("lm_head.weight", "lm_head.weight"),
)


def _from_hf(hf: ConfigReader, family: str, **overrides: Any) -> ModelConfig:
    theta, scaling = hf.rope()
    hf.unsupported("pretraining_tp", lambda v: v != 1, "tensor-parallel-sliced checkpoints")
    values: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads"),
        head_dim=hf.get("head_dim"),
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        position="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="gated",
        activation=activation_from_hf(hf.get("hidden_act", "silu"), hf.source),
        qkv_bias=hf.get("attention_bias", False),
        out_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        initializer_range=hf.get("initializer_range", 0.02),
        family=family,
    )
    values.update(overrides)
    return ModelConfig(**values, extra_hf_config=hf.unused())


def _to_hf(config: ModelConfig, family: str, moe: bool = False, qk_norm: bool = False) -> dict[str, Any]:
    require(
        config, family, position="rope", norm="rmsnorm", mlp="gated", embedding_norm=False, qk_norm=qk_norm
    )
    if not moe:
        require(config, family, num_experts=0)
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.norm_eps,
        "hidden_act": config.activation,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.initializer_range,
        **rope_to_hf(config),
        **special_tokens(config),
    }


# kiln's block-sparse attention (kiln/models/bigbird.py), saved under a key transformers does not read: a
# Llama reader there runs the model with dense attention, which is a different model.
PATTERN_KEY = "kiln_attention_pattern"
_BIGBIRD_FIELDS = ("block_size", "num_window_blocks", "num_global_blocks", "num_random_blocks", "seed")


def _llama_from_hf(hf: ConfigReader) -> ModelConfig:
    pattern = dict(hf.get(PATTERN_KEY) or {})
    if not pattern:
        return _from_hf(hf, "llama")
    kind = pattern.pop("kind", None)
    unknown = sorted(set(pattern) - set(_BIGBIRD_FIELDS))
    if kind != "bigbird" or unknown:
        raise ModelLoadError(f"{hf.source}: {PATTERN_KEY}={hf.get(PATTERN_KEY)!r} is not a pattern kiln has")
    fields = {f"bigbird_{name}": value for name, value in pattern.items()}
    return _from_hf(hf, "llama", attention_pattern="bigbird", **fields)


def _llama_to_hf(config: ModelConfig) -> dict[str, Any]:
    require(config, "llama", sliding_window=None, out_bias=config.qkv_bias)
    attention_bias = {"attention_bias": config.qkv_bias, "mlp_bias": config.mlp_bias}
    pattern = {}
    if config.attention_pattern == "bigbird":
        values = {name: getattr(config, f"bigbird_{name}") for name in _BIGBIRD_FIELDS}
        pattern = {PATTERN_KEY: {"kind": "bigbird", **values}}
    return {**_to_hf(config, "llama"), **attention_bias, **pattern}


def _mistral_from_hf(hf: ConfigReader) -> ModelConfig:
    return _from_hf(hf, "mistral", sliding_window=hf.get("sliding_window"))


def _mistral_to_hf(config: ModelConfig) -> dict[str, Any]:
    require(config, "mistral", qkv_bias=False, out_bias=False, mlp_bias=False)
    return {**_to_hf(config, "mistral"), "sliding_window": config.sliding_window}


def _qwen2_from_hf(hf: ConfigReader) -> ModelConfig:
    # Qwen2 layers switch to sliding-window attention per layer; kiln applies one rule to all layers.
    hf.unsupported("use_sliding_window", bool, "per-layer sliding windows")
    for key in ("sliding_window", "max_window_layers", "layer_types"):
        hf.get(key)
    return _from_hf(hf, "qwen2", qkv_bias=True, out_bias=False, mlp_bias=False)


def _qwen2_to_hf(config: ModelConfig) -> dict[str, Any]:
    require(config, "qwen2", qkv_bias=True, out_bias=False, mlp_bias=False, sliding_window=None)
    return {**_to_hf(config, "qwen2"), "use_sliding_window": False}


_IGNORE = ("rotary_emb.inv_freq",)
LLAMA = Family("llama", "LlamaForCausalLM", _llama_from_hf, _llama_to_hf, WEIGHTS, "model.", _IGNORE)
MISTRAL = Family(
    "mistral", "MistralForCausalLM", _mistral_from_hf, _mistral_to_hf, WEIGHTS, "model.", _IGNORE
)
QWEN2 = Family("qwen2", "Qwen2ForCausalLM", _qwen2_from_hf, _qwen2_to_hf, WEIGHTS, "model.", _IGNORE)
