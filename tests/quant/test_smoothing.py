"""SmoothQuant for w8a8 (kiln/quant/smoothing.py): the smoothed float model computes exactly what the original
did, it wins back w8a8's accuracy on a model with outlier activation channels, and `kiln quantize
--smooth-alpha` writes a dir kiln loads (and refuses what it cannot do)."""

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from kiln.bench.quant import plant_outlier_channels
from kiln.cli import app
from kiln.errors import KilnError
from kiln.models.hf.io import load_model, save_model
from kiln.models.hf.quantize import quantize_dir, smoothing_groups
from kiln.models.transformer import Transformer
from kiln.quant import QuantizedLinear, parse_scheme, quantize_model
from kiln.quant.calibration import collect_input_maxima
from kiln.quant.smoothing import smooth, smoothing_scales
from tests.engine.conftest import CORPUS
from tests.quant.test_formats import CONFIG

LLAMA = CONFIG  # vocabulary 256, hidden 128, 2 layers, GQA 4:2, gated MLP 256
GPT2 = LLAMA.replace(
    norm="layernorm", mlp="plain", activation="gelu", qkv_bias=True, mlp_bias=True, position="learned"
)


def _model(config, seed=0):
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():  # norms away from 1 (and LayerNorm biases away from 0), as in a trained model
        for block in model.layers:
            for norm in (block.attn_norm, block.mlp_norm):
                norm.weight.uniform_(0.5, 2.0)
                if getattr(norm, "bias", None) is not None:
                    norm.bias.normal_(0, 0.1)
    return model


def _batches(seed=1, count=4):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, 32), generator=generator) for _ in range(count)]


def _kl(reference_logits, logits):
    reference = F.log_softmax(reference_logits.float(), -1)
    return (
        F.kl_div(F.log_softmax(logits.float(), -1), reference, log_target=True, reduction="none")
        .sum(-1)
        .mean()
    )


def test_smoothing_scales_are_powers_of_two_and_one_where_a_channel_is_empty():
    act = torch.tensor([16.0, 1.0, 0.0, 4.0, 3.0])
    weight = torch.tensor([1.0, 4.0, 2.0, 0.0, 0.75])
    scales = smoothing_scales(act, weight, alpha=0.5)
    # sqrt(16 / 1) = 4; sqrt(1 / 4) = 0.5; empty channel and zero weight -> 1; sqrt(3 / 0.75) = 2
    assert scales.tolist() == [4.0, 0.5, 1.0, 1.0, 2.0]
    assert smoothing_scales(act, weight, alpha=1.0)[0] == 16.0  # alpha 1: all of the range to the weights
    # nearest power in log2: sqrt(33.3) = 5.77 = 2^2.53 -> 8; sqrt(10 / 0.9) = 3.33 = 2^1.74 -> 4
    assert smoothing_scales(torch.tensor([10.0, 10.0]), torch.tensor([0.3, 0.9]), alpha=0.5).tolist() == [
        8,
        4,
    ]


@pytest.mark.parametrize("config", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_smoothed_model_computes_exactly_what_the_original_did(config):
    model, ids = _model(config), torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    before = model(ids)
    groups = smoothing_groups(model)
    # llama: norm -> q/k/v, norm -> gate/up, up -> down per layer; gpt2 (plain MLP): the two norms only
    assert len(groups) == (3 if config.mlp == "gated" else 2) * config.num_layers
    norm_weight = model.layers[0].attn_norm.weight.clone()
    assert smooth(groups, collect_input_maxima(model, _batches()), alpha=0.5) == len(groups)
    assert not torch.equal(model.layers[0].attn_norm.weight, norm_weight)  # it did move something
    assert torch.equal(model(ids), before)  # powers of two: every product the same float


def test_smoothquant_wins_back_w8a8_accuracy_on_outlier_channels():
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(7))
    reference = _model(LLAMA)
    reference_logits = reference(ids)

    def w8a8_kl(plant: bool, alpha: float | None) -> float:
        model = _model(LLAMA)
        if plant:
            plant_outlier_channels(model)
            assert torch.allclose(model(ids), reference_logits, atol=1e-5)  # the same function
        if alpha is not None:
            smooth(smoothing_groups(model), collect_input_maxima(model, _batches()), alpha)
        quantize_model(model, "w8a8")
        return _kl(reference_logits, model(ids)).item()

    plain, planted, smoothed = w8a8_kl(False, None), w8a8_kl(True, None), w8a8_kl(True, 0.5)
    assert planted > 10 * plain, (plain, planted)  # the outliers are what hurts w8a8
    assert smoothed < planted / 10, (planted, smoothed)  # SmoothQuant takes most of that back
    assert w8a8_kl(False, 0.5) < 2 * plain  # and costs little where there were no outliers


def test_quantize_command_smoothquant(text_model_dir, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "quantize",
            str(text_model_dir),
            str(tmp_path / "q"),
            "--scheme",
            "w8a8",
            "--calibration",
            str(CORPUS[0]),
            "--calibration-tokens",
            "300",
            "--smooth-alpha",
            "0.5",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "(SmoothQuant, alpha 0.5)" in result.output
    quantized, original = load_model(tmp_path / "q"), load_model(text_model_dir)
    assert any(isinstance(m, QuantizedLinear) for m in quantized.modules())
    assert not torch.equal(quantized.layers[0].attn_norm.weight, original.layers[0].attn_norm.weight)
    ids = torch.randint(0, original.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert _kl(original(ids), quantized(ids)) < 0.05  # the smoothed w8a8 model still computes the model


@pytest.mark.parametrize(
    ("scheme", "calibration", "alpha", "message"),
    [
        ("int8", True, 0.5, "--smooth-alpha is for w8a8"),
        ("w8a8", False, 0.5, "needs --calibration"),
        ("w8a8", True, 1.5, "must be in (0, 1]"),
        ("w8a8", True, 0.0, "must be in (0, 1]"),
    ],
)
def test_quantize_smoothquant_refusals(text_model_dir, tmp_path, scheme, calibration, alpha, message):
    with pytest.raises(KilnError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        quantize_dir(
            text_model_dir,
            tmp_path / "q",
            parse_scheme(scheme),
            [CORPUS[0]] if calibration else None,
            300,
            alpha,
        )
    assert not (tmp_path / "q").exists()  # refused before anything was written


def test_save_of_smoothed_float_model_round_trips(tmp_path):
    model = _model(LLAMA)
    smooth(smoothing_groups(model), collect_input_maxima(model, _batches()), 0.5)
    save_model(model, tmp_path / "s")
    ids = torch.randint(0, 256, (1, 16))
    assert torch.equal(load_model(tmp_path / "s")(ids), model(ids))
