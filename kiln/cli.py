"""`kiln <verb>`: each verb is a thin call into its module. `kiln <verb> --help` is the reference."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kiln.batch.cli import batch_app
from kiln.bench.cli import bench_app
from kiln.data.cli import data_app
from kiln.engine.cli import chat_command, generate_command
from kiln.engine.loki_calibration import calibrate_loki_command
from kiln.engine.options import Dtype
from kiln.errors import KilnError
from kiln.server.cli import serve_command
from kiln.train.cli import export_command, plan_command, plot_command, train_command
from kiln.train.finetune_cli import finetune_command

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
app.add_typer(batch_app, name="batch")
app.command("train")(train_command)
app.command("plot")(plot_command)
app.command("plan")(plan_command)
app.command("export")(export_command)
app.command("finetune")(finetune_command)
app.command("generate")(generate_command)
app.command("chat")(chat_command)
app.command("serve")(serve_command)
app.command("calibrate-loki")(calibrate_loki_command)

console = Console()
err_console = Console(stderr=True)


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
def quantize(
    model: Annotated[Path, typer.Argument(help="HF model directory to quantize.")],
    output: Annotated[Path, typer.Argument(help="Directory to write (compressed-tensors layout).")],
    scheme: Annotated[
        str, typer.Option(help="int8 (weight-only, per channel), int4 (groups) or w8a8.")
    ] = "int4",
    group_size: Annotated[int, typer.Option(help="int4: input features per scale (32, 64 or 128).")] = 128,
    zero_point: Annotated[
        bool, typer.Option(help="int4: store a zero point per group (asymmetric).")
    ] = False,
    calibration: Annotated[
        list[Path] | None,
        typer.Option(
            help="Text files to calibrate on: int4 runs GPTQ on them (without them, round to nearest); "
            "w8a8 measures its activations for --smooth-alpha."
        ),
    ] = None,
    calibration_tokens: Annotated[int, typer.Option(help="Tokens of the calibration text to use.")] = 2048,
    smooth_alpha: Annotated[
        float | None,
        typer.Option(
            help="w8a8: SmoothQuant with this migration strength in (0, 1] (0.5 is the paper's default): "
            "divides outlier activation channels by per-channel powers of two folded into the norms "
            "before them and multiplies them into the weights. Needs --calibration."
        ),
    ] = None,
) -> None:
    """Quantize a model's Linear weights into a directory vLLM, transformers and kiln read."""
    from kiln.models.hf.quantize import quantize_dir
    from kiln.quant import parse_scheme

    parsed = parse_scheme(scheme, group_size if scheme == "int4" else None, symmetric=not zero_point)
    count, before, after = quantize_dir(model, output, parsed, calibration, calibration_tokens, smooth_alpha)
    method = " (GPTQ)" if calibration and parsed.name == "int4" else ""
    method += f" (SmoothQuant, alpha {smooth_alpha:g})" if smooth_alpha is not None else ""
    console.print(
        f"quantized {count} linears to {parsed.describe()}{method}: weights {before / 2**20:.1f}MiB -> "
        f"{after / 2**20:.1f}MiB; wrote {output}"
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
    from kiln.tokenizer_training import train_bpe

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
    prompt: Annotated[str, typer.Option(help="Python code to complete.")] = "def fibonacci(n):\n    ",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 48,
    serve: Annotated[
        bool, typer.Option(help="Then serve the model (OpenAI API + web UI) until Ctrl-C.")
    ] = True,
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8000,
) -> None:
    """Train the default model once (about 10 minutes on 2 CPU cores, then cached), complete a prompt with
    it, and serve it at http://127.0.0.1:8000/v1 with a web UI at http://127.0.0.1:8000/."""
    from kiln.demo import run_demo

    run_demo(
        recipe=recipe,
        cache_dir=cache_dir,
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        console=console,
        serve=serve,
        port=port,
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
