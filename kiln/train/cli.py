"""`kiln train` and `kiln plot`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table


def train_command(
    recipe: Annotated[
        str, typer.Option(help="Recipe from recipes/: demo (the default model) or tiny.")
    ] = "demo",
    data: Annotated[
        Path | None, typer.Option(help="Prepared data folder (manifest.json) to train on.")
    ] = None,
    inputs: Annotated[
        list[str] | None,
        typer.Option(
            "--inputs", help="Your own text files/folders: prepared with the recipe's settings first."
        ),
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option(help="Run folder: checkpoints, metrics.jsonl, model/.")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from the newest complete checkpoint in out_dir.")
    ] = False,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (overrides the recipe).")] = None,
    precision: Annotated[str | None, typer.Option(help="auto, fp32, bf16 or fp16.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, ...")] = None,
    goldfish_k: Annotated[
        int | None, typer.Option(help="Goldfish loss: drop 1 in K targets (0 = off).")
    ] = None,
    goldfish_h: Annotated[
        int | None, typer.Option(help="Goldfish loss: hash the H tokens before a target.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Any TrainConfig field: --set lr=3e-4 --set model.num_layers=6 (repeatable)."
        ),
    ] = None,
) -> None:
    """Train a model from a recipe; every TrainConfig field can be overridden. Ends with an HF export."""
    from kiln.errors import KilnError
    from kiln.train import checkpoint
    from kiln.train.trainer import Trainer
    from recipes import get_recipe

    config = get_recipe(recipe)(
        inputs=inputs, data_dir=str(data) if data else None, out_dir=str(out_dir) if out_dir else None
    )
    if data is not None:
        config = dataclasses.replace(config, prepare=None)
    flags = dict(
        max_steps=max_steps, precision=precision, device=device, goldfish_k=goldfish_k, goldfish_h=goldfish_h
    )
    config = config.override([f"{k}={v}" for k, v in flags.items() if v is not None] + list(set_ or []))
    console = Console(stderr=True)
    trainer = Trainer(config, console=console)
    if resume:
        resumed = trainer.resume()
        console.print(
            f"resuming from {resumed}" if resumed else "no checkpoint to resume from; starting fresh"
        )
    elif checkpoint.latest_checkpoint(trainer.checkpoint_dir):
        raise KilnError(
            f"{config.out_dir} already holds checkpoints; pass --resume to continue that run, "
            "or choose another --out-dir"
        )
    summary = trainer.train()
    table = Table(title=f"kiln train --recipe {recipe}", show_header=False)
    rows = {
        "steps": f"{summary.steps:,}",
        "tokens": f"{summary.tokens:,}",
        "wall time": f"{summary.wall_seconds:,.1f} s",
        "tokens/s": f"{summary.tokens_per_second:,.0f}",
        "MFU": f"{summary.mfu:.1%}",
        "final train loss": f"{summary.final_loss:.4f}",
        "validation loss": "n/a" if summary.val_loss is None else f"{summary.val_loss:.4f}",
        "checkpoint": str(summary.checkpoint),
        "model": str(summary.export_dir),
    }
    for key, value in rows.items():
        table.add_row(key, value)
    Console().print(table)


def plot_command(
    run: Annotated[Path, typer.Argument(help="A run folder (out_dir of kiln train).")],
    output: Annotated[Path | None, typer.Option(help="PNG path (default RUN/loss.png).")] = None,
) -> None:
    """Plot a run's training and validation loss to a PNG."""
    from kiln.train.metrics import plot_run

    Console().print(f"wrote {plot_run(run, output)}")
