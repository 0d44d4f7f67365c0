"""`kiln bench ...`: benchmarks against the tools users would otherwise pick, measured in one run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from kiln.bench.fairness import fairness_command
from kiln.bench.finetune_cli import finetune_command
from kiln.bench.linear import linear_command
from kiln.bench.serve import serve_command
from kiln.engine.options import (
    DEFAULT,
    BlockSize,
    Kernels,
    KVCacheMemory,
    MaxNumBatchedTokens,
    PrefixCaching,
    engine_config_from_flags,
)

bench_app = typer.Typer(help="Benchmarks against peers (ratios measured in one run).", no_args_is_help=True)
bench_app.command("serve")(serve_command)
bench_app.command("fairness")(fairness_command)
bench_app.command("linear")(linear_command)
bench_app.command("finetune")(finetune_command)


@bench_app.command("train")
def train_command(
    recipe: Annotated[str, typer.Option(help="Recipe whose model shape to benchmark.")] = "demo",
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = 16,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 256,
    steps: Annotated[int, typer.Option(help="Timed steps per side (after warm-up).")] = 20,
    warmup: Annotated[int, typer.Option(help="Untimed steps per side first.")] = 3,
    precision: Annotated[str, typer.Option(help="kiln's precision: fp32, bf16 or auto.")] = "fp32",
    peer_precision: Annotated[
        str | None, typer.Option(help="The peer's precision (default: the same as kiln's).")
    ] = None,
    compile: Annotated[bool, typer.Option(help="torch.compile kiln's model.")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    moe: Annotated[
        bool, typer.Option(help="The recipe's model as MoE (8 experts, top-2, 4 layers) vs Mixtral.")
    ] = False,
    output: Annotated[Path, typer.Option(help="Where to write the JSON result.")] = Path(
        "benchmarks/train.json"
    ),
) -> None:
    """kiln's training step vs transformers' LlamaForCausalLM in a plain PyTorch AdamW loop: tokens/s."""
    from kiln.bench.results import write_result
    from kiln.bench.train import MOE_SHAPE, bench_train
    from kiln.recipes import get_recipe

    model = get_recipe(recipe)().model
    model = model.replace(**MOE_SHAPE) if moe else model
    result = bench_train(
        model,
        batch_size=batch_size,
        seq_len=seq_len,
        steps=steps,
        warmup=warmup,
        precision=precision,
        peer_precision=peer_precision,
        compile=compile,
        device=device,
        name=recipe + ("-moe" if moe else ""),
    )
    write_result(result, output)
    table = Table(
        title=f"training step, {result.model} model ({result.parameters / 1e6:.2f}M), {result.device}"
    )
    table.add_column("")
    table.add_column("median step", justify="right")
    table.add_column("tokens/s", justify="right")
    table.add_row("kiln", f"{result.kiln_step_ms:.1f} ms", f"{result.kiln_tokens_per_second:,.0f}")
    table.add_row(
        f"transformers {result.transformers_version} + AdamW loop",
        f"{result.peer_step_ms:.1f} ms",
        f"{result.peer_tokens_per_second:,.0f}",
    )
    Console().print(table)
    Console().print(
        f"kiln ({result.precision}) / peer ({result.peer_precision}) = [bold]{result.speedup:.2f}x[/]; "
        f"wrote {output}"
    )


def _profile_steps(shape: str, dtypes: tuple[str, ...], threads: int, engine_config, output) -> None:
    import dataclasses

    import torch

    from kiln.bench.engine_speed import build_shape_dir
    from kiln.bench.step_profile import print_profiles, profile_shape

    torch.set_num_threads(threads)
    directory, _ = build_shape_dir(shape)
    profiles = profile_shape(directory, dtypes, engine_config)
    print_profiles(profiles)
    output = output or Path(f"benchmarks/profile-{shape}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    rows = [{**dataclasses.asdict(p), "fractions": p.fractions(), "threads": threads} for p in profiles]
    output.write_text(json.dumps(rows, indent=2) + "\n")
    Console().print(f"wrote {output}")


@bench_app.command("generate")
def generate_command(
    recipe: Annotated[
        str, typer.Option(help="Recipe whose model shape to benchmark (random weights).")
    ] = "demo",
    num_prompts: Annotated[int, typer.Option(help="Prompts submitted together.")] = 32,
    min_prompt: Annotated[int, typer.Option(help="Shortest prompt, tokens.")] = 8,
    max_prompt: Annotated[int, typer.Option(help="Longest prompt, tokens.")] = 256,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per prompt (EOS ignored).")] = 64,
    repeats: Annotated[int, typer.Option(help="Runs per side; the best counts.")] = 2,
    kv_cache_memory: KVCacheMemory = DEFAULT.kv_cache_memory,
    max_num_batched_tokens: MaxNumBatchedTokens = DEFAULT.max_num_batched_tokens,
    block_size: BlockSize = DEFAULT.block_size,
    prefix_caching: PrefixCaching = DEFAULT.enable_prefix_caching,
    kernels: Kernels = DEFAULT.kernels,
    shape: Annotated[
        str | None,
        typer.Option(
            help="Instead: the model-size benchmark on this shape (gpt2-small: 134M Llama layout): batch-1 "
            "decode with its bandwidth roofline, offline 64 x (128, 128), 1024-token prefill; fp32 and bf16."
        ),
    ] = None,
    profile: Annotated[
        bool,
        typer.Option(
            help="Instead: profile decode steps of --shape (default gpt2-small) at batch 1 and 64: the "
            "split between matmuls, attention, other ops and Python."
        ),
    ] = False,
    threads: Annotated[int, typer.Option(help="Intra-op threads, both sides.")] = 2,
    moe: Annotated[
        bool, typer.Option(help="The recipe's model as MoE (8 experts, top-2, 4 layers) vs Mixtral.")
    ] = False,
    dtypes: Annotated[str, typer.Option(help="Comma-separated dtypes, with --shape.")] = "float32,bfloat16",
    output: Annotated[Path | None, typer.Option(help="Where to write the JSON result.")] = None,
) -> None:
    """Offline batch generation: kiln.LLM vs transformers generate (and kiln's reference generator)."""
    engine_config = engine_config_from_flags(locals())
    if profile:
        _profile_steps(shape or "gpt2-small", tuple(dtypes.split(",")), threads, engine_config, output)
        return
    if shape is not None:
        from kiln.bench.engine_speed import bench_engine_speed, print_engine_speed

        speed = bench_engine_speed(
            shape,
            dtypes=tuple(dtypes.split(",")),
            threads=threads,
            repeats=repeats,
            engine_config=engine_config,
        )
        output = output or Path(f"benchmarks/generate-{shape}.json")
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(speed.to_json(), indent=2) + "\n")
        print_engine_speed(speed, output)
        return
    output = output or Path("benchmarks/generate.json")
    from kiln.bench.generate import bench_generate
    from kiln.bench.results import write_result
    from kiln.bench.train import MOE_SHAPE
    from kiln.recipes import get_recipe

    model = get_recipe(recipe)().model
    result = bench_generate(
        model.replace(**MOE_SHAPE) if moe else model,
        name=recipe + ("-moe" if moe else ""),
        num_prompts=num_prompts,
        min_prompt=min_prompt,
        max_prompt=max_prompt,
        new_tokens=new_tokens,
        repeats=repeats,
        engine_config=engine_config,
    )
    write_result(result, output)
    table = Table(
        title=f"{num_prompts} prompts of {min_prompt}-{max_prompt} tokens, {new_tokens} new tokens each, "
        f"{result.model} model ({result.parameters / 1e6:.2f}M), {result.threads} threads"
    )
    table.add_column("")
    table.add_column("seconds", justify="right")
    table.add_column("tokens/s", justify="right")
    table.add_row("kiln.LLM", f"{result.kiln_seconds:.2f}", f"{result.kiln_tokens_per_second:,.0f}")
    table.add_row(
        f"transformers {result.transformers_version} generate",
        f"{result.peer_seconds:.2f}",
        f"{result.peer_tokens_per_second:,.0f}",
    )
    table.add_row(
        "kiln reference generate",
        f"{result.reference_seconds:.2f}",
        f"{result.reference_tokens_per_second:,.0f}",
    )
    Console().print(table)
    Console().print(
        f"kiln.LLM / transformers = [bold]{result.speedup_vs_peer:.2f}x[/]; identical greedy outputs "
        f"{result.identical_to_peer}/{result.num_prompts}; wrote {output}"
    )


