"""Tiny random Hugging Face models, built locally from config objects, for parity tests.

Cases cover every family kiln reads, with odd head counts, GQA ratios 1/2/3/4, multi-query,
tied and untied heads, biases, a sliding window and RoPE scaling.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 101
COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=None, pad_token_id=0)


def _configs():
    import transformers as T

    llama = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, max_position_embeddings=128)
    return {
        "gpt2-heads3-tied": T.GPT2Config(n_embd=48, n_layer=2, n_head=3, n_positions=128, **COMMON),
        "gpt2-heads4-untied": T.GPT2Config(
            n_embd=32, n_layer=3, n_head=4, n_positions=128, tie_word_embeddings=False, **COMMON
        ),
        "llama-gqa3-untied": T.LlamaConfig(num_attention_heads=6, num_key_value_heads=2, **llama, **COMMON),
        "llama-mha-bias-tied": T.LlamaConfig(
            num_attention_heads=4,
            num_key_value_heads=4,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            **llama,
            **COMMON,
        ),
        "llama-mqa-llama3-rope": T.LlamaConfig(
            num_attention_heads=3,
            num_key_value_heads=1,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            **llama,
            **COMMON,
        ),
        "mistral-gqa4-window": T.MistralConfig(
            num_attention_heads=8, num_key_value_heads=2, head_dim=8, sliding_window=7, **llama, **COMMON
        ),
        "qwen2-gqa2-tied": T.Qwen2Config(
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **llama, **COMMON
        ),
        "qwen3-gqa2-bias-headdim8": T.Qwen3Config(
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_bias=True, **llama, **COMMON
        ),
        "bloom-heads3": T.BloomConfig(hidden_size=48, n_layer=2, n_head=3, **COMMON),
        "bloom-heads4-untied": T.BloomConfig(
            hidden_size=32, n_layer=2, n_head=4, tie_word_embeddings=False, **COMMON
        ),
        "bigcode-mqa": T.GPTBigCodeConfig(
            n_embd=48, n_layer=2, n_head=4, n_positions=128, multi_query=True, **COMMON
        ),
        "bigcode-mha-untied": T.GPTBigCodeConfig(
            n_embd=48,
            n_layer=2,
            n_head=3,
            n_positions=128,
            multi_query=False,
            tie_word_embeddings=False,
            **COMMON,
        ),
        **_moe_configs(llama),
    }


def _moe_configs(llama: dict) -> dict:
    """Mixtral (no shared experts), Qwen2-MoE (a gated shared expert) and Qwen3-MoE: odd expert counts,
    top-1/top-2."""
    import transformers as T

    llama = {**llama, **COMMON}
    qwen_moe = dict(moe_intermediate_size=24, shared_expert_intermediate_size=40, **llama)
    return {
        "mixtral-e3-top1-gqa3": T.MixtralConfig(
            num_attention_heads=6, num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=1, **llama
        ),
        "mixtral-e8-top2-mqa": T.MixtralConfig(
            num_attention_heads=4, num_key_value_heads=1, num_local_experts=8, num_experts_per_tok=2, **llama
        ),
        "qwen2moe-e3-top2-shared-tied": T.Qwen2MoeConfig(
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=3,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            tie_word_embeddings=True,
            **qwen_moe,
        ),
        "qwen2moe-e8-top2-renorm-dense0": T.Qwen2MoeConfig(
            num_attention_heads=6,
            num_key_value_heads=3,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[0],
            **qwen_moe,
        ),
        **_qwen3_moe_configs(llama),
    }


def _qwen3_moe_configs(llama: dict) -> dict:
    """Qwen3-MoE (q/k-norm, no shared expert): odd expert counts, top-1/top-2, GQA, a dense layer."""
    import transformers as T

    qwen3 = dict(moe_intermediate_size=24, head_dim=8, **llama)
    return {
        "qwen3moe-e3-top1-gqa3-bias": T.Qwen3MoeConfig(
            num_attention_heads=6,
            num_key_value_heads=2,
            num_experts=3,
            num_experts_per_tok=1,
            attention_bias=True,
            **qwen3,
        ),
        "qwen3moe-e8-top2-renorm-gqa2-dense1": T.Qwen3MoeConfig(
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[1],
            **qwen3,
        ),
    }


MOE_CASE_NAMES = [
    "mixtral-e3-top1-gqa3",
    "mixtral-e8-top2-mqa",
    "qwen2moe-e3-top2-shared-tied",
    "qwen2moe-e8-top2-renorm-dense0",
    "qwen3moe-e3-top1-gqa3-bias",
    "qwen3moe-e8-top2-renorm-gqa2-dense1",
]
CASE_NAMES = [
    "gpt2-heads3-tied",
    "gpt2-heads4-untied",
    "llama-gqa3-untied",
    "llama-mha-bias-tied",
    "llama-mqa-llama3-rope",
    "mistral-gqa4-window",
    "qwen2-gqa2-tied",
    "qwen3-gqa2-bias-headdim8",
    "bloom-heads3",
    "bloom-heads4-untied",
    "bigcode-mqa",
    "bigcode-mha-untied",
    *MOE_CASE_NAMES,
]


def build_hf_model(case: str, directory: Path, seed: int = 0, dtype=torch.float32, **save_kwargs):
    """Build the HF model for `case` with random weights, save it to `directory`, return it (eval)."""
    import transformers as T

    config = _configs()[case]
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    # Wider than HF's default init so logits are peaked and greedy choices are far from ties.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0, 0.2)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):  # not all ones, so the map is tested
                param.uniform_(0.5, 1.5)
    model.save_pretrained(directory, **save_kwargs)
    return model


def padded_batch(seed: int = 0, lengths=(12, 5, 9, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input ids (B, T) and attention mask for prompts of the given lengths."""
    generator = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), longest), generator=generator)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, longest - length :] = 1
    return ids.masked_fill(mask == 0, 0), mask


