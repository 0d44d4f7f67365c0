"""GPTQ calibration for int4: on the calibration inputs it lowers the layer's output error against
round to nearest; `kiln quantize --calibration` writes a dir kiln loads."""

import torch
from torch import nn
from typer.testing import CliRunner

from kiln.cli import app
from kiln.models.hf.io import load_model
from kiln.quant import QuantizedLinear, parse_scheme, quantize_model
from kiln.quant.calibration import collect_hessians, gptq_int4
from kiln.quant.weights import dequantize, quantize_int4
from tests.engine.conftest import CORPUS


def _correlated_inputs(rows, features, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator) / features**0.5
    scales = torch.logspace(-1, 1, features)
    return (torch.randn(rows, features, generator=generator) * scales) @ mixing


def test_gptq_beats_round_to_nearest_on_outputs():
    x = _correlated_inputs(512, 128)
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(1))
    hessian = x.T @ x / x.shape[0]
    for symmetric in (True, False):
        u, scale, zero = gptq_int4(weight, hessian, 32, symmetric)
        assert u.max() <= 15 and scale.shape == (48, 4)
        gptq_error = (x @ (dequantize(u, scale, zero) - weight).T).pow(2).mean()
        rtn_error = (x @ (dequantize(*quantize_int4(weight, 32, symmetric)) - weight).T).pow(2).mean()
        assert gptq_error < 0.8 * rtn_error, (gptq_error, rtn_error)


def test_collect_hessians_and_quantize_model():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    batches = [torch.randn(4, 64) for _ in range(3)]
    hessians = collect_hessians(model, batches)
    x = torch.cat(batches)
    torch.testing.assert_close(hessians["0"], x.T @ x / len(x))
    assert hessians["2"].shape == (32, 32)
    assert quantize_model(model, parse_scheme("int4", 32), hessians=hessians) == 2
    assert isinstance(model[2], QuantizedLinear)


def test_quantize_command_with_calibration(text_model_dir, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "quantize",
            str(text_model_dir),
            str(tmp_path / "q"),
            "--scheme",
            "int4",
            "--group-size",
            "32",
            "--calibration",
            str(CORPUS[0]),
            "--calibration-tokens",
            "300",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "(GPTQ)" in result.output
    model = load_model(tmp_path / "q")
    assert any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert (tmp_path / "q" / "tokenizer.json").is_file()