@bench_app.command("kv-cache")
def kv_cache_command(
    shape: Annotated[
        str, typer.Option(help="Model shape (random weights) for decode speed: gpt2-small (134M) or tiny.")
    ] = "gpt2-small",
    context: Annotated[int, typer.Option(help="Prompt tokens per sequence before the timed decodes.")] = 2000,
    batches: Annotated[str, typer.Option(help="Comma-separated decode batch sizes.")] = "1,4",
    new_tokens: Annotated[int, typer.Option(help="Decode steps timed per sequence.")] = 16,
    dtypes: Annotated[str, typer.Option(help="Comma-separated model dtypes.")] = "bfloat16,float32",
    threads: Annotated[int, typer.Option(help="Intra-op threads.")] = 2,
    demo_model: Annotated[
        Path, typer.Option(help="Trained model for greedy agreement and perplexity (skipped if absent).")
    ] = Path.home() / ".cache/kiln/models/demo",
    demo_val: Annotated[Path, typer.Option(help="Its validation token shard (.npy).")] = Path.home()
    / ".cache/kiln/data/stdlib-bpe8k/val_00000.npy",
    output: Annotated[Path, typer.Option(help="Where to write the JSON result.")] = Path(
        "benchmarks/kv_cache.json"
    ),
) -> None:
    """Quantized KV cache (int8/int4) vs the model-dtype cache: bytes per token, long-context decode speed,
    and on the demo model greedy agreement, logprob change and validation perplexity."""
    from kiln.bench.kv_cache import bench_kv_cache, write_kv_cache_result

    result = bench_kv_cache(
        shape, context, tuple(int(b) for b in batches.split(",") if b), new_tokens,
        tuple(d for d in dtypes.split(",") if d), threads, demo_model, demo_val,
    )  # fmt: skip
    write_kv_cache_result(result, output)
    print(f"wrote {output}")


