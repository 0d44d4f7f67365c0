"""kiln.LLM(quantization=...): quantizes on load; greedy outputs equal those of the same model with its
weights replaced by their dequantized values (same numerics, other kernels), batch-invariant; the
start-up line reports the weight bytes before/after; bad requests fail in one line."""

import pytest
import torch
from torch import nn

from kiln.config import ModelConfig
from kiln.engine import LLM, SamplingParams
from kiln.errors import KilnError
from kiln.models.hf.io import load_model, save_model
from kiln.models.transformer import Transformer
from kiln.quant import QuantizedLinear
from tests.engine.conftest import random_prompts

CONFIG = ModelConfig(
    vocab_size=512,
    hidden_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=256,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    eos_token_id=None,
)
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = random_prompts([5, 17, 1, 33, 8], vocab_size=CONFIG.vocab_size)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("quant-engine")
    save_model(Transformer(CONFIG), directory)
    return directory


def _dequantized_dir(llm: LLM, directory):
    """The LLM's quantized model with every QuantizedLinear turned back into an nn.Linear holding the
    dequantized weight, saved as a plain model."""
    model = load_model(directory.parent / directory.name)
    for name, module in llm.engine.model.named_modules():
        if isinstance(module, QuantizedLinear):
            target = model.get_submodule(name)
            assert type(target) is nn.Linear
            target.weight.data.copy_(module.dequantized_weight())
    save_model(model, directory.parent / (directory.name + "-dequantized"))
    return directory.parent / (directory.name + "-dequantized")


def _texts(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("scheme", ["int8", "int4", "w8a8"])
def test_greedy_equals_dequantized_model(model_dir, scheme):
    llm = LLM(model_dir, quantization=scheme, dtype="float32", verbose=False)
    quantized = _texts(llm.generate(PROMPTS, GREEDY))
    if scheme != "w8a8":  # w8a8 quantizes activations too: no dense model computes the same numbers
        dense = LLM(_dequantized_dir(llm, model_dir), dtype="float32", verbose=False)
        assert quantized == _texts(dense.generate(PROMPTS, GREEDY))
    alone = [_texts(llm.generate([p], GREEDY))[0] for p in PROMPTS]
    assert quantized == alone  # batch-invariant


def test_bf16_int8_runs_and_is_batch_invariant(model_dir):
    llm = LLM(model_dir, quantization="int8", dtype="bf16", verbose=False)
    together = _texts(llm.generate(PROMPTS[:3], GREEDY))
    assert together == [_texts(llm.generate([p], GREEDY))[0] for p in PROMPTS[:3]]


def test_startup_line_reports_weight_bytes(model_dir):
    llm = LLM(model_dir, quantization="int4", dtype="bf16", verbose=False)
    line = llm.engine.startup_summary()
    assert "int4 g128: weights " in line and "more KV tokens" in line
    assert sum(isinstance(m, QuantizedLinear) for m in llm.engine.model.modules()) == 2 * 7 + 1


def test_bad_requests(model_dir, tmp_path):
    with pytest.raises(KilnError, match="unknown quantization scheme 'int2'"):
        LLM(model_dir, quantization="int2", verbose=False)
    small = CONFIG.replace(hidden_size=96, num_heads=4, num_kv_heads=2)
    torch.manual_seed(0)
    save_model(Transformer(small), tmp_path / "small")
    with pytest.raises(
        KilnError, match=r"^lm_head\.weight: int4 group size 128 does not divide its 96 input features"
    ):
        LLM(tmp_path / "small", quantization="int4", verbose=False)
    llm = LLM(model_dir, quantization="int8", verbose=False)
    save_model(llm.engine.model, tmp_path / "q")
    with pytest.raises(KilnError, match="already quantized"):
        LLM(tmp_path / "q", quantization="int8", verbose=False)
    assert "int8" not in LLM(tmp_path / "q", verbose=False).engine.startup_summary().split("(")[0]


def test_generate_command_takes_quantization(text_model_dir):
    from typer.testing import CliRunner

    from kiln.cli import app

    args = ["generate", "--model", str(text_model_dir), "--prompt", "def f(x):", "--max-new-tokens", "3"]
    result = CliRunner().invoke(app, [*args, "--temperature", "0", "--quantization", "int8", "--no-stream"])
    assert result.exit_code == 0, result.output
