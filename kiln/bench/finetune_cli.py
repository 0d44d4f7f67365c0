"""`kiln bench finetune`: adapter steps vs full finetuning, learning curves, mixed-adapter serving."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console


def finetune_command(
    base: Annotated[Path, typer.Option(help="Base model directory (with tokenizer and chat template).")],
    part: Annotated[
        list[str] | None, typer.Option(help="step, learning, serve (repeatable; default: all three).")
    ] = None,
    steps: Annotated[int, typer.Option(help="learning: finetuning steps per method.")] = 200,
    method: Annotated[
        list[str] | None, typer.Option(help="learning: lora, prompt (repeatable; default: both).")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="learning: peak lr (default: per method).")] = None,
    num_virtual_tokens: Annotated[int, typer.Option(help="learning: prompt tuning's virtual tokens.")] = 20,
    prompt_init: Annotated[
        str, typer.Option(help="learning: prompt tuning's init text; 'random' for vocabulary embeddings.")
    ] = "reverse the letters",
    step_batch_size: Annotated[int, typer.Option(help="step: sequences per step.")] = 8,
    step_seq_len: Annotated[int, typer.Option(help="step: tokens per sequence.")] = 256,
    step_steps: Annotated[int, typer.Option(help="step: timed steps per method (after 2 warm-up).")] = 10,
    num_requests: Annotated[
        int, typer.Option(help="serve: requests spread over the adapters and base.")
    ] = 24,
    max_tokens: Annotated[int, typer.Option(help="serve: tokens generated per request.")] = 32,
    output: Annotated[Path, typer.Option(help="Where to write the JSON result.")] = Path(
        "benchmarks/finetune.json"
    ),
) -> None:
    """LoRA / prompt-tuning step vs full finetuning (tokens/s, peak memory), their learning curves on a
    synthetic task, and one engine serving several adapters vs merged copies one at a time."""
    from kiln.bench.finetune import bench_learning, bench_serve, bench_step

    parts = part or ["step", "learning", "serve"]
    console = Console()
    result: dict = json.loads(output.read_text()) if output.is_file() else {}
    result.update(base=str(base), torch_threads=__import__("torch").get_num_threads())
    if "step" in parts:
        result["step"] = [
            asdict(r)
            for r in bench_step(str(base), batch_size=step_batch_size, seq_len=step_seq_len, steps=step_steps)
        ]
        for row in result["step"]:
            console.print(
                f"{row['method']:>6}: {row['trainable_parameters']:>10,} trainable, "
                f"{row['tokens_per_second']:8,.0f} tok/s, peak RSS {row['peak_rss_mib']:.0f} MiB "
                f"(after load {row['rss_after_load_mib']:.0f})"
            )
    if "learning" in parts:
        init_text = None if prompt_init == "random" else prompt_init
        result["learning"] = [
            asdict(
                bench_learning(
                    str(base),
                    name,
                    steps=steps,
                    lr=lr,
                    num_virtual_tokens=num_virtual_tokens,
                    init_text=init_text,
                )
            )
            for name in method or ("lora", "prompt")
        ]
        for curve in result["learning"]:
            first, last = curve["held_out_loss"][0], curve["held_out_loss"][-1]
            console.print(
                f"{curve['method']:>6}: held-out loss {first:.3f} -> {last:.3f} (-{curve['loss_cut']:.0%}), "
                f"exact match {curve['base_exact_match']:.2f} -> {curve['exact_match']:.2f}; "
                f"e.g. {'; '.join(curve['samples'][:2])}"
            )
    if "serve" in parts:
        result["serve"] = asdict(bench_serve(str(base), num_requests=num_requests, max_tokens=max_tokens))
        serve = result["serve"]
        console.print(
            f"mixed batch {serve['mixed_seconds']:.2f}s vs one model at a time "
            f"{serve['one_at_a_time_seconds']:.2f}s ({serve['speedup']:.2f}x); "
            f"outputs equal: {serve['outputs_equal']}"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {output}")
