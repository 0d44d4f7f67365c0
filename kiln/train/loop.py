"""TrainingLoop: one `Trainer.train()` call: steps to max_steps (or max_minutes), logging, evaluation and
checkpoints on schedule, the final checkpoint and export, and the run's summary.

The loop sees the trainer only through `Steps` (the four actions it schedules and the counters they
advance) and the fixed facts of the run in `RunInfo`; it never reaches into the trainer otherwise."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kiln.errors import KilnError
from kiln.train import checkpoint as ckpt
from kiln.train import faults
from kiln.train.config import TrainConfig
from kiln.train.distributed import Distributed
from kiln.train.flops import peak_flops, training_flops_per_token
from kiln.train.metrics import MetricsLog


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    tokens: int
    skipped: bool = False
    expert_load: float | None = None  # MoE: max / mean tokens per expert, mean over layers (1.0 = balanced)


class Steps(Protocol):
    """What the loop drives (a Trainer): the actions it schedules and the counters they advance."""

    step: int  # optimizer steps taken
    tokens_seen: int
    bad_steps: int  # consecutive non-finite steps

    def train_step(self) -> StepResult: ...

    def evaluate(self) -> float | None: ...

    def save_checkpoint(self) -> Path: ...

    def export(self) -> Path: ...


@dataclass(frozen=True, kw_only=True)
class RunInfo:
    """The facts of a run the loop schedules, logs and reports with; fixed while it runs."""

    config: TrainConfig
    distributed: Distributed
    console: Console
    device: torch.device
    precision: str
    compute_dtype: torch.dtype | None
    global_tokens_per_step: int
    checkpoint_dir: Path


@dataclass
class TrainSummary:
    steps: int
    tokens: int
    wall_seconds: float
    tokens_per_second: float
    mfu: float
    final_loss: float
    val_loss: float | None
    losses: list[float] = field(default_factory=list)
    checkpoint: str | None = None
    export_dir: str | None = None


class TrainingLoop:
    """Drives a Trainer's steps; under torchrun every rank runs it, and only rank 0's metrics are written."""

    def __init__(self, steps: Steps, info: RunInfo) -> None:
        self.steps, self.info = steps, info
        config, distributed = info.config, info.distributed
        self.metrics = MetricsLog(config.out_dir, config.tensorboard, enabled=distributed.is_main)
        self.flops_per_token = training_flops_per_token(config.model, config.seq_len)
        peak, self.peak_source = peak_flops(info.device, info.compute_dtype or torch.float32)
        self.peak = peak * distributed.world_size  # MFU of the whole job: over all its devices
        self.window_start = time.perf_counter()
        self.window_step = steps.step

    def run(self) -> TrainSummary:
        steps, config = self.steps, self.info.config
        self._announce()
        losses: list[float] = []
        val_loss, last_checkpoint = None, None
        start = time.perf_counter()
        start_step = steps.step
        with self._progress() as progress:
            task = progress.add_task("train", total=config.max_steps, completed=steps.step, info="")
            while steps.step < config.max_steps:
                if self._out_of_time(start):
                    progress.console.print(
                        f"[yellow]stopping at step {steps.step}: "
                        f"the {config.max_minutes}-minute limit is reached[/]"
                    )
                    break
                result = steps.train_step()
                faults.inject(faults.CRASH_AFTER_STEP, steps.step, self.info.distributed.rank)
                faults.inject(faults.HANG_AFTER_STEP, steps.step, self.info.distributed.rank)
                losses.append(result.loss)
                if result.skipped:
                    self._handle_bad_step(result)
                if steps.step % config.log_every == 0 or steps.step == config.max_steps:
                    progress.update(task, info=self._log_step(result))
                progress.update(task, completed=steps.step)
                if (
                    config.eval_every
                    and steps.step % config.eval_every == 0
                    and steps.step < config.max_steps
                ):
                    val_loss = self._evaluate_and_log(progress)
                checkpoint_due = config.checkpoint_every and steps.step % config.checkpoint_every == 0
                if checkpoint_due and steps.bad_steps == 0:  # never checkpoint inside a non-finite streak
                    last_checkpoint = steps.save_checkpoint()
        val_loss = self._evaluate_and_log(None)
        if last_checkpoint is None or last_checkpoint.name != ckpt.checkpoint_name(steps.step):
            last_checkpoint = steps.save_checkpoint()
        return self._finish(start, start_step, losses, val_loss, last_checkpoint)

    def _finish(
        self, start: float, start_step: int, losses: list[float], val_loss: float | None, checkpoint: Path
    ) -> TrainSummary:
        steps = self.steps
        wall = time.perf_counter() - start
        tokens_per_second = (steps.step - start_step) * self.info.global_tokens_per_step / max(wall, 1e-9)
        export_dir = steps.export() if self.info.config.export else None
        summary = TrainSummary(
            steps=steps.step,
            tokens=steps.tokens_seen,
            wall_seconds=wall,
            tokens_per_second=tokens_per_second,
            mfu=tokens_per_second * self.flops_per_token / self.peak,
            final_loss=losses[-1] if losses else math.nan,
            val_loss=val_loss,
            losses=losses,
            checkpoint=str(checkpoint),
            export_dir=str(export_dir) if export_dir else None,
        )
        values = {k: v for k, v in vars(summary).items() if k != "losses"}
        self.metrics.write("summary", steps.step, **values)
        self.metrics.close()
        return summary

    def _log_step(self, result: StepResult) -> str:
        """Write the train metrics of this log step; returns the progress line."""
        steps = self.steps
        elapsed = time.perf_counter() - self.window_start
        tokens_per_second = (
            (steps.step - self.window_step) * self.info.global_tokens_per_step / max(elapsed, 1e-9)
        )
        mfu = tokens_per_second * self.flops_per_token / self.peak
        self.metrics.write(
            "train",
            steps.step,
            loss=result.loss,
            lr=result.lr,
            grad_norm=result.grad_norm,
            tokens_per_second=tokens_per_second,
            mfu=mfu,
            tokens=steps.tokens_seen,
            **({} if result.expert_load is None else {"expert_load_max_over_mean": result.expert_load}),
        )
        line = f"loss {result.loss:.3f}  {tokens_per_second:,.0f} tok/s  MFU {mfu:.1%}"
        console = self.info.console
        if not console.is_terminal:  # logs and pipes get one plain line per log step
            console.print(f"step {steps.step}/{self.info.config.max_steps}  {line}", highlight=False)
        self.window_start, self.window_step = time.perf_counter(), steps.step
        return line

    def _out_of_time(self, start: float) -> bool:
        """Past max_minutes? Rank 0's clock decides for all, so every rank stops at the same step."""
        max_minutes, distributed = self.info.config.max_minutes, self.info.distributed
        if not max_minutes:
            return False
        over = time.perf_counter() - start > 60 * max_minutes
        return bool(distributed.broadcast(over)) if distributed.enabled else over

    def _evaluate_and_log(self, progress: Progress | None) -> float | None:
        steps = self.steps
        val_loss = steps.evaluate()
        if val_loss is not None:
            perplexity = math.exp(min(val_loss, 50))
            self.metrics.write("eval", steps.step, val_loss=val_loss, val_perplexity=perplexity)
            line = f"step {steps.step}: val loss {val_loss:.4f}, perplexity {perplexity:.2f}"
            (progress.console if progress else self.info.console).print(line)
        return val_loss

    def _handle_bad_step(self, result: StepResult) -> None:
        steps = self.steps
        self.metrics.write("skipped", steps.step, loss=result.loss, grad_norm=result.grad_norm)
        self.info.console.print(
            f"[yellow]step {steps.step}: non-finite loss/gradient ({result.loss}, {result.grad_norm}); "
            "update skipped[/]"
        )
        if steps.bad_steps >= self.info.config.max_bad_steps:
            latest = ckpt.latest_checkpoint(self.info.checkpoint_dir)
            raise KilnError(
                f"stopped after {steps.bad_steps} non-finite steps in a row (at step {steps.step}); "
                f"the last good checkpoint is {latest or 'none (none was saved yet)'}. "
                "Lower the learning rate, raise warmup, or use bf16 instead of fp16, then --resume."
            )

    def _announce(self) -> None:
        distributed = self.info.distributed
        where = f"{distributed.layout.describe()} on {self.info.device.type}" if distributed.enabled else None
        self.info.console.print(
            f"model {self.info.config.model.num_parameters() / 1e6:.2f}M parameters on "
            f"{where or self.info.device} ({self.info.precision}); "
            f"{self.info.global_tokens_per_step:,} tokens/step; "
            f"MFU against {self.peak / 1e12:.2f} TFLOP/s ({self.peak_source})"
        )

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=self.info.console,
            transient=False,
            disable=not self.info.console.is_terminal,
        )
