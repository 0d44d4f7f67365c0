"""`kiln bench loki` and `kiln bench bigbird` end to end at tiny sizes (seconds)."""

import json

import pytest
from typer.testing import CliRunner

from kiln.cli import app
from kiln.kernels.cpu_extension import cpu_ops_available
from tests.hf_cases import build_loki_model


def invoke(*args: str):
    result = CliRunner().invoke(app, ["bench", *args])
    assert result.exit_code == 0, result.output
    return result


def test_bench_loki_decode_times_every_backend(tmp_path):
    output = tmp_path / "decode.json"
    invoke("loki", "decode", "--contexts", "64,200", "--batch", "2", "--repeats", "1", "--threads", "1",
           "--output", str(output))  # fmt: skip
    written = json.loads(output.read_text())
    assert written["batch"] == 2 and written["rank"] == 8 and written["top_k"] == 0.25
    backends = {"dense torch", "Loki torch"} | (
        {"dense C++ (engine default)", "Loki C++"} if cpu_ops_available() else set()
    )
    assert set(written["seconds"]) == {"64", "200"}
    for row in written["seconds"].values():
        assert set(row) == backends and all(seconds > 0 for seconds in row.values())


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny random model calibrated by `kiln calibrate-loki`, and a token shard as its validation."""
    directory = tmp_path_factory.mktemp("loki-bench")
    return directory, build_loki_model(directory)


def perplexity(calibrated, tmp_path, top_k: str) -> dict:
    directory, tokens = calibrated
    output = tmp_path / f"ppl-{top_k}.json"
    invoke("loki", "perplexity", "--model", str(directory), "--val", str(tokens), "--seq-len", "64",
           "--num-windows", "3", "--top-k", top_k, "--threads", "1", "--output", str(output))  # fmt: skip
    return json.loads(output.read_text())


def test_bench_loki_perplexity_equals_dense_when_every_key_is_kept(calibrated, tmp_path):
    kept_all = perplexity(calibrated, tmp_path, "1.0")
    assert kept_all["num_windows"] == 3 and kept_all["seq_len"] == 64
    assert kept_all["loki_perplexity"] == pytest.approx(kept_all["dense_perplexity"], rel=1e-5)
    sparse = perplexity(calibrated, tmp_path, "0.1")
    assert sparse["dense_perplexity"] == pytest.approx(kept_all["dense_perplexity"], rel=1e-6)
    assert sparse["loki_perplexity"] != pytest.approx(sparse["dense_perplexity"], rel=1e-4)


@pytest.mark.parametrize("kv_cache_dtype", [None, "int8"])
def test_bench_loki_engine_times_dense_and_loki_decodes(calibrated, tmp_path, kv_cache_dtype):
    directory, _ = calibrated
    output = tmp_path / "engine.json"
    extra = ["--kv-cache-dtype", kv_cache_dtype] if kv_cache_dtype else []
    invoke("loki", "engine", "--model", str(directory), "--contexts", "40,70", "--batches", "1,2",
           "--new-tokens", "3", "--rounds", "1", "--threads", "1", "--output", str(output),
           *extra)  # fmt: skip
    result = json.loads(output.read_text())
    assert result["kv_cache_dtype"] == kv_cache_dtype
    rows = result["rows"]
    assert [(row["context"], row["batch"]) for row in rows] == [(40, 1), (40, 2), (70, 1), (70, 2)]
    for row in rows:
        assert row["dense_tokens_per_second"] > 0 and row["loki_tokens_per_second"] > 0
        ratio = row["loki_tokens_per_second"] / row["dense_tokens_per_second"]
        assert row["loki_speed_vs_dense"] == pytest.approx(ratio)


def test_bench_loki_says_what_is_missing(tmp_path):
    wide = {"COLUMNS": "300", "TERMINAL_WIDTH": "300"}
    result = CliRunner().invoke(
        app, ["bench", "loki", "perplexity", "--model", str(tmp_path / "none")], env=wide
    )
    assert result.exit_code != 0 and "does not exist: pass --model" in result.output
    result = CliRunner().invoke(app, ["bench", "loki", "speed"], env=wide)
    assert result.exit_code != 0 and "decode, engine or perplexity" in result.output


def test_bench_bigbird_counts_linear_flops(tmp_path):
    output = tmp_path / "bigbird.json"
    invoke("bigbird", "--lengths", "1024,2048", "--repeats", "1", "--no-backward", "--threads", "1",
           "--output", str(output))  # fmt: skip
    rows = json.loads(output.read_text())["rows"]
    assert set(rows) == {"1024", "2048"}
    sparse = {length: rows[length]["bigbird block-sparse"] for length in rows}
    assert all(row["forward_s"] > 0 for row in sparse.values())
    # each query block attends a fixed number of key blocks: twice the tokens, twice the work
    assert sparse["2048"]["gflop"] == pytest.approx(2 * sparse["1024"]["gflop"], rel=0.1)
