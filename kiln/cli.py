"""`kiln <verb>`: each verb is a thin call into its module. `kiln <verb> --help` is the reference."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kiln.bench.cli import bench_app
from kiln.data.cli import data_app
from kiln.errors import KilnError
from kiln.train.cli import plot_command, train_command

app = typer.Typer(
    name="kiln",
    help="Pretrain, finetune and serve decoder-only transformer language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
tokenizer_app = typer.Typer(help="Train and inspect tokenizers.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")
app.command("train")(train_command)
app.command("plot")(plot_command)

console = Console()
err_console = Console(stderr=True)

ModelDir = Annotated[
    Path, typer.Option("--model", "-m", help="Hugging Face model directory (config.json + *.safetensors).")
]
Dtype = Annotated[str, typer.Option(help="Weights dtype: auto (as stored), float32, bf16 or fp16.")]
Device = Annotated[
    str, typer.Option(help="Device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
]


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KilnError(f"device {device!r} requested but no CUDA GPU is available; use --device cpu")
    return device


@app.command()
def generate(
    model: ModelDir,
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt text; repeat for a batch.")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt.")] = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Keep only the k most likely tokens (0 = off).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Random seed for reproducible sampling.")] = None,
    chat: Annotated[
        bool, typer.Option(help="Wrap each prompt as a user message in the chat template.")
    ] = False,
    stream: Annotated[bool, typer.Option(help="Print tokens as they are generated (single prompt).")] = True,
    dtype: Dtype = "auto",
    device: Device = "auto",
) -> None:
    """Generate text from a model with its KV cache (greedy or sampled)."""
    from kiln.generation import GenerationConfig
    from kiln.generation import generate as run_generate
    from kiln.models.hf.io import load_model
    from kiln.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(model)
    network = load_model(model, dtype=dtype, device=resolve_device(device))
    if tokenizer.vocab_size > network.config.vocab_size:
        raise KilnError(
            f"{model}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{network.config.vocab_size}; they do not belong together"
        )
    if chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompt]
        prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    else:
        prompts = [tokenizer.encode(p) for p in prompt]
    stop = tuple(sorted(tokenizer.eos_token_ids | _config_eos(network.config.eos_token_id)))
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop_token_ids=stop,
    )
    streaming = stream and len(prompts) == 1
    decoder = tokenizer.incremental_decoder()
    if streaming:
        console.print(prompt[0], end="", style="bold", markup=False, highlight=False)

    def on_token(_: int, token: int) -> None:
        sys.stdout.write(decoder.add(token))
        sys.stdout.flush()

    outputs = run_generate(network, prompts, config, on_token=on_token if streaming else None)
    if streaming:
        sys.stdout.write(decoder.flush() + "\n")
        return
    for text, output in zip(prompt, outputs, strict=True):
        console.print(text, end="", style="bold", markup=False, highlight=False)
        console.print(tokenizer.decode(output), markup=False, highlight=False)
        console.rule()


def _config_eos(eos: int | list[int] | None) -> set[int]:
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)


@app.command()
def convert(
    source: Annotated[Path, typer.Argument(help="Model directory to read.")],
    target: Annotated[Path, typer.Argument(help="Directory to write (created if missing).")],
    dtype: Dtype = "auto",
    family: Annotated[str | None, typer.Option(help="HF family to write (default: the source's).")] = None,
    max_shard_size: Annotated[str, typer.Option(help="Largest safetensors shard, e.g. 5GB, 500MB.")] = "5GB",
) -> None:
    """Re-save a model: change its dtype, shard size or HF family; tokenizer files are copied."""
    from kiln.models.hf.io import copy_tokenizer_files, load_model, save_model

    if source.resolve() == target.resolve():
        raise KilnError("convert writes a new directory; choose a target different from the source")
    with console.status(f"loading {source}"):
        model = load_model(source, dtype=dtype)
    with console.status(f"writing {target}"):
        save_model(model, target, family=family, max_shard_size=max_shard_size)
        copied = copy_tokenizer_files(source, target)
    weight_dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    console.print(
        f"wrote {target} ({model.config.family if family is None else family}, {weight_dtype}, "
        f"{model.num_parameters() / 1e6:.2f}M parameters; copied {', '.join(copied) or 'no tokenizer files'})"
    )


@app.command()
def info(model: Annotated[Path, typer.Argument(help="Model directory.")]) -> None:
    """Show a model's configuration and parameter count without loading its weights."""
    from kiln.models.hf.io import read_config

    config, family = read_config(model)
    table = Table(title=f"{model} ({family.name})", show_header=False)
    for key, value in config.to_dict().items():
        if key != "extra_hf_config":
            table.add_row(key, str(value))
    table.add_row("parameters", f"{config.num_parameters():,}")
    console.print(table)


@tokenizer_app.command("train")
def tokenizer_train(
    files: Annotated[
        list[Path], typer.Argument(help="Text files or folders (folders: every *.py, *.txt, *.md).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for tokenizer.json.")],
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size, special tokens included.")] = 8192,
    min_frequency: Annotated[int, typer.Option(help="Merge only pairs seen at least this often.")] = 2,
) -> None:
    """Train a byte-level BPE tokenizer (with a ChatML chat template) on text files."""
    from kiln.tokenizer import train_bpe

    paths = expand_text_files(files)
    tokenizer = train_bpe(paths, vocab_size, output, min_frequency=min_frequency)
    console.print(f"trained {tokenizer.vocab_size} tokens on {len(paths)} files -> {output}")


def expand_text_files(paths: list[Path], suffixes=(".py", ".txt", ".md")) -> list[Path]:
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*") if p.suffix in suffixes and p.is_file()))
        elif path.is_file():
            out.append(path)
        else:
            raise KilnError(f"{path}: no such file or directory")
    if not out:
        raise KilnError(f"no text files found in {', '.join(map(str, paths))}")
    return out


@app.command()
def demo(
    recipe: Annotated[
        str, typer.Option(help="Recipe to train: demo (the default model) or tiny (seconds).")
    ] = "demo",
    cache_dir: Annotated[Path | None, typer.Option(help="Where trained demo models are cached.")] = None,
    prompt: Annotated[str, typer.Option(help="Python code to complete.")] = "def fibonacci(n):\n",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 48,
) -> None:
    """Train the default model once (about 10 minutes on 2 CPU cores, then cached) and complete a prompt."""
    from kiln.demo import run_demo

    run_demo(
        recipe=recipe, cache_dir=cache_dir, prompt=prompt, max_new_tokens=max_new_tokens, console=console
    )


def main() -> None:
    """Entry point: runs the CLI and turns user errors into one line instead of a traceback."""
    try:
        app()
    except KilnError as error:
        err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