@bench_app.command("quant")
def quant_command(
    shape: Annotated[
        str, typer.Option(help="Model shape (random weights): gpt2-small (134M) or tiny.")
    ] = "gpt2-small",
    schemes: Annotated[str, typer.Option(help="Comma-separated: int8, int4, w8a8.")] = "int8,int4,w8a8",
    threads: Annotated[int, typer.Option(help="Intra-op threads.")] = 2,
    repeats: Annotated[
        int, typer.Option(help="Round-robin batch-1 rounds (offline: half as many); the best counts.")
    ] = 3,
    offline: Annotated[
        str,
        typer.Option(help="Comma-separated schemes (bf16 = baseline) to also time offline 64 x (128, 128)."),
    ] = "bf16,w8a8",
    kernels: Annotated[bool, typer.Option(help="Also time the fast-path candidates per layer shape.")] = True,
    demo_model: Annotated[Path, typer.Option(help="Trained model for validation perplexity.")] = Path.home()
    / ".cache/kiln/models/demo",
    demo_val: Annotated[Path, typer.Option(help="Its validation token shard (.npy).")] = Path.home()
    / ".cache/kiln/data/stdlib-bpe8k/val_00000.npy",
    output: Annotated[Path, typer.Option(help="Where to write the JSON result.")] = Path(
        "benchmarks/quant.json"
    ),
) -> None:
    """Quantized weights vs bf16: decode speed at the 134M shape, KL to bf16, demo validation perplexity."""
    from kiln.bench.quant import bench_quant, format_quant, write_quant_result

    result = bench_quant(
        shape,
        tuple(s for s in schemes.split(",") if s),
        threads,
        repeats,
        tuple(s for s in offline.split(",") if s),
        demo_model,
        demo_val,
        kernels,
    )
    write_quant_result(result, output)
    print(format_quant(result))
    print(f"wrote {output}")


