"""The CLI as a user meets it: --help everywhere, generate, convert, info, tokenizer train."""

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import kiln
from kiln.cli import app
from kiln.generation import GenerationConfig, generate
from kiln.tokenizer import Tokenizer
from tests.cli_docs import COMMANDS, DOCUMENTED, REQUIRED_FLAGS
from tests.hf_cases import build_text_model

runner = CliRunner()
CORPUS = [Path(os.__file__), Path(json.__file__)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_text_model(tmp_path_factory.mktemp("model"))


def test_the_docs_name_flags_of_most_verbs():
    # The check below must have something to check: the docs show flags for most verbs.
    assert sum(bool(flags) for flags in DOCUMENTED.values()) >= 10, DOCUMENTED
    assert {"--recipe", "--data", "--out-dir", "--set", "--resume"} <= DOCUMENTED[("train",)]


@pytest.mark.parametrize("path", [(), *COMMANDS], ids=lambda path: " ".join(path) or "kiln")
def test_every_verb_explains_its_documented_flags(path):
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and len(result.output.splitlines()) > 5
    if not path:
        return
    offered = {name for param in COMMANDS[path].params for name in (*param.opts, *param.secondary_opts)}
    wanted = DOCUMENTED[path] | REQUIRED_FLAGS.get(path, set())
    assert wanted <= offered, f"kiln {' '.join(path)} lacks {sorted(wanted - offered)}"
    missing = [flag for flag in sorted(wanted) if flag not in result.output]
    assert not missing, f"kiln {' '.join(path)} --help does not show {missing}"


def test_generate_greedy_matches_the_library(model_dir):
    prompt = "def main():\n"
    result = runner.invoke(
        app, ["generate", "--model", str(model_dir), "--prompt", prompt, "--max-new-tokens", "16"]
    )
    assert result.exit_code == 0, result.output
    tokenizer = Tokenizer.from_dir(model_dir)
    ids = generate(
        kiln.load_model(model_dir),
        [tokenizer.encode(prompt)],
        GenerationConfig(max_new_tokens=16, stop_token_ids=tuple(tokenizer.eos_token_ids)),
    )[0]
    # stdout only: the engine's start-up summary (model size, KV capacity) goes to stderr.
    assert result.stdout == prompt + tokenizer.decode(ids) + "\n"


def test_generate_batch_and_sampling_and_chat(model_dir):
    args = ["generate", "-m", str(model_dir), "-p", "import os", "-p", "x = 1", "--max-new-tokens", "8"]
    result = runner.invoke(
        app, [*args, "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "import os" in result.output and "x = 1" in result.output
    again = runner.invoke(
        app, [*args, "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "1"]
    )
    assert again.output == result.output
    chat = runner.invoke(
        app, ["generate", "-m", str(model_dir), "-p", "hello", "--chat", "--max-new-tokens", "4"]
    )
    assert chat.exit_code == 0, chat.output


def test_generate_refuses_a_tokenizer_larger_than_the_model(model_dir, tmp_path):
    model = kiln.load_model(model_dir)
    small = kiln.Transformer(model.config.replace(vocab_size=300))
    kiln.save_model(small, tmp_path, tokenizer=Tokenizer.from_dir(model_dir))
    result = runner.invoke(app, ["generate", "-m", str(tmp_path), "-p", "hi"])
    assert result.exit_code != 0
    assert "tokenizer has 400 tokens but the model only 300" in str(result.exception)


def test_convert_to_bf16_and_sharded(model_dir, tmp_path):
    result = runner.invoke(
        app,
        ["convert", str(model_dir), str(tmp_path / "out"), "--dtype", "bf16", "--max-shard-size", "100KB"],
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    converted = kiln.load_model(out)
    assert converted.embed_tokens.weight.dtype == torch.bfloat16
    original = kiln.load_model(model_dir)
    assert torch.equal(converted.embed_tokens.weight, original.embed_tokens.weight.bfloat16())


def test_info_shows_parameters(model_dir):
    result = runner.invoke(app, ["info", str(model_dir)])
    assert result.exit_code == 0, result.output
    assert f"{kiln.load_model(model_dir).num_parameters():,}" in result.output


def test_tokenizer_train(tmp_path):
    result = runner.invoke(
        app, ["tokenizer", "train", *map(str, CORPUS), "-o", str(tmp_path), "--vocab-size", "300"]
    )
    assert result.exit_code == 0, result.output
    assert Tokenizer.from_dir(tmp_path).vocab_size == 300
    missing = runner.invoke(app, ["tokenizer", "train", str(tmp_path / "nothing"), "-o", str(tmp_path)])
    assert "no such file or directory" in str(missing.exception)


@pytest.mark.slow
def test_demo_trains_once_and_completes(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    args = ["demo", "--recipe", "tiny", "--max-new-tokens", "8", "--no-serve"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "training the demo model" in result.output and "def fibonacci(n):" in result.output
    assert kiln.read_config(tmp_path / "models" / "tiny")[0].family == "llama"
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and "training" not in second.output and "tokens/s" in second.output


def test_demo_ends_by_serving_the_model(model_dir, tmp_path, monkeypatch):
    """`make demo` = `kiln demo`, which serves by default: the call into the server must take the demo's
    arguments (a stand-in with the real serve's signature records them instead of listening)."""
    import inspect
    import shutil

    import kiln.server.app

    shutil.copytree(model_dir, tmp_path / "demo")
    calls = []
    signature = inspect.signature(kiln.server.app.serve)
    monkeypatch.setattr(kiln.server.app, "serve", lambda *a, **k: calls.append(signature.bind(*a, **k)) or 0)
    result = runner.invoke(
        app, ["demo", "--cache-dir", str(tmp_path), "--max-new-tokens", "4", "--port", "8123"]
    )
    assert result.exit_code == 0, result.output
    (bound,) = calls
    assert bound.arguments["config"].port == 8123 and bound.arguments["engine_config"].dtype == "float32"
    assert "serving" in result.output


def test_demo_uses_a_cached_model(model_dir, tmp_path):
    import shutil

    shutil.copytree(model_dir, tmp_path / "demo")
    result = runner.invoke(app, ["demo", "--cache-dir", str(tmp_path), "--max-new-tokens", "8", "--no-serve"])
    assert result.exit_code == 0, result.output
    assert (
        "def fibonacci(n):" in result.output
        and "tokens/s" in result.output
        and "training" not in result.output
    )
