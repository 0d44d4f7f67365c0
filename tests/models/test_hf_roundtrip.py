"""kiln save -> transformers load, and transformers save -> kiln load -> save, are exact."""

import json

import pytest
import torch
from safetensors import safe_open

import kiln
from tests.hf_cases import CASE_NAMES, build_hf_model, padded_batch


def _tensors(directory):
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                out[name] = handle.get_tensor(name)
    return out


@pytest.mark.parametrize("case", CASE_NAMES)
def test_kiln_save_loads_in_transformers_with_identical_logits(case, tmp_path):
    import transformers as T

    build_hf_model(case, tmp_path / "hf")
    model = kiln.load_model(tmp_path / "hf")
    kiln.save_model(model, tmp_path / "kiln")
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "kiln").eval()
    ids, mask = padded_batch(seed=3)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask)
        got = reloaded(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert (expected - got)[mask.bool()].abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformers_save_kiln_load_save_is_byte_identical(case, dtype, tmp_path):
    build_hf_model(case, tmp_path / "hf", dtype=dtype)
    kiln.save_model(kiln.load_model(tmp_path / "hf"), tmp_path / "kiln")
    original, resaved = _tensors(tmp_path / "hf"), _tensors(tmp_path / "kiln")
    assert sorted(original) == sorted(resaved)
    for name, tensor in original.items():
        assert tensor.dtype == resaved[name].dtype, name
        assert tensor.shape == resaved[name].shape, name
        assert tensor.contiguous().view(torch.uint8).equal(resaved[name].view(torch.uint8)), name


def test_sharded_checkpoints_load_and_save(tmp_path):
    build_hf_model("llama-gqa3-untied", tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    model = kiln.load_model(tmp_path / "hf")
    kiln.save_model(model, tmp_path / "kiln", max_shard_size="20KB")
    index = json.loads((tmp_path / "kiln" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / "kiln" / s).is_file() for s in shards)
    assert _tensors(tmp_path / "hf").keys() == _tensors(tmp_path / "kiln").keys()
    again = kiln.load_model(tmp_path / "kiln")
    ids = torch.randint(0, 101, (1, 9))
    assert torch.equal(model(ids), again(ids))
    # Re-saving unsharded removes the old shards and index.
    kiln.save_model(again, tmp_path / "kiln")
    assert sorted(p.name for p in (tmp_path / "kiln").glob("*.safetensors*")) == ["model.safetensors"]


def test_kiln_native_model_saves_as_llama(tmp_path):
    import transformers as T

    torch.manual_seed(0)
    model = kiln.Transformer(kiln.preset("tiny")).eval()
    kiln.save_model(model, tmp_path, dtype="bf16")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["dtype"] == "bfloat16"
    hf = T.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 1024, (2, 11))
    with torch.no_grad():
        expected = kiln.load_model(tmp_path, dtype="float32")(ids)
        assert (hf(ids).logits - expected).abs().max() <= 1e-4


def test_cannot_save_in_a_family_that_cannot_express_the_model(tmp_path):
    model = kiln.Transformer(kiln.preset("tiny"))
    with pytest.raises(kiln.KilnError, match="cannot be saved as 'gpt2'.*position"):
        kiln.save_model(model, tmp_path, family="gpt2")


@pytest.mark.parametrize(
    "experts,shared,qk_norm,family",
    [(4, 0, False, "mixtral"), (4, 1, False, "qwen2_moe"), (4, 0, True, "qwen3_moe"), (0, 0, True, "qwen3")],
)
def test_kiln_native_model_saves_as_the_family_that_expresses_it(experts, shared, qk_norm, family, tmp_path):
    import transformers as T

    torch.manual_seed(0)
    config = kiln.preset(
        "tiny",
        num_experts=experts,
        num_experts_per_token=2,
        num_shared_experts=shared,
        shared_expert_gate=bool(shared),
        qk_norm=qk_norm,
    )
    model = kiln.Transformer(config).eval()
    if qk_norm:  # not all ones, so the saved norms are checked
        with torch.no_grad():
            for layer in model.layers:
                layer.attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.attn.k_norm.weight.uniform_(0.5, 1.5)
    kiln.save_model(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == family
    hf = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 1024, (2, 11))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() <= 1e-4
