"""`kiln bench quant` end to end on the tiny shape (seconds): speed rows per scheme, KL, the JSON."""

import json

from typer.testing import CliRunner

from kiln.cli import app


def test_bench_quant_tiny(tmp_path):
    output = tmp_path / "quant.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "quant",
            "--shape",
            "tiny",
            "--schemes",
            "int8,w8a8",
            "--threads",
            "1",
            "--offline",
            "",
            "--no-kernels",
            "--demo-model",
            str(tmp_path / "none"),
            "--output",
            str(output),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(output.read_text())
    assert [row["scheme"] for row in data["speed"]] == ["bf16", "int8", "w8a8"]
    assert data["speed"][1]["weight_bytes"] < data["speed"][0]["weight_bytes"]
    assert set(data["kl_to_bf16"]) == {"int8", "w8a8"} and all(v >= 0 for v in data["kl_to_bf16"].values())
    assert "batch1 >= 1.8x" in result.output
