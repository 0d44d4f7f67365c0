"""The training loop: deterministic data, AdamW with warmup + cosine, accumulation, clipping, mixed
precision, evaluation, checkpoints that resume exactly, and an HF export at the end."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kiln.errors import KilnError
from kiln.models.transformer import Transformer
from kiln.train import checkpoint as ckpt
from kiln.train.config import TrainConfig
from kiln.train.flops import choose_precision, peak_flops, training_flops_per_token
from kiln.train.losses import fused_language_model_loss
from kiln.train.metrics import MetricsLog
from kiln.train.optim import build_optimizer, learning_rate, set_learning_rate
from kiln.train.parallel import apply_activation_checkpointing

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    tokens: int
    skipped: bool = False


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    """Runs one TrainConfig. `train_data`/`val_data` default to TokenLoaders over config.data_dir; any
    object with `batch(step) -> (inputs, targets)`, `state_dict()` and `load_state_dict()` will do."""

    def __init__(
        self, config: TrainConfig, *, train_data=None, val_data=None, console: Console | None = None
    ):
        self.config = config
        self.console = console or Console(stderr=True)
        self.device = resolve_device(config.device)
        self.out_dir = Path(config.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        if train_data is None:
            train_data, val_data = self._open_data()
        self.train_data, self.val_data = train_data, val_data
        torch.manual_seed(config.seed)
        self.model = Transformer(config.model).to(self.device)
        if config.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        # The loss takes final hidden states: the fused LM head + cross-entropy never builds full logits.
        self.hidden_states = (
            torch.compile(self.model.hidden_states) if config.compile else self.model.hidden_states
        )
        self.optimizer = build_optimizer(
            self.model, config.lr, config.weight_decay, (config.beta1, config.beta2)
        )
        self.precision = choose_precision(self.device) if config.precision == "auto" else config.precision
        self.autocast_dtype = AUTOCAST_DTYPES.get(self.precision)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.step = 0
        self.tokens_seen = 0
        self.bad_steps = 0

    # ------------------------------------------------------------------------------------------ data

    def _open_data(self):
        from kiln.data.loader import TokenLoader
        from kiln.data.shards import MANIFEST_NAME

        config = self.config
        if not (Path(config.data_dir) / MANIFEST_NAME).is_file():
            if config.prepare is None:
                raise KilnError(
                    f"{config.data_dir} has no {MANIFEST_NAME}; run `kiln data prepare` first or pass --data"
                )
            from kiln.data.prepare import prepare

            self.console.print(f"preparing data into {config.data_dir}")
            prepare(config.prepare)
        loader_args = dict(seq_len=config.seq_len, batch_size=config.batch_size, seed=config.seed)
        train = TokenLoader(config.data_dir, "train", **loader_args)
        vocab = train.manifest["vocab_size"]
        if vocab > config.model.vocab_size:
            raise KilnError(
                f"the data's tokenizer has {vocab} tokens but the model's vocab_size is "
                f"{config.model.vocab_size}; set model.vocab_size >= {vocab}"
            )
        try:
            val = TokenLoader(config.data_dir, "val", **loader_args)
        except KilnError:
            self.console.print("[yellow]no usable validation split; evaluation is skipped[/]")
            val = None
        return train, val

    def _batch(self, source, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = source.batch(index)
        return inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------------------------------ steps

    def train_step(self) -> StepResult:
        """One optimizer update over grad_accum_steps micro-batches (data indexed by the step, so a
        resumed run sees exactly the batches an uninterrupted one would)."""
        config = self.config
        lr = learning_rate(
            self.step,
            max_lr=config.lr,
            min_lr=config.min_lr,
            warmup_steps=config.warmup_steps,
            total_steps=config.max_steps,
        )
        set_learning_rate(self.optimizer, lr)
        self.model.train()
        total_loss = 0.0
        for micro in range(config.grad_accum_steps):
            inputs, targets = self._batch(self.train_data, self.step * config.grad_accum_steps + micro)
            with self._autocast():
                hidden = self.hidden_states(inputs)
                loss = fused_language_model_loss(
                    hidden, self.model.output_weight, targets, inputs, config.goldfish_k, config.goldfish_h
                )
            scaled = loss / config.grad_accum_steps
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total_loss += loss.item() / config.grad_accum_steps
        tokens = config.tokens_per_step
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        finite = math.isfinite(total_loss) and (self.scaler is not None or math.isfinite(grad_norm))
        if finite:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)  # skips the update itself when fp16 grads overflowed
                self.scaler.update()
            else:
                self.optimizer.step()
            self.bad_steps = 0
        else:
            self.bad_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += tokens
        return StepResult(total_loss, grad_norm, lr, tokens, skipped=not finite)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation loss over the first eval_batches batches of the val split (the same every time)."""
        if self.val_data is None:
            return None
        self.model.eval()
        losses = []
        for index in range(self.config.eval_batches):
            inputs, targets = self._batch(self.val_data, index)
            with self._autocast():
                hidden = self.hidden_states(inputs)
                losses.append(fused_language_model_loss(hidden, self.model.output_weight, targets).item())
        return sum(losses) / len(losses)

    # ------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "loader": self.train_data.state_dict() | {"step": self.step * self.config.grad_accum_steps},
            "config": self.config.to_dict(),
        }
        return ckpt.save_checkpoint(
            self.checkpoint_dir, self.step, self.model, self.optimizer, state, self.config.keep_checkpoints
        )

    def resume(self, path: str | Path | None = None) -> Path | None:
        """Continue from checkpoint `path` (default: the newest complete one in out_dir/checkpoints)."""
        path = Path(path) if path else ckpt.latest_checkpoint(self.checkpoint_dir)
        if path is None:
            return None
        state = ckpt.load_checkpoint(path, self.model, self.optimizer)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.train_data.load_state_dict(state["loader"])
        return path

    def export(self, directory: str | Path | None = None) -> Path:
        """Save the model as an HF directory (Llama layout) with the data's tokenizer beside it."""
        from kiln.models.hf.io import save_model
        from kiln.tokenizer import Tokenizer

        target = Path(directory) if directory else self.out_dir / "model"
        tokenizer_dir = Path(self.config.data_dir) / "tokenizer"
        tokenizer = (
            Tokenizer.from_dir(tokenizer_dir) if (tokenizer_dir / "tokenizer.json").is_file() else None
        )
        if tokenizer is not None and self.model.config.eos_token_id is None:
            self.model.config.eos_token_id = tokenizer.eos_token_id
        return save_model(self.model, target, tokenizer=tokenizer)

    # ------------------------------------------------------------------------------------------- loop

    def train(self) -> TrainSummary:
        config = self.config
        metrics = MetricsLog(self.out_dir, config.tensorboard)
        flops_per_token = training_flops_per_token(config.model, config.seq_len)
        peak, peak_source = peak_flops(self.device, self.autocast_dtype or torch.float32)
        self._announce(peak, peak_source)
        losses: list[float] = []
        val_loss, last_checkpoint = None, None
        start = window_start = time.perf_counter()
        start_step = window_step = self.step
        with self._progress() as progress:
            task = progress.add_task("train", total=config.max_steps, completed=self.step, info="")
            while self.step < config.max_steps:
                if config.max_minutes and time.perf_counter() - start > 60 * config.max_minutes:
                    progress.console.print(
                        f"[yellow]stopping at step {self.step}: "
                        f"the {config.max_minutes}-minute limit is reached[/]"
                    )
                    break
                result = self.train_step()
                losses.append(result.loss)
                if result.skipped:
                    self._handle_bad_step(result, metrics)
                if self.step % config.log_every == 0 or self.step == config.max_steps:
                    elapsed = time.perf_counter() - window_start
                    tokens_per_second = (
                        (self.step - window_step) * config.tokens_per_step / max(elapsed, 1e-9)
                    )
                    mfu = tokens_per_second * flops_per_token / peak
                    metrics.write(
                        "train",
                        self.step,
                        loss=result.loss,
                        lr=result.lr,
                        grad_norm=result.grad_norm,
                        tokens_per_second=tokens_per_second,
                        mfu=mfu,
                        tokens=self.tokens_seen,
                    )
                    info = f"loss {result.loss:.3f}  {tokens_per_second:,.0f} tok/s  MFU {mfu:.1%}"
                    progress.update(task, info=info)
                    if not self.console.is_terminal:  # logs and pipes get one plain line per log step
                        self.console.print(f"step {self.step}/{config.max_steps}  {info}", highlight=False)
                    window_start, window_step = time.perf_counter(), self.step
                progress.update(task, completed=self.step)
                if config.eval_every and self.step % config.eval_every == 0 and self.step < config.max_steps:
                    val_loss = self._evaluate_and_log(metrics, progress)
                checkpoint_due = config.checkpoint_every and self.step % config.checkpoint_every == 0
                if checkpoint_due and self.bad_steps == 0:  # never checkpoint inside a non-finite streak
                    last_checkpoint = self.save_checkpoint()
        val_loss = self._evaluate_and_log(metrics, None)
        if last_checkpoint is None or last_checkpoint.name != ckpt.checkpoint_name(self.step):
            last_checkpoint = self.save_checkpoint()
        wall = time.perf_counter() - start
        tokens_per_second = (self.step - start_step) * config.tokens_per_step / max(wall, 1e-9)
        export_dir = self.export() if config.export else None
        summary = TrainSummary(
            steps=self.step,
            tokens=self.tokens_seen,
            wall_seconds=wall,
            tokens_per_second=tokens_per_second,
            mfu=tokens_per_second * flops_per_token / peak,
            final_loss=losses[-1] if losses else math.nan,
            val_loss=val_loss,
            losses=losses,
            checkpoint=str(last_checkpoint),
            export_dir=str(export_dir) if export_dir else None,
        )
        metrics.write("summary", self.step, **{k: v for k, v in vars(summary).items() if k != "losses"})
        metrics.close()
        return summary

    def _evaluate_and_log(self, metrics: MetricsLog, progress: Progress | None) -> float | None:
        val_loss = self.evaluate()
        if val_loss is not None:
            metrics.write("eval", self.step, val_loss=val_loss, val_perplexity=math.exp(min(val_loss, 50)))
            line = f"step {self.step}: val loss {val_loss:.4f}, perplexity {math.exp(min(val_loss, 50)):.2f}"
            (progress.console if progress else self.console).print(line)
        return val_loss

    def _handle_bad_step(self, result: StepResult, metrics: MetricsLog) -> None:
        metrics.write("skipped", self.step, loss=result.loss, grad_norm=result.grad_norm)
        self.console.print(
            f"[yellow]step {self.step}: non-finite loss/gradient ({result.loss}, {result.grad_norm}); "
            "update skipped[/]"
        )
        if self.bad_steps >= self.config.max_bad_steps:
            latest = ckpt.latest_checkpoint(self.checkpoint_dir)
            raise KilnError(
                f"stopped after {self.bad_steps} non-finite steps in a row (at step {self.step}); "
                f"the last good checkpoint is {latest or 'none (none was saved yet)'}. "
                "Lower the learning rate, raise warmup, or use bf16 instead of fp16, then --resume."
            )

    def _announce(self, peak: float, peak_source: str) -> None:
        config = self.config
        self.console.print(
            f"model {self.model.num_parameters() / 1e6:.2f}M parameters on {self.device} ({self.precision}); "
            f"{config.tokens_per_step:,} tokens/step; MFU against {peak / 1e12:.2f} TFLOP/s ({peak_source})"
        )

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            disable=not self.console.is_terminal,
        )
