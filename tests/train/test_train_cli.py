"""`kiln train` end to end in real processes: prepare, train, export, crash mid-checkpoint, resume."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kiln
from kiln.data.prepare import PrepareConfig, prepare
from kiln.train import checkpoint
from kiln.train.metrics import read_metrics

CORPUS = [str(Path(json.__file__).parent / "*.py"), str(Path(os.__file__))]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    prepare(
        PrepareConfig(
            inputs=CORPUS, output_dir=str(directory), vocab_size=512, val_fraction=0.2, show_progress=False
        )
    )
    return directory


def run_train(data_dir, out_dir, *extra, env=None):
    command = [
        sys.executable,
        "-m",
        "kiln.cli",
        "train",
        "--recipe",
        "tiny",
        "--data",
        str(data_dir),
        "--out-dir",
        str(out_dir),
        "--precision",
        "fp32",
        "--max-steps",
        "20",
        "--set",
        "checkpoint_every=10",
        "--set",
        "eval_every=10",
        "--set",
        "model.vocab_size=512",
        *extra,
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )


def losses(out_dir):
    return [r["loss"] for r in read_metrics(out_dir) if r["kind"] == "train"]


def test_train_exports_a_model_transformers_and_kiln_load(data_dir, tmp_path):
    import transformers as T

    result = run_train(data_dir, tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert "validation loss" in result.stdout and "tokens/s" in result.stdout
    model_dir = tmp_path / "run" / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in model_dir.iterdir()
    }
    ours = kiln.load_model(model_dir)
    theirs = T.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() <= 1e-4
    records = read_metrics(tmp_path / "run")
    assert {"train", "eval", "summary"} <= {r["kind"] for r in records}
    assert all({"tokens_per_second", "mfu", "lr"} <= r.keys() for r in records if r["kind"] == "train")
    plot = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "plot", str(tmp_path / "run")], capture_output=True
    )
    assert plot.returncode == 0 and (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_sigkill_during_checkpoint_keeps_the_previous_one_and_resume_is_exact(data_dir, tmp_path):
    straight = run_train(data_dir, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr

    crashed = run_train(data_dir, tmp_path / "crash", env={checkpoint.CRASH_ENV: "20"})
    assert crashed.returncode == -signal.SIGKILL
    ckpt_dir = tmp_path / "crash" / "checkpoints"
    assert [p.name for p in checkpoint.list_checkpoints(ckpt_dir)] == ["step-00000010"]
    assert (ckpt_dir / ".tmp-step-00000020").is_dir()  # the half-written one, never marked complete
    assert checkpoint.read_trainer_state(ckpt_dir / "step-00000010")["step"] == 10

    refused = run_train(data_dir, tmp_path / "crash")
    assert refused.returncode == 1 and "pass --resume" in refused.stderr

    resumed = run_train(data_dir, tmp_path / "crash", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    # The resumed run logs steps 11..20; they equal the uninterrupted run's bit for bit.
    straight_losses, crash_losses = losses(tmp_path / "straight"), losses(tmp_path / "crash")
    assert crash_losses[-len(straight_losses) // 2 :] == straight_losses[len(straight_losses) // 2 :]
    a = kiln.load_model(tmp_path / "straight" / "model")
    b = kiln.load_model(tmp_path / "crash" / "model")
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_data_prepare_cli_prints_a_summary(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kiln.cli",
            "data",
            "prepare",
            *CORPUS,
            "-o",
            str(tmp_path),
            "--vocab-size",
            "400",
            "--min-words",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "dropped" in result.stdout.lower() and (tmp_path / "manifest.json").is_file()