@bench_app.command("kernels")
def kernels_command(
    quick: Annotated[bool, typer.Option(help="One size per op instead of the full sweep.")] = False,
    only: Annotated[
        str | None, typer.Option(help="Only ops whose name contains this, e.g. attention.")
    ] = None,
    output: Annotated[Path, typer.Option(help="Where to write the JSON result.")] = Path(
        "benchmarks/kernels.json"
    ),
) -> None:
    """Each Triton kernel vs its torch reference (attention also vs SDPA): TFLOP/s or GB/s and the fraction
    of the GPU's peak. Needs a CUDA GPU."""
    from kiln.bench.kernels import bench_kernels, format_rows
    from kiln.bench.results import write_result

    result = bench_kernels(quick=quick, only=only)
    write_result(result, output)
    table = Table(
        title=f"kernels on {result.device} (peaks {result.peak_tflops:.0f} TFLOP/s bf16, "
        f"{result.peak_gbs:,.0f} GB/s), torch {result.torch_version}, triton {result.triton_version}"
    )
    for column in ("op", "shape", "implementation", "ms", "throughput", "of peak", "time / triton"):
        table.add_column(column, justify="left" if column in ("op", "shape", "implementation") else "right")
    for row in format_rows(result):
        table.add_row(*row)
    Console().print(table)
    Console().print(f"wrote {output}")


@bench_app.command("batch")
def batch_command(
    model: Annotated[Path, typer.Option("--model", "-m", help="Model directory (the demo model).")] = Path(
        "~/.cache/kiln/models/demo"
    ),
    num_records: Annotated[int, typer.Option(help="Records per job.")] = 2000,
    postgres: Annotated[
        str | None, typer.Option(help="postgresql://... for the PostgreSQL runs (omit: SQLite only).")
    ] = None,
    threads: Annotated[int, typer.Option(help="Cores in all; two workers get half each.")] = 2,
    chunk_size: Annotated[int, typer.Option(help="Records a worker claims at a time.")] = 256,
    repeats: Annotated[
        int, typer.Option(help="Fresh jobs per configuration (round-robin); the median counts.")
    ] = 3,
    output: Annotated[Path, typer.Option(help="Where to write the JSON result.")] = Path(
        "benchmarks/batch.json"
    ),
) -> None:
    """A tagging job (short prompts, five labels): records/s and records/day, SQLite vs PostgreSQL, one
    worker vs two."""
    import tempfile

    from kiln.bench.batch import bench_batch
    from kiln.bench.results import write_result

    with tempfile.TemporaryDirectory() as scratch:
        result = bench_batch(
            model.expanduser(), Path(scratch) / "jobs.db", postgres, num_records, threads, chunk_size, repeats
        )
    write_result(result, output)
    table = Table(title=f"tagging job, {num_records} records, 5 labels, {model.name}")
    for column in ("store", "workers x threads", "seconds (median)", "all runs", "records/s", "records/day"):
        table.add_column(column, justify="right")
    for run in result.runs:
        table.add_row(
            run.store,
            f"{run.num_workers} x {run.threads_per_worker}",
            f"{run.seconds:.1f}",
            " ".join(f"{s:.1f}" for s in run.all_seconds),
            f"{run.records_per_second:,.1f}",
            f"{run.records_per_day:,.0f}",
        )
    Console(width=max(Console().width, 110)).print(table)
    Console().print(f"wrote {output}")


