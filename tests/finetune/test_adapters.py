"""LoRA and prompt tuning on kiln models: frozen base, trainable counts, merge/unmerge, bad input."""

import json

import pytest
import torch

import kiln
from kiln.errors import KilnError
from kiln.finetune import (
    LoraConfig,
    PromptTuningConfig,
    apply_lora,
    apply_prompt_tuning,
    attach_adapter,
    count_trainable_parameters,
    save_adapter,
)
from tests.hf_cases import build_hf_model

# The demo model's shape (kiln.recipes.demo): d=192, 4 layers, 6 query heads and 2 KV heads of 32, tied.
DEMO = dict(
    vocab_size=8192,
    hidden_size=192,
    num_layers=4,
    num_heads=6,
    num_kv_heads=2,
    intermediate_size=512,
    tie_word_embeddings=True,
)


def _demo_model():
    torch.manual_seed(0)
    return kiln.Transformer(kiln.ModelConfig(**DEMO))


def test_lora_r8_on_q_v_of_the_demo_shape_trains_20480_parameters(capsys):
    model = _demo_model()
    total_before = model.num_parameters()
    names = apply_lora(model, LoraConfig(rank=8, alpha=16, targets="q,v"))
    trainable, total = count_trainable_parameters(model)
    print(f"LoRA r=8 on q,v: {trainable:,} trainable of {total:,} ({100 * trainable / total:.3f}%)")
    # q: A (8, 192) + B (192, 8); v: A (8, 192) + B (64, 8); four layers.
    assert trainable == 4 * (8 * 192 + 192 * 8 + 8 * 192 + 64 * 8) == 20480
    assert total == total_before + trainable
    assert names == [f"layers.{i}.attn.{p}_proj" for i in range(4) for p in "qv"]
    assert "20,480 trainable" in capsys.readouterr().out


def test_prompt_tuning_20_tokens_on_the_demo_shape_trains_3840_parameters():
    model = apply_prompt_tuning(_demo_model(), PromptTuningConfig(num_virtual_tokens=20))
    trainable, _ = count_trainable_parameters(model)
    print(f"prompt tuning, 20 virtual tokens: {trainable:,} trainable")
    assert trainable == 20 * 192 == 3840


def test_fresh_lora_changes_nothing_and_merge_unmerge_round_trip():
    model = _demo_model()
    ids = torch.randint(0, 8192, (2, 9))
    with torch.no_grad():
        before = model(ids)
        apply_lora(model, LoraConfig(rank=4, targets="q,k,v,o,gate,up,down"))
        assert torch.equal(model(ids), before)  # B starts at zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
        adapted = model(ids)
        weight = model.layers[0].attn.q_proj.weight.clone()
        for layer in model.modules():
            if hasattr(layer, "merge"):
                layer.merge()
        assert (model(ids) - adapted).abs().max() < 1e-4
        for layer in model.modules():
            if hasattr(layer, "unmerge"):
                layer.unmerge()
        assert (model.layers[0].attn.q_proj.weight - weight).abs().max() < 1e-6
        assert (model(ids) - adapted).abs().max() < 1e-5


def test_base_stays_frozen_and_only_adapters_get_gradients():
    model = _demo_model()
    apply_lora(model, LoraConfig(rank=2, dropout=0.1, targets="v,down"))
    model.train()
    model(torch.randint(0, 8192, (1, 5))).sum().backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == ("lora_" in name), name


def test_prompt_tuning_init_from_text_uses_its_token_embeddings():
    class Tokens:
        def encode(self, text):
            return [5, 6, 7]

    base = _demo_model()
    expected = base.embed_tokens.weight[[5, 6, 7, 5, 6]].clone()
    model = apply_prompt_tuning(base, PromptTuningConfig(num_virtual_tokens=5, init_text="x"), Tokens())
    assert torch.equal(model.prompt.detach(), expected)


def test_unknown_and_missing_targets_are_one_line_errors():
    with pytest.raises(KilnError, match="unknown LoRA target 'qq'; choose from q,k,v,o,gate,up,down"):
        LoraConfig(targets="q,qq")
    gpt2 = kiln.Transformer(kiln.preset("tiny", mlp="plain", activation="gelu"))
    with pytest.raises(KilnError, match="no 'gate' linear") as error:
        apply_lora(gpt2, LoraConfig(targets="q,gate"))
    assert "\n" not in str(error.value)


def test_adapter_on_another_base_shape_is_a_one_line_error(tmp_path):
    build_hf_model("llama-gqa3-untied", tmp_path / "a")  # hidden 48
    build_hf_model("gpt2-heads4-untied", tmp_path / "b")  # hidden 32
    build_hf_model("qwen2-gqa2-tied", tmp_path / "c")  # hidden 48, 4 heads
    model = kiln.load_model(tmp_path / "a")
    apply_lora(model, LoraConfig(rank=4, targets="k"))
    save_adapter(model, tmp_path / "lora")
    prompt = apply_prompt_tuning(kiln.load_model(tmp_path / "a"), PromptTuningConfig(num_virtual_tokens=3))
    save_adapter(prompt, tmp_path / "prompt")
    with pytest.raises(KilnError, match="trained on another base model") as error:
        attach_adapter(kiln.load_model(tmp_path / "c"), tmp_path / "lora")  # k: 48 -> 16 here, 48 -> 24 there
    assert "\n" not in str(error.value)
    with pytest.raises(KilnError, match="trained on another base model"):
        attach_adapter(kiln.load_model(tmp_path / "b"), tmp_path / "prompt")
    with pytest.raises(KilnError, match="not a PEFT adapter directory"):
        attach_adapter(kiln.load_model(tmp_path / "a"), tmp_path)


def test_unsupported_peft_options_and_types_are_refused(tmp_path):
    build_hf_model("llama-gqa3-untied", tmp_path / "a")
    model = kiln.load_model(tmp_path / "a")
    apply_lora(model, LoraConfig(rank=4, targets="q"))
    save_adapter(model, tmp_path / "lora")
    config_path = tmp_path / "lora" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(KilnError, match="use_dora"):
        attach_adapter(kiln.load_model(tmp_path / "a"), tmp_path / "lora")
    config_path.write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(KilnError, match="'IA3' is not supported"):
        attach_adapter(kiln.load_model(tmp_path / "a"), tmp_path / "lora")


def test_lora_on_a_fused_projection_cannot_be_saved_as_peft(tmp_path):
    build_hf_model("gpt2-heads3-tied", tmp_path / "a")
    model = kiln.load_model(tmp_path / "a")
    apply_lora(model, LoraConfig(rank=2, targets="q"))
    with pytest.raises(KilnError, match="fuses it with other projections"):
        save_adapter(model, tmp_path / "lora")


def test_batched_greedy_equals_one_prompt_at_a_time():
    from kiln.finetune.evaluation import greedy_completion, greedy_completions

    model = apply_prompt_tuning(_demo_model(), PromptTuningConfig(num_virtual_tokens=3)).eval()
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 8192, (n,), generator=generator).tolist() for n in (4, 7, 4, 5, 7)]
    stop = {greedy_completion(model, prompts[0], set(), 1)[0]}  # row 0 stops at once
    expected = [greedy_completion(model, p, stop, 6) for p in prompts]
    assert greedy_completions(model, prompts, stop, 6) == expected
    assert expected[0] == [] and any(expected[1:])
