"""`make demo`: train the default kiln model once (cached), then complete a Python prompt with it.

The first run prepares the Python standard library's source into token shards, trains the `demo` recipe
(about 10 minutes on 2 CPU cores) and exports it as a Llama-layout HF directory under
~/.cache/kiln/models/demo. Later runs reuse it. An interrupted training run resumes from its checkpoint.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from rich.console import Console

from kiln.paths import cache_root


def demo_model_dir(recipe: str = "demo", cache_dir: Path | None = None) -> Path:
    return (cache_dir or cache_root() / "models") / recipe


def train_demo_model(recipe: str, target: Path, console: Console) -> Path:
    """Train `recipe` (resuming an interrupted run) and copy its exported model to `target`."""
    from kiln.recipes import get_recipe
    from kiln.train import checkpoint
    from kiln.train.trainer import Trainer

    config = get_recipe(recipe)()
    console.print(f"[bold]training the demo model[/] (once; cached at {target})")
    trainer = Trainer(config, console=console)
    if checkpoint.latest_checkpoint(trainer.checkpoint_dir):
        console.print(f"resuming from {trainer.resume()}")
    summary = trainer.train()
    console.print(
        f"trained {summary.steps} steps ({summary.tokens:,} tokens) in {summary.wall_seconds:.0f}s: "
        f"{summary.tokens_per_second:,.0f} tokens/s, MFU {summary.mfu:.1%}, "
        f"validation loss {summary.val_loss:.3f}"
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(summary.export_dir, staging)
    os.replace(staging, target)
    return target


def run_demo(
    recipe: str,
    cache_dir: Path | None,
    prompt: str,
    max_new_tokens: int,
    console: Console,
    serve: bool = False,
    port: int = 8000,
) -> str:
    """Train the recipe's model once, complete `prompt` with it, then (optionally) serve it."""
    from kiln.engine import LLM, SamplingParams

    directory = demo_model_dir(recipe, cache_dir)
    if not (directory / "config.json").is_file():
        train_demo_model(recipe, directory, console)
    llm = LLM(directory, dtype="float32", verbose=False)
    console.print(f"[dim]model: {directory} ({llm.engine.model.num_parameters() / 1e6:.1f}M parameters)[/]")
    start = time.perf_counter()
    # Greedy, with a mild repetition penalty: a 3M-parameter model otherwise falls into loops quickly.
    params = SamplingParams(temperature=0.0, repetition_penalty=1.3, max_tokens=max_new_tokens)
    output = llm.generate(prompt, params)[0].outputs[0]
    elapsed = time.perf_counter() - start
    console.print(prompt, end="", style="bold", markup=False, highlight=False)
    console.print(output.text, markup=False, highlight=False)
    num_tokens = len(output.token_ids)
    console.print(f"[dim]{num_tokens} tokens in {elapsed:.2f}s ({num_tokens / elapsed:.0f} tokens/s)[/]")
    if serve:
        from kiln.engine.config import EngineConfig
        from kiln.server.app import serve as serve_model
        from kiln.server.config import ServerConfig

        del llm  # the server loads its own engine
        console.print(
            f"[bold]serving[/] the demo model: API http://127.0.0.1:{port}/v1, "
            f"web UI http://127.0.0.1:{port}/ (Ctrl-C stops)"
        )
        server = ServerConfig(port=port, served_model_name=f"kiln-{recipe}")
        serve_model(directory, server, engine_config=EngineConfig(dtype="float32"))
    return output.text
