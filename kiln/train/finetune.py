"""`kiln finetune`: LoRA or prompt tuning of a Hugging Face base model on SFT data, run by the Trainer
(resume, checkpoints, metrics, plots), ending in a PEFT adapter directory at OUT_DIR/adapter."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from rich.console import Console
from torch import nn

from kiln.errors import KilnError
from kiln.finetune import LoraConfig, PromptTuningConfig, apply_lora, apply_prompt_tuning
from kiln.finetune.lora import merge_lora
from kiln.finetune.peft_format import adapter_state, attach_adapter, read_adapter, write_adapter
from kiln.train.config import TrainConfig
from kiln.train.trainer import Trainer

Method = Literal["lora", "prompt", "full"]  # full: every weight trains (the baseline adapters beat)
ADAPTER_DIR = "adapter"


@dataclass(kw_only=True, slots=True)
class FinetuneConfig:
    """A finetuning run: the base model, the method and its settings, and the trainer's settings (its
    `model` is the base's config, `data_dir` the SFT data)."""

    base: str
    method: Method = "lora"
    lora: LoraConfig = field(default_factory=LoraConfig)
    prompt: PromptTuningConfig = field(default_factory=PromptTuningConfig)
    train: TrainConfig
    # Pack whole examples into seq_len rows, attention masked across them (kiln.data.sft_packing), instead
    # of one right-padded example a row.
    packing: bool = False

    def __post_init__(self) -> None:
        if self.method not in ("lora", "prompt", "full"):
            raise KilnError(f"method must be lora, prompt or full, got {self.method!r}", param="method")
        if self.packing and self.method == "prompt":
            raise KilnError(
                "packing works with --method lora or full: prompt tuning's virtual tokens lead each row, "
                "not each packed example; drop --packing",
                param="packing",
            )


def finetune_train_config(base: str, data_dir: str, out_dir: str, **settings) -> TrainConfig:
    """TrainConfig defaults for adapters: the base's model config, fp32 masters, higher lr, no HF export of
    the full model (the adapter is written instead), no weight decay on the few adapter tensors."""
    from kiln.models.hf.io import read_config

    model_config, _ = read_config(base)
    values = dict(
        lr=1e-3,
        min_lr=1e-4,
        warmup_steps=10,
        weight_decay=0.0,
        max_steps=200,
        batch_size=8,
        seq_len=min(256, model_config.max_position_embeddings),
        eval_every=50,
        eval_batches=4,
        checkpoint_every=100,
        export=False,
        kernels="torch",
    )
    values.update(settings)
    return TrainConfig(model=model_config, data_dir=data_dir, out_dir=out_dir, **values)


def adapted_model(config: FinetuneConfig) -> nn.Module:
    """The base model (fp32) with a fresh, trainable adapter; only the adapter's tensors require grad."""
    from kiln.models.hf.io import load_model
    from kiln.tokenizer import Tokenizer

    model = load_model(config.base, dtype="float32")
    if config.method == "full":
        return model.requires_grad_(True)
    if config.method == "lora":
        # The adapter's initialisation depends on the run's seed alone, not on what drew random numbers
        # before (a torchrun process and a plain one must start from the same adapter).
        with torch.random.fork_rng():
            torch.manual_seed(config.train.seed)
            apply_lora(model, config.lora)
        return model
    tokenizer = None
    if config.prompt.init_text and (Path(config.base) / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_dir(config.base)
    return apply_prompt_tuning(model, config.prompt, tokenizer, seed=config.train.seed)


class FinetuneTrainer(Trainer):
    """The Trainer, with an adapter instead of a full model as its export."""

    def __init__(self, config: FinetuneConfig, console: Console | None = None) -> None:
        from kiln.data.sft import SFTLoader
        from kiln.data.sft_packing import PackedSFTLoader

        train = config.train
        Loader = PackedSFTLoader if config.packing else SFTLoader
        loader = dict(seq_len=train.seq_len, batch_size=train.batch_size, seed=train.seed)
        train_data = Loader(train.data_dir, "train", **loader)
        # Padding: no step computes padding that no example needs.
        if not config.packing and train_data.longest < train.seq_len:
            train = dataclasses.replace(train, seq_len=train_data.longest)
            config = dataclasses.replace(config, train=train)
            loader["seq_len"] = train.seq_len
            train_data = Loader(train.data_dir, "train", **loader)
        if train_data.manifest["vocab_size"] > train.model.vocab_size:
            raise KilnError("the SFT data's tokenizer is larger than the base model's vocabulary")
        val_data = Loader(train.data_dir, "val", **loader) if "val" in train_data.manifest["splits"] else None
        self.finetune = config
        super().__init__(
            train, train_data=train_data, val_data=val_data, console=console, model=adapted_model(config)
        )
        for data in (train_data, val_data):  # under torchrun, each rank takes its rows of every batch
            if data is not None:
                data.rank, data.world_size = self.distributed.dp_rank, self.distributed.dp_size

    def hidden_states_function(self):
        if not self.finetune.packing:
            return super().hidden_states_function()
        from kiln.train.document_attention import packed_hidden_states

        return packed_hidden_states(self.model, self.train_data.pad_token_id, self.kernels)

    def export(self, directory: str | Path | None = None) -> Path:
        if self.finetune.method == "full":
            from kiln.models.hf.io import copy_tokenizer_files, save_model

            target = save_model(self.model, Path(directory) if directory else self.out_dir / "model")
            copy_tokenizer_files(self.finetune.base, target)
            return target
        target = Path(directory) if directory else self.out_dir / ADAPTER_DIR
        # Every rank gathers (FSDP2 shards the adapter too); rank 0 alone writes.
        state = adapter_state(self.model, base_model=str(Path(self.finetune.base).resolve()))
        if self.distributed.is_main:
            write_adapter(*state, target)
        self.distributed.barrier()
        return target


def run_finetune(config: FinetuneConfig, resume: bool = False, console: Console | None = None):
    """Train the adapter (continuing from the newest checkpoint with `resume`) and write it; returns
    (the trainer, the TrainSummary)."""
    from kiln.train import checkpoint

    config = dataclasses.replace(config, train=dataclasses.replace(config.train, export=True))
    trainer = FinetuneTrainer(config, console)
    if resume:
        trainer.resume()
    elif checkpoint.latest_checkpoint(trainer.checkpoint_dir):
        raise KilnError(
            f"{config.train.out_dir} already holds checkpoints; pass --resume to continue that run, "
            "or choose another --out-dir"
        )
    return trainer, trainer.train()


def merge_adapter(adapter_dir: str | Path, target: str | Path, base: str | Path | None = None) -> Path:
    """Write base + LoRA adapter, merged, as a plain HF model directory (tokenizer files copied)."""
    from kiln.models.hf.io import copy_tokenizer_files, load_model, save_model

    adapter_dir = Path(adapter_dir)
    if (adapter_dir / ADAPTER_DIR).is_dir():  # a finetune run's out_dir
        adapter_dir = adapter_dir / ADAPTER_DIR
    adapter = read_adapter(adapter_dir)
    base = base or adapter.config.get("base_model_name_or_path")
    if not base:
        raise KilnError(f"{adapter_dir} does not name its base model; pass --base DIR")
    if adapter.method != "lora":
        raise KilnError("a prompt-tuning adapter has no weights to merge; serve it with --adapter name=DIR")
    model = load_model(base, dtype="float32")
    attach_adapter(model, adapter)
    merge_lora(model)
    save_model(model, target)
    copy_tokenizer_files(base, target)
    return Path(target)
