"""Run metrics: one JSON object per line in out_dir/metrics.jsonl, optionally mirrored to TensorBoard."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from kiln.errors import KilnError

METRICS_NAME = "metrics.jsonl"


class MetricsLog:
    """`enabled=False` (ranks other than 0 under torchrun) makes every call a no-op."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = False, enabled: bool = True) -> None:
        self.path = Path(out_dir) / METRICS_NAME
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise KilnError(
                    "tensorboard=True needs the tensorboard package: pip install tensorboard"
                ) from None
            self._writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def write(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, int | float):
                    self._writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        raise KilnError(f"{run_dir} has no {METRICS_NAME}; pass the out_dir of a kiln train run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the run's training and validation loss curves to a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise KilnError("kiln plot needs matplotlib: pip install matplotlib") from None
    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r["kind"] == "eval"]
    if not train:
        raise KilnError(f"{run_dir}: no training steps logged yet")
    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    axis.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if val:
        axis.plot(*zip(*val, strict=True), "o-", label="validation loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss (nats/token)")
    axis.set_title(Path(run_dir).name)
    axis.grid(alpha=0.3)
    axis.legend()
    target = Path(output) if output else Path(run_dir) / "loss.png"
    figure.tight_layout()
    figure.savefig(target)
    plt.close(figure)
    return target
