"""Bad model directories fail with one clear line that names the file and tensor."""

import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

import kiln
from kiln.errors import ModelLoadError
from tests.hf_cases import build_hf_model


@pytest.fixture
def model_dir(tmp_path):
    build_hf_model("llama-gqa3-untied", tmp_path / "model")
    return tmp_path / "model"


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model directory"):
        kiln.load_model(tmp_path / "nope")


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="is not a model directory: it has no config.json"):
        kiln.load_model(tmp_path)


def test_truncated_safetensors(model_dir):
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: not a readable safetensors file"):
        kiln.load_model(model_dir)


def test_truncated_header(model_dir):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        kiln.load_model(model_dir)


def test_unsupported_family(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
    with pytest.raises(ModelLoadError, match="model_type 't5' is not supported; kiln reads gpt2, llama"):
        kiln.load_model(model_dir)


def test_vocab_size_mismatch_names_file_and_tensor(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "vocab_size": 200}))
    with pytest.raises(
        ModelLoadError,
        match=r"model\.safetensors: tensor 'model\.embed_tokens\.weight' has shape \[101, 48\] "
        r"but config.json implies \[200, 48\] \(vocab_size=200",
    ):
        kiln.load_model(model_dir)


def test_missing_tensor_is_named(model_dir):
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="tensor 'model.layers.1.mlp.up_proj.weight' is missing"):
        kiln.load_model(model_dir)


def test_unexpected_tensor_is_named(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(ModelLoadError, match="unexpected tensor 'model.layers.1"):
        kiln.load_model(model_dir)


def test_pickle_only_checkpoint_is_refused_without_unpickling(model_dir):
    (model_dir / "model.safetensors").unlink()
    # Not a real pickle: if kiln tried to unpickle it, it would fail differently.
    (model_dir / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelLoadError, match="holds only pickle checkpoints.*never unpickles"):
        kiln.load_model(model_dir)


def test_config_that_is_not_json(model_dir):
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json: not valid JSON"):
        kiln.load_model(model_dir)


def test_unsupported_config_feature(model_dir, tmp_path):
    shutil.rmtree(model_dir)
    build_hf_model("bloom-heads3", model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(
        json.dumps({**config, "apply_residual_connection_post_layernorm": True})
    )
    with pytest.raises(
        ModelLoadError, match="apply_residual_connection_post_layernorm=True is not supported"
    ):
        kiln.load_model(model_dir)


@pytest.mark.parametrize("breakage", ["not_a_model", "truncated", "family", "vocab"])
def test_cli_reports_one_line_without_traceback(breakage, model_dir, tmp_path):
    if breakage == "not_a_model":
        target = tmp_path / "empty"
        target.mkdir()
    else:
        target = model_dir
        if breakage == "truncated":
            weights = model_dir / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:1000])
        config = json.loads((model_dir / "config.json").read_text())
        if breakage == "family":
            config["model_type"] = "t5"
        if breakage == "vocab":
            config["vocab_size"] = 50
        (model_dir / "config.json").write_text(json.dumps(config))
    result = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "convert", str(target), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