def build_text_model(directory: Path) -> Path:
    """The `tiny` preset (RoPE, GQA, 1024 positions) with a 400-token byte-level BPE (trained on two stdlib
    files) and its ChatML template, saved as an HF directory: the test model for CLI, engine and server."""
    import json
    import os

    import kiln
    from kiln.tokenizer_training import train_bpe

    tokenizer = train_bpe([Path(os.__file__), Path(json.__file__)], vocab_size=400, show_progress=False)
    torch.manual_seed(0)
    config = kiln.preset(
        "tiny", vocab_size=tokenizer.vocab_size, initializer_range=0.3, eos_token_id=tokenizer.eos_token_id
    )
    kiln.save_model(kiln.Transformer(config), directory, tokenizer=tokenizer)
    return directory


def build_loki_model(directory: Path) -> Path:
    """A tiny random kiln model (head_dim 16, GQA 4:2) saved in `directory` and calibrated by `kiln
    calibrate-loki` on random tokens; returns the token shard (it stands in for validation data too)."""
    import numpy as np
    from typer.testing import CliRunner

    from kiln.cli import app
    from kiln.config import preset
    from kiln.models.hf.io import save_model
    from kiln.models.transformer import Transformer

    torch.manual_seed(0)
    # large initial weights give sharp attention, so which keys Loki keeps shows in the logits
    save_model(Transformer(preset("tiny", max_position_embeddings=256, initializer_range=0.3)), directory)
    tokens = directory / "tokens.npy"
    np.save(tokens, np.random.default_rng(0).integers(0, 1024, 4096).astype(np.uint16))
    result = CliRunner().invoke(
        app,
        ["calibrate-loki", str(directory), "--data", str(tokens), "--seq-len", "64", "--num-tokens", "1024"],
    )
    assert result.exit_code == 0, result.output
    return tokens
