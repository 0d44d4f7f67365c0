"""Quantized model directories: kiln writes the compressed-tensors layout, reads it back, and
transformers + compressed-tensors (the oracle) load the same directory to the same logits; HF GPTQ dirs
packed here from known integers load with exact weights; corrupt or unsupported input fails in one line
naming the tensor."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.config import ModelConfig
from kiln.errors import KilnError, ModelLoadError
from kiln.models.hf.io import load_model, save_model
from kiln.models.transformer import Transformer
from kiln.quant import QuantizedLinear, parse_scheme, quantize_model
from kiln.quant.compressed_tensors import pack_int32

CONFIG = ModelConfig(
    vocab_size=256,
    hidden_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=256,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
LINEARS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


def _quantized_dir(tmp_path, scheme, seed=0):
    torch.manual_seed(seed)
    model = Transformer(CONFIG).eval()
    quantize_model(model, scheme)
    save_model(model, tmp_path / "q")
    return model, tmp_path / "q"


def _logits(model, ids):
    with torch.no_grad():
        return model.logits(model.hidden_states(ids))


def _dequantized(model):
    return {
        name: m.dequantized_weight() for name, m in model.named_modules() if isinstance(m, QuantizedLinear)
    }


@pytest.mark.parametrize(
    "scheme", ["int8", "int4", "w8a8", parse_scheme("int4", 64, symmetric=False)], ids=str
)
def test_kiln_reload_is_exact(tmp_path, scheme):
    model, directory = _quantized_dir(tmp_path, scheme)
    loaded = load_model(directory)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 9))
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)
    assert json.loads((directory / "config.json").read_text())["quantization_config"]["quant_method"] == (
        "compressed-tensors"
    )


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_transformers_loads_kiln_dir_to_same_logits(tmp_path, scheme):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    model, directory = _quantized_dir(tmp_path, scheme)
    peer = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = torch.randint(0, CONFIG.vocab_size, (2, 9))
    with torch.no_grad():
        expected = peer(ids).logits
    torch.testing.assert_close(_logits(load_model(directory), ids), expected, rtol=0, atol=1e-3)


def test_transformers_reads_w8a8_exactly(tmp_path):
    """transformers runs w8a8 compressed: int8 weights and scales equal kiln's; its per-token activation
    scale is max |x| / 127.5 over [-128, 127] (kiln: / 127 over [-127, 127]), so logits agree only to
    that rounding (checked loosely)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    model, directory = _quantized_dir(tmp_path, "w8a8")
    peer = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            hf_name = "model." + name.replace("attn.", "self_attn.") if name != "lm_head" else name
            theirs = peer.get_submodule(hf_name)
            assert torch.equal(theirs.weight, module.qweight)
            torch.testing.assert_close(theirs.weight_scale.float(), module.scale, rtol=0, atol=0)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 9))
    with torch.no_grad():
        expected = peer(ids).logits
    got = _logits(load_model(directory), ids)
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()


def test_compressed_tensors_decompresses_zero_points(tmp_path):
    """int4 with zero points: the package's own decompressor gives kiln's dequantized weights."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    model, directory = _quantized_dir(tmp_path, parse_scheme("int4", 64, symmetric=False))
    group = json.loads((directory / "config.json").read_text())["quantization_config"]["config_groups"]
    scheme = QuantizationScheme.model_validate(group["group_0"])
    tensors = load_file(directory / "model.safetensors")
    prefix = "model.layers.1.mlp.down_proj"
    state = {k.removeprefix(prefix + "."): v for k, v in tensors.items() if k.startswith(prefix + ".")}
    weight = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
    torch.testing.assert_close(weight, model.layers[1].mlp.down_proj.dequantized_weight(), rtol=0, atol=0)
    assert ct is not None


def _gptq_dir(tmp_path, group_size=32):
    """A GPTQ (v1 format, sym) checkpoint packed here from known integers; returns the dir and the
    expected dequantized weights by HF prefix."""
    torch.manual_seed(0)
    save_model(Transformer(CONFIG), tmp_path / "dense")
    tensors = load_file(tmp_path / "dense" / "model.safetensors")
    expected = {}
    for layer in range(CONFIG.num_layers):
        for linear in LINEARS:
            prefix = f"model.layers.{layer}.{linear}"
            out_features, in_features = tensors.pop(prefix + ".weight").shape
            u = torch.randint(0, 16, (out_features, in_features))
            scales = (torch.rand(in_features // group_size, out_features) + 0.5).half() / 64
            tensors[prefix + ".qweight"] = pack_int32(u, 4).T.contiguous()  # (K / 8, N), packed along K
            tensors[prefix + ".qzeros"] = pack_int32(
                torch.full((in_features // group_size, out_features), 7), 4
            )
            tensors[prefix + ".scales"] = scales
            tensors[prefix + ".g_idx"] = (torch.arange(in_features) // group_size).to(torch.int32)
            expected[prefix] = (u - 8).float() * scales.float().T.repeat_interleave(group_size, dim=1)
    directory = tmp_path / "gptq"
    directory.mkdir()
    save_file(tensors, directory / "model.safetensors")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": group_size,
        "sym": True,
        "desc_act": False,
        "checkpoint_format": "gptq",
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory, expected


def test_gptq_dir_loads_exact_weights(tmp_path):
    directory, expected = _gptq_dir(tmp_path)
    model = load_model(directory)
    for prefix, weight in expected.items():
        name = prefix.removeprefix("model.").replace("self_attn.", "attn.")
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantizedLinear) and layer.scheme.group_size == 32
        torch.testing.assert_close(layer.dequantized_weight(), weight, rtol=0, atol=0)
    assert type(model.lm_head) is torch.nn.Linear  # GPTQ leaves the head in 16-bit


def test_gptq_act_order_refused(tmp_path):
    directory, _ = _gptq_dir(tmp_path)
    tensors = load_file(directory / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.g_idx"
    tensors[name] = tensors[name].flip(0)
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"model\.layers\.0\.mlp\.up_proj\.g_idx: act-order"):
        load_model(directory)


@pytest.mark.parametrize(
    ("tensor", "change", "message"),
    [
        (
            "model.layers.0.mlp.up_proj.weight_packed",
            lambda t: t[:, :-1].contiguous(),
            "weight_packed is malformed",
        ),
        ("model.layers.1.self_attn.o_proj.weight_scale", lambda t: t[:-1], "weight_scale is malformed"),
        (
            "model.layers.1.self_attn.o_proj.weight_shape",
            None,
            "'model.layers.1.self_attn.o_proj.weight_shape' is missing",
        ),
    ],
)
def test_corrupt_compressed_checkpoint_names_the_tensor(tmp_path, tensor, change, message):
    _, directory = _quantized_dir(tmp_path, "int4")
    tensors = load_file(directory / "model.safetensors")
    if change is None:
        del tensors[tensor]
    else:
        tensors[tensor] = change(tensors[tensor])
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(ModelLoadError, match=message):
        load_model(directory)


def test_unknown_quant_method_refused(tmp_path):
    _, directory = _quantized_dir(tmp_path, "int8")
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "awq"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="quant_method 'awq' is not supported"):
        load_model(directory)


def test_family_that_cannot_store_quantized_linears(tmp_path):
    """GPT-2 stores transposed Conv1D weights: kiln quantizes it in memory, but refuses to write it."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, n_positions=32, vocab_size=128)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    model = load_model(tmp_path / "gpt2")
    quantize_model(model, "int8")
    with pytest.raises(
        KilnError, match=r"layers\.0\.attn\.\w+ is quantized but the gpt2 layout cannot store"
    ):
        save_model(model, tmp_path / "out")
