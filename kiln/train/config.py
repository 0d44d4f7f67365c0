"""TrainConfig: everything one `kiln train` run needs. Recipes (kiln/recipes/) are functions returning one."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from kiln.config import ModelConfig
from kiln.errors import KilnError
from kiln.kernels.runtime import check_kernels

Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """A training run. Steps count optimizer updates; each consumes
    batch_size * grad_accum_steps sequences of seq_len tokens."""

    model: ModelConfig
    data_dir: str  # prepared token shards (`kiln data prepare` output, with manifest.json)
    out_dir: str = "runs/default"  # checkpoints/, metrics.jsonl, model/ (the exported HF model)
    prepare: Any = None  # a kiln.data.prepare.PrepareConfig run first when data_dir has no manifest

    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch
    grad_accum_steps: int = 1
    seed: int = 0

    max_steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping

    # bf16/fp16 autocast over fp32 master weights (fp16 adds loss scaling); auto = bf16 on GPUs that have
    # it and on CPUs where a bf16 matmul measures >= 1.5x faster than fp32, else fp32.
    precision: Precision = "fp32"
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    compile: bool = False  # torch.compile the model
    device: str = "auto"
    # The fused Triton kernels (norms, RoPE, flash attention, SwiGLU, the LM-head loss) or torch: "torch",
    # "triton", or "auto" = Triton on CUDA, torch elsewhere (see kiln.kernels.runtime).
    kernels: str = "auto"

    # Parallel layout under torchrun: pp x dp_replicate x dp_shard x tp must equal the number of processes.
    dp_shard: int = -1  # FSDP2 shard degree; -1 = the processes dp_replicate and tp leave (1 when alone)
    dp_replicate: int = 1  # full replicas: plain DDP when dp_shard is 1, HSDP when it is > 1
    tp: int = 1  # tensor (+ sequence) parallel degree
    ep: int = 1  # expert parallel degree (MoE models): divides dp_shard and num_experts
    pp: int = 1  # pipeline parallel degree: the layers split into pp x pp_virtual_stages stages
    pp_schedule: str = "1f1b"  # 1f1b, interleaved-1f1b or gpipe
    pp_microbatches: int = 0  # micro-batches each batch is split into for the pipeline; 0 = pp
    pp_virtual_stages: int = 1  # stages per pipeline rank (interleaved-1f1b: > 1)
    # Layers per stage, comma-separated ("3,5" for 8 layers on 2 stages); empty = balanced by parameters.
    pp_stage_layers: str = ""
    collective_timeout_s: float = 600.0  # a collective waiting longer (a hung or dead rank) fails the job

    goldfish_k: int = 0  # >= 2 enables Goldfish loss: drop ~1/k of targets by a hash of...
    goldfish_h: int = 13  # ...the h tokens before each target

    eval_every: int = 100  # steps between validation passes (0 = only at the end)
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 200  # 0 = only the final checkpoint
    keep_checkpoints: int = 2
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    tensorboard: bool = False
    export: bool = True  # write the final model as an HF directory to out_dir/model
    max_minutes: float | None = None  # stop early (checkpoint + export) once training has run this long

    def __post_init__(self) -> None:
        positive = ("seq_len", "batch_size", "grad_accum_steps", "max_steps", "eval_batches", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise KilnError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "seed"):
            if getattr(self, name) < 0:
                raise KilnError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints < 1 or self.max_bad_steps < 1:
            raise KilnError("keep_checkpoints and max_bad_steps must be >= 1")
        if not 0 < self.lr or not 0 <= self.min_lr <= self.lr:
            raise KilnError(f"need 0 < lr and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        check_kernels(self.kernels)
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise KilnError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.dp_replicate < 1 or self.tp < 1 or (self.dp_shard < 1 and self.dp_shard != -1):
            raise KilnError(
                "dp_replicate and tp must be >= 1 and dp_shard >= 1 or -1 (the rest); got "
                f"dp_replicate={self.dp_replicate}, dp_shard={self.dp_shard}, tp={self.tp}"
            )
        if self.pp > 1 or self.pp_virtual_stages != 1 or self.pp_stage_layers:
            from kiln.train.pipeline import check_pipeline_config

            check_pipeline_config(self)
        if self.collective_timeout_s <= 0:
            raise KilnError(f"collective_timeout_s must be > 0, got {self.collective_timeout_s}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise KilnError(f"max_minutes must be > 0 or None, got {self.max_minutes}")
        if self.goldfish_k == 1 or self.goldfish_k < 0 or self.goldfish_h < 1:
            raise KilnError("goldfish_k must be 0 (off) or >= 2, and goldfish_h >= 1")
        if self.seq_len > self.model.max_position_embeddings:
            raise KilnError(
                f"seq_len {self.seq_len} exceeds the model's max_position_embeddings "
                f"{self.model.max_position_embeddings}"
            )

    @property
    def tokens_per_step(self) -> int:
        """Tokens one data-parallel rank consumes per optimizer step (the whole step in one process)."""
        return self.seq_len * self.batch_size * self.grad_accum_steps

    @property
    def layout_args(self) -> dict[str, int]:
        return {
            "dp_replicate": self.dp_replicate,
            "dp_shard": self.dp_shard,
            "tp": self.tp,
            "ep": self.ep,
            "pp": self.pp,
        }

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "prepare"}
        values["model"] = self.model.to_dict()
        return values

    def override(self, assignments: list[str]) -> TrainConfig:
        """Apply `field=value` (or `model.field=value`) strings, parsing values as the field's type."""
        changes: dict[str, Any] = {}
        model_changes: dict[str, Any] = {}
        for assignment in assignments:
            key, sep, text = assignment.partition("=")
            if not sep:
                raise KilnError(f"override {assignment!r} must look like field=value")
            target, name = (self.model, key[6:]) if key.startswith("model.") else (self, key)
            fields = {f.name: f for f in dataclasses.fields(target)}
            if name not in fields or name in ("model", "prepare", "extra_hf_config"):
                raise KilnError(f"unknown setting {key!r}; see `kiln train --help` for the fields")
            value = _parse(text, getattr(target, name), key)
            (model_changes if target is self.model else changes)[name] = value
        model = self.model.replace(**_rederived(self.model, model_changes)) if model_changes else self.model
        return dataclasses.replace(self, model=model, **changes)


def _rederived(model: ModelConfig, changes: dict[str, Any]) -> dict[str, Any]:
    """`changes`, plus head_dim/intermediate_size reset to None (recomputed) where the model's value
    follows ModelConfig's default rule, so `model.hidden_size=1024` also resizes heads and MLP."""
    try:
        defaults = model.replace(head_dim=None, intermediate_size=None)
    except KilnError:  # sizes that only an explicit head_dim makes valid: nothing follows the rule
        return changes
    changes = dict(changes)
    for name in ("head_dim", "intermediate_size"):
        if name not in changes and getattr(model, name) == getattr(defaults, name):
            changes[name] = None
    return changes


def _parse(text: str, current: Any, key: str) -> Any:
    if text.lower() in ("none", "null"):
        return None
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if isinstance(current, int):
            return int(float(text)) if "e" in text.lower() else int(text)
        if isinstance(current, float):
            return float(text)
    except ValueError:
        raise KilnError(f"{key}={text!r}: expected a {type(current).__name__}") from None
    return text
