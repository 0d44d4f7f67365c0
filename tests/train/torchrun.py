"""Run `kiln train` in one process or under torchrun (CPU, gloo) for the distributed tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kiln.data.prepare import PrepareConfig, prepare
from kiln.train.metrics import read_metrics

CORPUS = [str(Path(json.__file__).parent / "*.py"), str(Path(os.__file__))]


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """`result`, after asserting its command succeeded (the output's tails otherwise)."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def prepare_data(directory: Path) -> Path:
    config = PrepareConfig(
        inputs=CORPUS, output_dir=str(directory), vocab_size=512, val_fraction=0.2, show_progress=False
    )
    prepare(config)
    return directory


def launcher(nproc: int, max_restarts: int = 0) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "kiln.cli"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a private rendezvous on a free local port
        f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}",
        "-m",
        "kiln.cli",
    ]


def train(
    nproc: int,
    data_dir: Path,
    out_dir: Path,
    *extra: str,
    max_steps: int = 10,
    max_restarts: int = 0,
    env: dict[str, str] | None = None,
    timeout: float = 240,
) -> subprocess.CompletedProcess:
    """`kiln train --recipe tiny` in fp32 on the test corpus; extra flags are appended."""
    command = launcher(nproc, max_restarts) + [
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
        str(max_steps),
        "--set",
        "model.vocab_size=512",
        "--set",
        "log_every=1",
        "--set",
        "eval_every=10",
        *extra,
    ]
    # One thread per process: two processes share this machine's two cores.
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env)


def losses(out_dir: Path) -> dict[int, float]:
    """Logged train loss per step (after a restart, the repeated steps' latest values)."""
    return {r["step"]: r["loss"] for r in read_metrics(out_dir) if r["kind"] == "train"}


def val_losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(out_dir) if r["kind"] == "eval"}


def assert_close(actual: dict[int, float], expected: dict[int, float], rel: float = 1e-5) -> None:
    assert actual.keys() <= expected.keys() and actual, (actual, expected)
    worst = max(abs(actual[k] - expected[k]) / abs(expected[k]) for k in actual)
    assert worst <= rel, f"relative difference {worst:.2e} > {rel:.0e}: {actual} vs {expected}"