@bench_app.command("loki")
def loki_command(
    mode: Annotated[
        str,
        typer.Argument(
            help="decode: attention time per decode step; engine: the engine's decode tokens/s on --model; "
            "perplexity: Loki vs dense on --model."
        ),
    ] = "decode",
    model: Annotated[
        Path, typer.Option(help="engine / perplexity: a model calibrated by `kiln calibrate-loki`.")
    ] = Path.home() / ".cache/kiln/models/demo",
    val: Annotated[Path, typer.Option(help="perplexity: its validation token shard (.npy).")] = Path.home()
    / ".cache/kiln/data/stdlib-bpe8k/val_00000.npy",
    seq_len: Annotated[int, typer.Option(help="perplexity: tokens per window.")] = 1024,
    num_windows: Annotated[int, typer.Option(help="perplexity: windows of the validation shard.")] = 32,
    rank: Annotated[int | None, typer.Option(help="Scored dimensions (default head_dim / 4).")] = None,
    top_k: Annotated[float, typer.Option(help="Fraction of the context each query keeps.")] = 0.25,
    batch: Annotated[int, typer.Option(help="decode: sequences in the step.")] = 8,
    heads: Annotated[int, typer.Option(help="decode: query heads (default: the demo model's).")] = 6,
    kv_heads: Annotated[int, typer.Option(help="decode: KV heads.")] = 2,
    head_dim: Annotated[int, typer.Option(help="decode: head dimension.")] = 32,
    contexts: Annotated[
        str | None, typer.Option(help="decode / engine: comma-separated context lengths.")
    ] = None,
    repeats: Annotated[int, typer.Option(help="decode: round-robin rounds; the best of each counts.")] = 20,
    batches: Annotated[str, typer.Option(help="engine: comma-separated numbers of sequences.")] = "1,8",
    new_tokens: Annotated[int, typer.Option(help="engine: decode steps timed after the prefill.")] = 64,
    rounds: Annotated[
        int, typer.Option(help="engine: alternating dense / Loki rounds; the best counts.")
    ] = 2,
    kv_cache_dtype: Annotated[
        str | None,
        typer.Option(help="engine: int8 or int4 KV cache on both sides (default: the model dtype)."),
    ] = None,
    threads: Annotated[int, typer.Option(help="Intra-op threads.")] = 2,
    output: Annotated[
        Path | None, typer.Option(help="Where to write the JSON result (default benchmarks/loki_MODE.json).")
    ] = None,
) -> None:
    """Loki sparse attention vs dense: attention time per decode step (the engine's dense C++ paged attention,
    the torch one, Loki's C++ op and its torch code), the whole engine's decode speed on a calibrated model,
    or that model's perplexity. --contexts defaults to 512..8192 for decode, 2048,4096 for engine."""
    import argparse

    import torch

    from kiln.bench.loki import decode, engine, perplexity
    from kiln.bench.results import write_result

    runs = {"decode": decode, "engine": engine, "perplexity": perplexity}
    if mode not in runs:
        raise typer.BadParameter(f"mode must be decode, engine or perplexity, got {mode!r}")
    inputs = [] if mode == "decode" else [(model, "--model (`make demo` trains the default one)")]
    if mode == "perplexity":
        inputs.append((val, "--val"))
    for path, what in inputs:
        if not path.expanduser().exists():
            raise typer.BadParameter(f"{path} does not exist: pass {what}")
    torch.set_num_threads(threads)
    default_contexts = "2048,4096" if mode == "engine" else "512,1024,2048,4096,8192"
    args = argparse.Namespace(
        model=model.expanduser(), val=val.expanduser(), seq_len=seq_len, num_windows=num_windows, rank=rank,
        top_k=top_k, batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        contexts=[int(c) for c in (contexts or default_contexts).split(",") if c], repeats=repeats,
        batches=[int(b) for b in batches.split(",") if b], new_tokens=new_tokens, rounds=rounds,
        kv_cache_dtype=kv_cache_dtype,
    )  # fmt: skip
    result = runs[mode](args)
    target = output or Path(f"benchmarks/loki_{mode}.json")
    write_result(result, target)
    Console().print(f"wrote {target}")


@bench_app.command("bigbird")
def bigbird_command(
    lengths: Annotated[str, typer.Option(help="Comma-separated sequence lengths.")] = "1024,2048,4096,8192",
    repeats: Annotated[int, typer.Option(help="Timed runs per length; the best counts.")] = 5,
    backward: Annotated[bool, typer.Option(help="Also time forward + backward.")] = True,
    flex: Annotated[bool, typer.Option(help="Also time compiled FlexAttention (slow to compile).")] = False,
    threads: Annotated[int, typer.Option(help="Intra-op threads.")] = 2,
    output: Annotated[Path, typer.Option(help="Where to write the JSON result.")] = Path(
        "benchmarks/bigbird.json"
    ),
) -> None:
    """BigBird block-sparse attention vs dense causal attention by sequence length: time and FLOPs of one
    layer's attention on the demo shape (they should grow linearly for BigBird, quadratically for dense)."""
    import argparse

    import torch

    from kiln.bench.bigbird import scaling
    from kiln.bench.results import write_result

    torch.set_num_threads(threads)
    args = argparse.Namespace(
        lengths=[int(n) for n in lengths.split(",") if n], repeats=repeats, backward=backward, flex=flex
    )
    result = scaling(args)
    write_result(result, output)
    Console().print(f"wrote {output}")
