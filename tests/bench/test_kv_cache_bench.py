"""`kiln bench kv-cache` end to end at tiny sizes (seconds): decode rows per model and cache dtype, the
bytes per token, and the demo-quality figures computed on a tiny text model with a stand-in val shard."""

import json

import numpy as np
from typer.testing import CliRunner

from kiln.bench.kv_cache import demo_quality
from kiln.cli import app
from kiln.kernels.cpu_extension import cpu_ops_available
from tests.hf_cases import build_text_model


def test_bench_kv_cache_tiny(tmp_path):
    output = tmp_path / "kv.json"
    args = [
        "bench",
        "kv-cache",
        "--shape",
        "tiny",
        "--context",
        "40",
        "--batches",
        "1,2",
        "--new-tokens",
        "3",
    ]
    args += ["--dtypes", "float32", "--threads", "1", "--demo-model", str(tmp_path / "none")]
    result = CliRunner().invoke(app, [*args, "--output", str(output)])
    assert result.exit_code == 0, result.output
    written = json.loads(output.read_text())
    assert [(row["batch"], row["kv_cache"]) for row in written["speed"]] == [
        (b, c) for b in (1, 2) for c in ("model dtype", "int8", "int4")
    ]
    assert all(row["tokens_per_second"] > 0 for row in written["speed"])
    if cpu_ops_available():
        assert len(written["attention"]) == 6 and all(row["seconds"] > 0 for row in written["attention"])
    per_token = written["bytes_per_token"]["float32"]
    # tiny: head_dim 64, 2 layers, 2 kv heads: fp32 rows 256 bytes, int8 64 + 3, int4 32 + 3
    assert per_token == {"model dtype": 2 * 2 * 2 * 256, "int8": 2 * 2 * 2 * 67, "int4": 2 * 2 * 2 * 35}


def test_demo_quality_figures(tmp_path):
    text_model_dir = build_text_model(tmp_path / "model")
    shard = tmp_path / "val.npy"
    np.save(shard, np.random.default_rng(0).integers(3, 400, 2000).astype(np.uint16))
    figures = demo_quality(text_model_dir, shard, num_prompts=4, new_tokens=4, windows=2, window=32)
    assert figures["model dtype"]["identical"] == 4 and figures["ppl_tokens"] == 62
    for name in ("int8", "int4"):
        assert 0 <= figures[name]["identical"] <= 4 and figures[name]["max_logprob_change"] >= 0
        assert figures[name]["perplexity_vs_model_dtype"] > 0
