"""`kiln train`, `kiln plan`, `kiln export` and `kiln plot`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Any TrainConfig field: --set lr=3e-4 --set model.num_layers=6 (repeatable)."),
]


def _recipe_config(recipe: str, inputs: list[str] | None, data: Path | None, out_dir: Path | None):
    from kiln.recipes import get_recipe

    config = get_recipe(recipe)(
        inputs=inputs, data_dir=str(data) if data else None, out_dir=str(out_dir) if out_dir else None
    )
    return dataclasses.replace(config, prepare=None) if data is not None else config


def train_command(
    recipe: Annotated[
        str, typer.Option(help="Recipe from kiln/recipes/: demo (the default model) or tiny.")
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
    kernels: Annotated[
        str | None,
        typer.Option(help="Fused Triton kernels or torch: torch, triton, or auto (Triton on CUDA)."),
    ] = None,
    goldfish_k: Annotated[
        int | None, typer.Option(help="Goldfish loss: drop 1 in K targets (0 = off).")
    ] = None,
    goldfish_h: Annotated[
        int | None, typer.Option(help="Goldfish loss: hash the H tokens before a target.")
    ] = None,
    dp_shard: Annotated[
        int | None,
        typer.Option(help="FSDP2 shard degree under torchrun; -1 (default) = the processes left over."),
    ] = None,
    dp_replicate: Annotated[
        int | None, typer.Option(help="Data-parallel replicas: DDP (with --dp-shard 1) or HSDP.")
    ] = None,
    tp: Annotated[int | None, typer.Option(help="Tensor (+ sequence) parallel degree.")] = None,
    ep: Annotated[
        int | None,
        typer.Option(
            help="Expert-parallel degree (MoE models): divides --dp-shard and num_experts; combines with "
            "--tp and --dp-replicate (docs/scaling.md)."
        ),
    ] = None,
    pp: Annotated[
        int | None, typer.Option(help="Pipeline-parallel degree: the layers split into this many stages.")
    ] = None,
    pp_schedule: Annotated[
        str | None, typer.Option(help="Pipeline schedule: 1f1b (default), interleaved-1f1b or gpipe.")
    ] = None,
    pp_microbatches: Annotated[
        int | None, typer.Option(help="Micro-batches per batch in the pipeline (default: --pp).")
    ] = None,
    pp_virtual_stages: Annotated[
        int | None, typer.Option(help="Stages per pipeline rank (interleaved-1f1b: >= 2).")
    ] = None,
    collective_timeout_s: Annotated[
        float | None, typer.Option(help="Fail the job when a collective waits this long (hung rank).")
    ] = None,
    set_: SetOption = None,
) -> None:
    """Train a model from a recipe; every TrainConfig field can be overridden. Ends with an HF export.

    Under torchrun (`torchrun --nproc-per-node N -m kiln.cli train ...`) the processes split the work as
    --pp x --dp-replicate x --dp-shard x --tp; a restarted job (--max-restarts) resumes by itself."""
    from kiln.errors import KilnError
    from kiln.train import checkpoint
    from kiln.train.distributed import restart_count
    from kiln.train.trainer import Trainer

    config = _recipe_config(recipe, inputs, data, out_dir)
    flags = dict(
        max_steps=max_steps,
        precision=precision,
        device=device,
        kernels=kernels,
        goldfish_k=goldfish_k,
        goldfish_h=goldfish_h,
        dp_shard=dp_shard,
        dp_replicate=dp_replicate,
        tp=tp,
        ep=ep,
        pp=pp,
        pp_schedule=pp_schedule,
        pp_microbatches=pp_microbatches,
        pp_virtual_stages=pp_virtual_stages,
        collective_timeout_s=collective_timeout_s,
    )
    config = config.override([f"{k}={v}" for k, v in flags.items() if v is not None] + list(set_ or []))
    trainer = Trainer(config, console=Console(stderr=True))
    console = trainer.console  # quiet on every rank but 0
    # A job torchrun restarted after a failure resumes by itself (any rank's count, as nodes count apart).
    if resume or trainer.distributed.any(restart_count() > 0):
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
    trainer.distributed.close()
    if not trainer.distributed.is_main:
        trainer.distributed.exit_worker()
        return
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
    trainer.distributed.exit_worker()


def plan_command(
    recipe: Annotated[
        str, typer.Option(help="Recipe from kiln/recipes/ whose model and batch to plan.")
    ] = "demo",
    dp_shard: Annotated[int, typer.Option(help="FSDP2 shard degree.")] = 1,
    dp_replicate: Annotated[
        int, typer.Option(help="Data-parallel replicas (DDP, or HSDP with sharding).")
    ] = 1,
    tp: Annotated[int, typer.Option(help="Tensor-parallel degree.")] = 1,
    ep: Annotated[int, typer.Option(help="Expert-parallel degree (MoE models).")] = 1,
    pp: Annotated[int, typer.Option(help="Pipeline-parallel degree.")] = 1,
    pp_schedule: Annotated[str, typer.Option(help="1f1b, interleaved-1f1b or gpipe.")] = "1f1b",
    pp_microbatches: Annotated[int, typer.Option(help="Pipeline micro-batches (0 = --pp).")] = 0,
    pp_virtual_stages: Annotated[int, typer.Option(help="Stages per pipeline rank.")] = 1,
    gpus: Annotated[
        int, typer.Option(help="Recommend a layout for this many GPUs instead (see the options below).")
    ] = 0,
    gpus_per_node: Annotated[int, typer.Option(help="With --gpus: GPUs per node.")] = 8,
    gpu_memory_gib: Annotated[float, typer.Option(help="With --gpus: memory per GPU.")] = 80.0,
    gpu_tflops: Annotated[float, typer.Option(help="With --gpus: dense bf16 peak per GPU.")] = 989.0,
    intra_node_gbps: Annotated[float, typer.Option(help="With --gpus: GB/s per GPU inside a node.")] = 450.0,
    inter_node_gbps: Annotated[float, typer.Option(help="With --gpus: GB/s per GPU between nodes.")] = 50.0,
    global_batch: Annotated[
        int, typer.Option(help="With --gpus: sequences per step (default: batch_size x GPUs).")
    ] = 0,
    set_: SetOption = None,
) -> None:
    """Estimate training memory per rank (parameters, gradients, optimizer state, activations) for a
    recipe's model and batch under a parallel layout; with --gpus, rank the layouts that fit a cluster.
    The formulas are in docs/scaling.md."""
    from kiln.train.layout import ParallelLayout
    from kiln.train.plan import PipelineSettings, format_bytes, plan_memory

    config = _recipe_config(recipe, None, None, None).override(list(set_ or []))
    if gpus:
        from kiln.train.plan_layout import Cluster

        cluster = Cluster(
            num_gpus=gpus,
            gpus_per_node=gpus_per_node,
            gpu_memory_bytes=int(gpu_memory_gib * 2**30),
            peak_flops=gpu_tflops * 1e12,
            intra_node_bytes_per_s=intra_node_gbps * 1e9,
            inter_node_bytes_per_s=inter_node_gbps * 1e9,
        )
        _print_recommendations(recipe, config, cluster, global_batch or config.batch_size * gpus)
        return
    layout = ParallelLayout(dp_replicate=dp_replicate, dp_shard=dp_shard, tp=tp, ep=ep, pp=pp)
    layout.check_model(config.model, config.seq_len)
    settings = PipelineSettings(pp_schedule, pp_microbatches, pp_virtual_stages)
    if pp > 1:
        from kiln.train.pipeline import check_pipeline_config

        check_pipeline_config(
            dataclasses.replace(
                config,
                pp=pp,
                pp_schedule=pp_schedule,
                pp_microbatches=pp_microbatches,
                pp_virtual_stages=pp_virtual_stages,
            )
        )
    precision = "bf16" if config.precision == "auto" else config.precision  # what GPUs choose for auto
    plan = plan_memory(
        config.model,
        layout,
        seq_len=config.seq_len,
        batch_size=config.batch_size,
        precision=precision,
        activation_checkpointing=config.activation_checkpointing,
        pipeline=settings,
    )
    processes = "1 process" if layout.world_size == 1 else f"{layout.world_size} processes"
    console = Console()
    console.print(
        f"kiln plan --recipe {recipe}: {config.model.num_parameters() / 1e6:,.1f}M parameters, "
        f"{layout.describe()} ({processes}), {precision}; micro-batch {config.batch_size} x "
        f"{config.seq_len} tokens per data-parallel rank, global batch "
        f"{config.batch_size * layout.dp_size} sequences"
    )
    table = Table()
    table.add_column("per rank")
    table.add_column("bytes", justify="right")
    for name, value in plan.rows().items():
        table.add_row(name, format_bytes(value))
    table.add_row("[bold]peak[/]", f"[bold]{format_bytes(plan.peak)}[/]")
    console.print(table)
    if plan.stage_peaks:
        peaks = ", ".join(format_bytes(peak) for peak in plan.stage_peaks)
        console.print(
            f"pipeline ranks' peaks: {peaks} (the table is the largest); {pp_schedule} bubble "
            f"{plan.bubble_fraction:.1%} of each step"
        )
    if not plan.gradients_at_peak:
        console.print("peak = parameters + optimizer state + activations + buffers (gradients come later)")


def _print_recommendations(recipe: str, config, cluster, global_batch: int) -> None:
    from kiln.train.plan import format_bytes
    from kiln.train.plan_layout import recommend_layouts

    choices = recommend_layouts(config.model, cluster, seq_len=config.seq_len, global_batch=global_batch)
    console = Console()
    console.print(
        f"kiln plan --recipe {recipe} --gpus {cluster.num_gpus}: "
        f"{config.model.num_parameters() / 1e9:,.2f}B parameters, global batch {global_batch} x "
        f"{config.seq_len} tokens, {cluster.gpu_memory_bytes / 2**30:.0f} GiB per GPU; fastest first"
    )
    table = Table()
    columns = ("layout", "micro-batches", "recompute", "peak/GPU", "bubble", "step (est.)", "comm tp/pp/dp")
    for column in columns:
        table.add_column(column)
    for choice in choices:
        parts = choice.parts
        table.add_row(
            choice.layout.describe(),
            str(choice.microbatches),
            "yes" if choice.activation_checkpointing else "no",
            format_bytes(choice.plan.peak),
            f"{choice.plan.bubble_fraction:.0%}",
            f"{choice.step_seconds:.2f} s",
            f"{parts['tp']:.2f} / {parts['pp']:.2f} / {parts['dp']:.2f} s",
        )
    console.print(table)


def export_command(
    checkpoint: Annotated[
        Path, typer.Argument(help="A checkpoint folder (OUT_DIR/checkpoints/step-N), or a run's OUT_DIR.")
    ],
    target: Annotated[Path, typer.Argument(help="HF model directory to write.")],
    data: Annotated[
        Path | None, typer.Option(help="Data folder whose tokenizer to include (default: the run's).")
    ] = None,
    merge: Annotated[
        bool,
        typer.Option(help="CHECKPOINT is a LoRA adapter dir (or finetune run): write base + adapter merged."),
    ] = False,
    base: Annotated[
        Path | None, typer.Option(help="With --merge: the base model (default: the adapter's own record).")
    ] = None,
) -> None:
    """Turn a kiln checkpoint, saved under any parallel layout, into an HF model directory; with --merge,
    fold a LoRA adapter into its base model instead."""
    from kiln.train.export import export_checkpoint, resolve_checkpoint

    if merge:
        from kiln.train.finetune import merge_adapter

        Console().print(f"merged {checkpoint} -> {merge_adapter(checkpoint, target, base)}")
        return
    source = resolve_checkpoint(checkpoint)
    written = export_checkpoint(source, target, data)
    Console().print(f"exported {source} -> {written}")


def plot_command(
    run: Annotated[Path, typer.Argument(help="A run folder (out_dir of kiln train).")],
    output: Annotated[Path | None, typer.Option(help="PNG path (default RUN/loss.png).")] = None,
) -> None:
    """Plot a run's training and validation loss to a PNG."""
    from kiln.train.metrics import plot_run

    Console().print(f"wrote {plot_run(run, output)}")
