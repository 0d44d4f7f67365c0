"""`kiln finetune`: train a LoRA or prompt-tuning adapter of a base model on SFT data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table


def finetune_command(
    base: Annotated[Path, typer.Option(help="Base model: an HF model directory.")],
    data: Annotated[Path, typer.Option(help="SFT data folder (`kiln data prepare --format chat` output).")],
    out_dir: Annotated[Path, typer.Option(help="Run folder: checkpoints, metrics.jsonl, adapter/.")],
    method: Annotated[str, typer.Option(help="lora or prompt (prompt tuning).")] = "lora",
    lora_rank: Annotated[int, typer.Option(help="LoRA rank r.")] = 8,
    lora_alpha: Annotated[float, typer.Option(help="LoRA alpha (the update is scaled by alpha / r).")] = 16.0,
    lora_dropout: Annotated[float, typer.Option(help="Dropout on the LoRA branch's input.")] = 0.0,
    lora_targets: Annotated[
        str, typer.Option(help="Linears to adapt, comma-separated: q,k,v,o,gate,up,down.")
    ] = "q,v",
    num_virtual_tokens: Annotated[int, typer.Option(help="Prompt tuning: virtual tokens.")] = 20,
    prompt_init_text: Annotated[
        str | None, typer.Option(help="Prompt tuning: initialise from this text (default: random tokens).")
    ] = None,
    max_steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 200,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 8,
    seq_len: Annotated[int, typer.Option(help="Longest example in tokens (longer ones are cut).")] = 256,
    packing: Annotated[
        bool,
        typer.Option(
            "--packing/--padding",
            help="Pack whole examples into seq_len rows with attention masked across them (lora, full), "
            "or one right-padded example per row.",
        ),
    ] = False,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in out_dir.")] = False,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Any TrainConfig field, e.g. --set precision=bf16.")
    ] = None,
) -> None:
    """Finetune an adapter with the trainer (checkpoints, --resume, metrics, `kiln plot`); only the adapter's
    parameters train. Writes a PEFT-format adapter to OUT_DIR/adapter (serve it with --adapter name=DIR)."""
    from kiln.finetune import LoraConfig, PromptTuningConfig, count_trainable_parameters
    from kiln.train.finetune import FinetuneConfig, finetune_train_config, run_finetune

    train = finetune_train_config(
        str(base), str(data), str(out_dir), max_steps=max_steps, lr=lr, batch_size=batch_size, seq_len=seq_len
    ).override(list(set_ or []))
    config = FinetuneConfig(
        base=str(base),
        method=method,
        lora=LoraConfig(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, targets=lora_targets),
        prompt=PromptTuningConfig(num_virtual_tokens=num_virtual_tokens, init_text=prompt_init_text),
        train=train,
        packing=packing,
    )
    trainer, summary = run_finetune(config, resume=resume, console=Console(stderr=True))
    trainable, total = count_trainable_parameters(trainer.model)
    trainer.distributed.close()
    if not trainer.distributed.is_main:
        trainer.distributed.exit_worker()
        return
    table = Table(title=f"kiln finetune --method {method}", show_header=False)
    rows = {
        "trainable parameters": f"{trainable:,} of {total:,} ({100 * trainable / total:.3f}%)",
        "steps": f"{summary.steps:,}",
        "tokens/s": f"{summary.tokens_per_second:,.0f}",
        "final train loss": f"{summary.final_loss:.4f}",
        "validation loss": "n/a" if summary.val_loss is None else f"{summary.val_loss:.4f}",
        "adapter": str(summary.export_dir),
    }
    for key, value in rows.items():
        table.add_row(key, value)
    Console().print(table)
    trainer.distributed.exit_worker()
