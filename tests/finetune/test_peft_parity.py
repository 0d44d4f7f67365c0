"""PEFT is the oracle: kiln's LoRA and prompt-tuning adapters load in peft with equal logits, PEFT's load
in kiln with equal logits, and a merged export loads in transformers with identical logits."""

import pytest
import torch

import kiln
from kiln.finetune import (
    LoraConfig,
    PromptTuningConfig,
    apply_lora,
    apply_prompt_tuning,
    attach_adapter,
    merge_lora,
    save_adapter,
)
from tests.hf_cases import build_hf_model

TOLERANCE = 1e-4
LORA_CASES = [
    ("llama-gqa3-untied", "q,k,v,o,gate,up,down"),
    ("llama-mha-bias-tied", "q,v"),
    ("qwen2-gqa2-tied", "q,k,v,o"),
    ("mistral-gqa4-window", "o,gate,down"),
    ("gpt2-heads4-untied", "o,up,down"),  # Conv1D layers: PEFT's fan_in_fan_out
    ("bigcode-mqa", "o,up"),
]


def _randomise_lora(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def _ids(seed=0, shape=(2, 11)):
    return torch.randint(3, 101, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("case", "targets"), LORA_CASES)
def test_kiln_lora_loads_in_peft(case, targets, tmp_path):
    from peft import PeftModel

    hf = build_hf_model(case, tmp_path / "base")
    model = kiln.load_model(tmp_path / "base")
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets=targets))
    _randomise_lora(model)
    save_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = _ids()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        got = model(ids)
        # the adapter must matter: its logits differ from the base model's
        assert (got - kiln.load_model(tmp_path / "base")(ids)).abs().max() > 1e-2
    assert (expected - got).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("case", ["llama-gqa3-untied", "gpt2-heads3-tied", "bloom-heads3"])
def test_kiln_prompt_tuning_loads_in_peft(case, tmp_path):
    from peft import PeftModel

    hf = build_hf_model(case, tmp_path / "base")
    model = apply_prompt_tuning(kiln.load_model(tmp_path / "base"), PromptTuningConfig(num_virtual_tokens=5))
    with torch.no_grad():
        model.prompt.normal_(0, 1.0)
    save_adapter(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = _ids(1)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits[:, 5:]  # PEFT returns the virtual tokens' rows too
        got = model(ids)
    assert got.shape == (2, 11, 101)
    assert (expected - got).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("case", ["llama-gqa3-untied", "gpt2-heads4-untied"])
def test_peft_lora_loads_in_kiln(case, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    hf = build_hf_model(case, tmp_path / "base")
    targets = ["q_proj", "v_proj", "down_proj"] if case.startswith("llama") else ["c_proj", "c_fc"]
    peft_config = PeftLoraConfig(r=4, lora_alpha=12, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(hf, peft_config).eval()  # random A and B: a non-trivial update
    peft_model.save_pretrained(tmp_path / "adapter")
    model = attach_adapter(kiln.load_model(tmp_path / "base"), tmp_path / "adapter")
    ids = _ids(2)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        got = model(ids)
        assert (expected - kiln.load_model(tmp_path / "base")(ids)).abs().max() > 1e-2
    assert (expected - got).abs().max().item() <= TOLERANCE


def test_peft_prompt_tuning_loads_in_kiln(tmp_path):
    from peft import PromptTuningConfig as PeftPromptConfig
    from peft import get_peft_model

    hf = build_hf_model("llama-gqa3-untied", tmp_path / "base")
    peft_model = get_peft_model(hf, PeftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=7)).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    model = attach_adapter(kiln.load_model(tmp_path / "base"), tmp_path / "adapter")
    ids = _ids(3)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits[:, 7:]
        got = model(ids)
    assert (expected - got).abs().max().item() <= TOLERANCE


def test_merged_export_loads_in_transformers(tmp_path):
    import transformers

    build_hf_model("llama-gqa3-untied", tmp_path / "base")
    model = kiln.load_model(tmp_path / "base")
    apply_lora(model, LoraConfig(rank=8, alpha=16, targets="q,v,up"))
    _randomise_lora(model)
    ids = _ids(4)
    with torch.no_grad():
        adapted = model(ids)
    assert merge_lora(model) == 6
    kiln.save_model(model, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        from_transformers = merged(input_ids=ids).logits
        from_kiln = kiln.load_model(tmp_path / "merged")(ids)
    assert torch.equal(from_transformers, from_kiln) or (from_transformers - from_kiln).abs().max() <= 1e-5
    assert (adapted - from_kiln).abs().max().item() <= TOLERANCE
