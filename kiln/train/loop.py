"""TrainingLoop: one `Trainer.train()` call: steps to max_steps (or max_minutes), logging, evaluation and
checkpoints on schedule, the final checkpoint and export, and the run's summary."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kiln.errors import KilnError
from kiln.train import checkpoint as ckpt
from kiln.train import faults
from kiln.train.flops import peak_flops, training_flops_per_token
from kiln.train.metrics import MetricsLog

if TYPE_CHECKING:
    from kiln.train.trainer import StepResult, Trainer


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
    """Drives a Trainer; under torchrun every rank runs it, and only rank 0's metrics are written."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        config = trainer.config
        self.metrics = MetricsLog(trainer.out_dir, config.tensorboard, enabled=trainer.distributed.is_main)
        self.flops_per_token = training_flops_per_token(config.model, config.seq_len)
        peak, self.peak_source = peak_flops(trainer.device, trainer.compute_dtype or torch.float32)
        self.peak = peak * trainer.distributed.world_size  # MFU of the whole job: over all its devices
        self.window_start = time.perf_counter()
        self.window_step = trainer.step

    def run(self) -> TrainSummary:
        trainer, config = self.trainer, self.trainer.config
        self._announce()
        losses: list[float] = []
        val_loss, last_checkpoint = None, None
        start = time.perf_counter()
        start_step = trainer.step
        with self._progress() as progress:
            task = progress.add_task("train", total=config.max_steps, completed=trainer.step, info="")
            while trainer.step < config.max_steps:
                if self._out_of_time(start):
                    progress.console.print(
                        f"[yellow]stopping at step {trainer.step}: "
                        f"the {config.max_minutes}-minute limit is reached[/]"
                    )
                    break
                result = trainer.train_step()
                faults.inject(faults.CRASH_AFTER_STEP, trainer.step, trainer.distributed.rank)
                faults.inject(faults.HANG_AFTER_STEP, trainer.step, trainer.distributed.rank)
                losses.append(result.loss)
                if result.skipped:
                    self._handle_bad_step(result)
                if trainer.step % config.log_every == 0 or trainer.step == config.max_steps:
                    progress.update(task, info=self._log_step(result))
                progress.update(task, completed=trainer.step)
                if (
                    config.eval_every
                    and trainer.step % config.eval_every == 0
                    and trainer.step < config.max_steps
                ):
                    val_loss = self._evaluate_and_log(progress)
                checkpoint_due = config.checkpoint_every and trainer.step % config.checkpoint_every == 0
                if checkpoint_due and trainer.bad_steps == 0:  # never checkpoint inside a non-finite streak
                    last_checkpoint = trainer.save_checkpoint()
        val_loss = self._evaluate_and_log(None)
        if last_checkpoint is None or last_checkpoint.name != ckpt.checkpoint_name(trainer.step):
            last_checkpoint = trainer.save_checkpoint()
        return self._finish(start, start_step, losses, val_loss, last_checkpoint)

    def _finish(
        self, start: float, start_step: int, losses: list[float], val_loss: float | None, checkpoint: Path
    ) -> TrainSummary:
        trainer = self.trainer
        wall = time.perf_counter() - start
        tokens_per_second = (trainer.step - start_step) * trainer.global_tokens_per_step / max(wall, 1e-9)
        export_dir = trainer.export() if trainer.config.export else None
        summary = TrainSummary(
            steps=trainer.step,
            tokens=trainer.tokens_seen,
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
        self.metrics.write("summary", trainer.step, **values)
        self.metrics.close()
        return summary

    def _log_step(self, result: StepResult) -> str:
        """Write the train metrics of this log step; returns the progress line."""
        trainer = self.trainer
        elapsed = time.perf_counter() - self.window_start
        tokens_per_second = (
            (trainer.step - self.window_step) * trainer.global_tokens_per_step / max(elapsed, 1e-9)
        )
        mfu = tokens_per_second * self.flops_per_token / self.peak
        self.metrics.write(
            "train",
            trainer.step,
            loss=result.loss,
            lr=result.lr,
            grad_norm=result.grad_norm,
            tokens_per_second=tokens_per_second,
            mfu=mfu,
            tokens=trainer.tokens_seen,
        )
        info = f"loss {result.loss:.3f}  {tokens_per_second:,.0f} tok/s  MFU {mfu:.1%}"
        if not trainer.console.is_terminal:  # logs and pipes get one plain line per log step
            trainer.console.print(f"step {trainer.step}/{trainer.config.max_steps}  {info}", highlight=False)
        self.window_start, self.window_step = time.perf_counter(), trainer.step
        return info

    def _out_of_time(self, start: float) -> bool:
        """Past max_minutes? Rank 0's clock decides for all, so every rank stops at the same step."""
        max_minutes, distributed = self.trainer.config.max_minutes, self.trainer.distributed
        if not max_minutes:
            return False
        over = time.perf_counter() - start > 60 * max_minutes
        return bool(distributed.broadcast(over)) if distributed.enabled else over

    def _evaluate_and_log(self, progress: Progress | None) -> float | None:
        trainer = self.trainer
        val_loss = trainer.evaluate()
        if val_loss is not None:
            perplexity = math.exp(min(val_loss, 50))
            self.metrics.write("eval", trainer.step, val_loss=val_loss, val_perplexity=perplexity)
            line = f"step {trainer.step}: val loss {val_loss:.4f}, perplexity {perplexity:.2f}"
            (progress.console if progress else trainer.console).print(line)
        return val_loss

    def _handle_bad_step(self, result: StepResult) -> None:
        trainer = self.trainer
        self.metrics.write("skipped", trainer.step, loss=result.loss, grad_norm=result.grad_norm)
        trainer.console.print(
            f"[yellow]step {trainer.step}: non-finite loss/gradient ({result.loss}, {result.grad_norm}); "
            "update skipped[/]"
        )
        if trainer.bad_steps >= trainer.config.max_bad_steps:
            latest = ckpt.latest_checkpoint(trainer.checkpoint_dir)
            raise KilnError(
                f"stopped after {trainer.bad_steps} non-finite steps in a row (at step {trainer.step}); "
                f"the last good checkpoint is {latest or 'none (none was saved yet)'}. "
                "Lower the learning rate, raise warmup, or use bf16 instead of fp16, then --resume."
            )

    def _announce(self) -> None:
        trainer = self.trainer
        distributed = trainer.distributed
        where = f"{distributed.layout.describe()} on {trainer.device.type}" if distributed.enabled else None
        self.trainer.console.print(
            f"model {trainer.config.model.num_parameters() / 1e6:.2f}M parameters on "
            f"{where or trainer.device} ({trainer.precision}); "
            f"{trainer.global_tokens_per_step:,} tokens/step; "
            f"MFU against {self.peak / 1e12:.2f} TFLOP/s ({self.peak_source})"
        )

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=self.trainer.console,
            transient=False,
            disable=not self.trainer.console.is_terminal,
        )
