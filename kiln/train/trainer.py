"""The training loop: deterministic data, AdamW with warmup + cosine, accumulation, clipping, mixed
precision, evaluation, checkpoints that resume exactly, and an HF export at the end."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from pathlib import Path

import torch
from rich.console import Console
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from kiln.errors import KilnError
from kiln.models.transformer import Transformer
from kiln.parsing import resolve_device
from kiln.train import checkpoint as ckpt
from kiln.train import distributed as dist
from kiln.train.config import TrainConfig
from kiln.train.export import save_with_tokenizer
from kiln.train.flops import choose_precision
from kiln.train.loop import RunInfo, StepResult, TrainingLoop, TrainSummary
from kiln.train.losses import IGNORE_INDEX, goldfish_mask
from kiln.train.objective import LanguageModelObjective
from kiln.train.optim import build_optimizer, learning_rate, set_learning_rate
from kiln.train.parallel import apply_activation_checkpointing, clip_grad_norm, parallelize
from kiln.train.token_data import open_token_data

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _local(value: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor's value as a plain tensor (tensor parallelism's loss is one)."""
    return value.to_local() if isinstance(value, DTensor) else value


def _first_line(error: BaseException) -> str:
    """The gist of a backend error: its first sentence, without gloo's source-file prefix."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip())
    text = text.splitlines()[0] if text else type(error).__name__
    return text.split(". ")[0][:160]


class Trainer:
    """Runs one TrainConfig. `train_data`/`val_data` default to TokenLoaders over config.data_dir; any
    object with `batch(step) -> (inputs, targets)`, `state_dict()` and `load_state_dict()` will do.

    Under torchrun, every process builds a Trainer: it joins the process group, applies the configured
    layout (FSDP2 / HSDP / DDP / tensor parallel, see kiln.train.parallel) and takes its data-parallel
    slice of each global batch; rank 0 alone logs and writes metrics. A `train_data` passed in must
    then return this rank's rows (as TokenLoader does with rank=dp_rank, world_size=dp_size).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        train_data=None,
        val_data=None,
        console: Console | None = None,
        model: torch.nn.Module | None = None,
    ):
        """`model` (default: a fresh Transformer of config.model) is trained as given: a loaded base with
        adapters (kiln.finetune) puts only its trainable parameters in the optimizer."""
        self.config = config
        self.distributed = dist.setup(
            config.layout_args, resolve_device(config.device), config.collective_timeout_s
        )
        self.distributed.layout.check_model(config.model, config.seq_len)
        self.device = self.distributed.device
        self.console = console or Console(stderr=True)
        if not self.distributed.is_main:
            self.console = Console(stderr=True, quiet=True)
        self.out_dir = Path(config.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        if train_data is None:
            train_data, val_data = open_token_data(config, self.distributed, self.console)
        self.train_data, self.val_data = train_data, val_data
        torch.manual_seed(config.seed)
        self.kernels = self._kernel_choice()
        if model is None:
            model = Transformer(config.model, kernels=self.kernels)
        self.model = model.to(self.device)
        precision = choose_precision(self.device) if config.precision == "auto" else config.precision
        self.precision = self.distributed.broadcast(precision)  # ranks could measure differently
        self.compute_dtype = AUTOCAST_DTYPES.get(self.precision)
        self.objective, self.loss_module = self._parallelize()
        self.optimizer = build_optimizer(
            self.model, config.lr, config.weight_decay, (config.beta1, config.beta2)
        )
        # Autocast everywhere (the fused loss kernel relies on it for its matmuls); FSDP also all-gathers
        # bf16 copies of the weights (its mixed-precision policy), halving that traffic.
        self.autocast_dtype = self.compute_dtype
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.parameters = list(self.model.parameters())
        self.step = 0
        self.tokens_seen = 0
        self.bad_steps = 0

    def _parallelize(self) -> tuple[LanguageModelObjective, torch.nn.Module]:
        """(the objective, the module to call for the loss: the objective or its DDP wrapper)."""
        config, layout = self.config, self.distributed.layout
        if not self.distributed.enabled:
            if config.activation_checkpointing:
                apply_activation_checkpointing(self.model)
            # The loss takes final hidden states: the fused LM head + cross-entropy never builds logits.
            hidden_states = self.hidden_states_function()
            compiled = torch.compile(hidden_states) if config.compile else hidden_states
            objective = LanguageModelObjective(self.model, compiled, kernels=self.kernels)
            return objective, objective
        if self.precision == "fp16" and (layout.uses_fsdp or layout.tp > 1):
            raise KilnError("fp16 loss scaling is not supported with FSDP or TP; use --precision bf16")
        if config.compile and layout.tp > 1:  # DTensor's redistribute backward fails under torch.compile
            raise KilnError("compile=true does not work with --tp > 1 yet; turn compile off for TP runs")
        objective = LanguageModelObjective(self.model, self.hidden_states_function(), kernels=self.kernels)
        module = parallelize(
            objective,
            self.distributed,
            activation_checkpointing=config.activation_checkpointing,
            compile_blocks=config.compile,
            fsdp_param_dtype=self.compute_dtype,
        )
        return objective, module

    def hidden_states_function(self):
        """input_ids (B, T) -> final hidden states, what the loss is computed on (a subclass may run the
        model differently, e.g. over packed documents)."""
        return self.model.hidden_states

    def _kernel_choice(self) -> str:
        """config.kernels for the model and the fused loss. Tensor-parallel runs use torch: their
        sequence-parallel norms see DTensors, which the Triton kernels are not written (or tested) for."""
        if self.distributed.layout.tp == 1:
            return self.config.kernels
        if self.config.kernels == "triton":
            raise KilnError("kernels=triton does not work with --tp > 1 yet; use --kernels auto or torch")
        return "torch"

    @property
    def global_tokens_per_step(self) -> int:
        return self.config.tokens_per_step * self.distributed.dp_size

    # ------------------------------------------------------------------------------------------ data

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
            with self._gradient_sync(micro == config.grad_accum_steps - 1):
                total_loss += self._forward_backward(inputs, targets) / config.grad_accum_steps
        total_loss = self._global_mean(total_loss)
        tokens = self.global_tokens_per_step
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = float(clip_grad_norm(self.parameters, config.grad_clip))
        # Loss and norm are global, so every rank takes the same decision.
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
        return StepResult(
            total_loss, grad_norm, lr, tokens, skipped=not finite, expert_load=self._expert_load()
        )

    def _expert_load(self) -> float | None:
        """MoE routing balance of the last micro-batch on this rank: max / mean tokens per expert,
        averaged over MoE layers (1.0 = perfectly balanced); None for a dense model."""
        counts = [layer.last_expert_counts for layer in self.model.moe_layers()]
        counts = [c.float() for c in counts if c is not None]
        if not counts:
            return None
        return float(torch.stack([c.max() / c.mean() for c in counts]).mean())

    def _forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Loss and gradients of one micro-batch; returns this rank's loss (its share of the global mean
        under data parallelism)."""
        config = self.config
        if config.goldfish_k:
            dropped = goldfish_mask(inputs, config.goldfish_k, config.goldfish_h)
            targets = targets.masked_fill(dropped, IGNORE_INDEX)
        share = self._target_share(targets)
        with self.objective.loss_context():  # vocab-parallel cross-entropy needs it around backward too
            with self._autocast():
                loss = self.loss_module(inputs, targets)
            if share is not None:
                loss = loss * share
            scaled = loss / config.grad_accum_steps
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return _local(loss).item()

    def _target_share(self, targets: torch.Tensor) -> float | None:
        """dp_size * this rank's kept targets / the global micro-batch's kept targets, or None alone.

        Each rank's loss is a mean over its own kept targets and data parallelism averages gradients
        over ranks; weighting by this share makes that average the global batch's mean, as one process
        computes it, even when Goldfish drops different numbers of targets on different ranks. Without
        dropped targets the share is exactly 1.
        """
        if self.distributed.dp_size == 1:
            return None
        kept = (targets != IGNORE_INDEX).sum().double()
        total = self.distributed.sum(kept.clone()).item() / self.distributed.layout.tp  # tp ranks repeat
        return kept.item() * self.distributed.dp_size / max(total, 1.0)

    def _global_mean(self, value: float) -> float:
        """The mean over data-parallel ranks of a per-rank value (tensor-parallel ranks hold equal ones)."""
        if not self.distributed.enabled:
            return value
        total = self.distributed.sum(torch.tensor(value, dtype=torch.float64))
        return total.item() / self.distributed.world_size

    def _gradient_sync(self, last_micro_batch: bool):
        """DDP all-reduces gradients only after the last micro-batch of a step (FSDP reduce-scatters
        each one, which keeps only sharded gradients alive between micro-batches)."""
        if last_micro_batch or not isinstance(self.loss_module, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.loss_module.no_sync()

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation loss over the first eval_batches batches of the val split (the same every time)."""
        if self.val_data is None:
            return None
        self.model.eval()
        losses = []
        for index in range(self.config.eval_batches):
            inputs, targets = self._batch(self.val_data, index)
            with self.objective.loss_context(), self._autocast():
                losses.append(_local(self.loss_module(inputs, targets)).item())
        return self._global_mean(sum(losses) / len(losses))

    # ------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of the current step (under torchrun, every rank must call this)."""
        config, distributed = self.config, self.distributed
        position = self.step * config.grad_accum_steps  # the loader's next micro-batch index
        rows = [distributed.dp_rank * config.batch_size, (distributed.dp_rank + 1) * config.batch_size]
        ranks = distributed.gather(
            {"rank": distributed.rank, "dp_rank": distributed.dp_rank, "next_batch": position, "rows": rows}
        )
        state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "loader": self.train_data.state_dict()
            | {"step": position, "global_batch_size": config.batch_size * distributed.dp_size},
            "layout": dataclasses.asdict(distributed.layout),
            "ranks": ranks,  # which rows of every global batch each rank drew, from which batch on
            "config": config.to_dict(),
        }
        return ckpt.save_checkpoint(
            self.checkpoint_dir,
            self.step,
            self.model,
            self.optimizer,
            state,
            config.keep_checkpoints,
            distributed,
        )

    def resume(self, path: str | Path | None = None) -> Path | None:
        """Continue from checkpoint `path` (default: the newest complete one in out_dir/checkpoints),
        whatever parallel layout saved it."""
        path = Path(path) if path else ckpt.latest_checkpoint(self.checkpoint_dir)
        path = self.distributed.broadcast(path)  # one choice, even if ranks see a shared disk differently
        if path is None:
            return None
        self._adopt_global_batch(ckpt.read_trainer_state(path))
        state = ckpt.load_checkpoint(path, self.model, self.optimizer, self.distributed)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.train_data.load_state_dict(state["loader"])
        return path

    def _adopt_global_batch(self, state: dict) -> None:
        """Keep the checkpoint's global batch under this run's layout, so no sample is skipped or repeated.

        A step's samples depend only on the global batch (batch_size x data-parallel ranks, see
        TokenLoader), so the loader's position (its next batch index) carries over unchanged; only the
        rows each rank takes of every global batch change: with 2 ranks of 4 rows saved, one process
        takes all 8 rows, and 4 ranks take 2 each.
        """
        saved_config = state["config"]
        if saved_config["grad_accum_steps"] != self.config.grad_accum_steps:
            raise KilnError(
                f"the checkpoint was trained with grad_accum_steps={saved_config['grad_accum_steps']}; "
                "resume with the same value (set batch_size/layout freely)"
            )
        saved_global = state["loader"].get("global_batch_size", saved_config["batch_size"])
        dp_size = self.distributed.dp_size
        if saved_global == self.config.batch_size * dp_size:
            return
        if saved_global % dp_size:
            raise KilnError(
                f"the checkpoint's global batch of {saved_global} sequences cannot be split evenly over "
                f"{dp_size} data-parallel ranks; choose a layout whose dp_replicate x dp_shard divides it"
            )
        batch_size = saved_global // dp_size
        takes = f"each of the {dp_size} data-parallel ranks takes {batch_size}"
        if dp_size == 1:
            takes = f"one data-parallel rank takes all {batch_size}"
        self.console.print(
            f"the checkpoint's global batch is {saved_global} sequences: {takes} "
            f"(batch_size {self.config.batch_size} -> {batch_size})"
        )
        self.config = dataclasses.replace(self.config, batch_size=batch_size)
        for source in (self.train_data, self.val_data):
            if source is not None:
                source.batch_size = batch_size  # loaders draw each batch from (seed, index, batch_size)

    def export(self, directory: str | Path | None = None) -> Path:
        """Save the model as an HF directory (Llama layout) with the data's tokenizer beside it. Under
        torchrun every rank must call this: the shards are gathered and rank 0 writes."""
        target = Path(directory) if directory else self.out_dir / "model"
        if not self.distributed.enabled:
            return save_with_tokenizer(self.model, target, self.config.data_dir)
        full = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if self.distributed.is_main:
            with torch.device("meta"):
                model = Transformer(self.config.model)
            model.load_state_dict(full, assign=True)
            save_with_tokenizer(model, target, self.config.data_dir)
        self.distributed.barrier()
        return target

    # ------------------------------------------------------------------------------------------- loop

    def _run_info(self) -> RunInfo:
        return RunInfo(
            config=self.config,
            distributed=self.distributed,
            console=self.console,
            device=self.device,
            precision=self.precision,
            compute_dtype=self.compute_dtype,
            global_tokens_per_step=self.global_tokens_per_step,
            checkpoint_dir=self.checkpoint_dir,
        )

    def train(self) -> TrainSummary:
        """Train to max_steps (or max_minutes), checkpointing and evaluating on schedule; under torchrun a
        collective that fails (a rank died) or times out (a rank hung) ends this rank with a KilnError."""
        try:
            return TrainingLoop(self, self._run_info()).run()
        except Exception as error:
            if not (self.distributed.enabled and dist.is_collective_failure(error)):
                raise
            raise KilnError(
                f"rank {self.distributed.rank}: a collective failed after step {self.step} "
                f"({_first_line(error)}); another rank died, or hung for more than "
                f"collective_timeout_s={self.config.collective_timeout_s:g}. Under torchrun "
                "--max-restarts=N the job restarts from the last complete checkpoint."
            ) from error
