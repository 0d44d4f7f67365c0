"""`kiln data ...`: the data pipeline's verbs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

data_app = typer.Typer(help="Prepare training data: filter, dedup, tokenize, shard.", no_args_is_help=True)


@data_app.command("prepare")
def prepare_command(
    inputs: Annotated[list[str], typer.Argument(help="Text files, folders, globs, JSONL or Parquet files.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for shards and manifest.json.")],
    text_field: Annotated[str, typer.Option(help="JSONL field / Parquet column with the text.")] = "text",
    tokenizer: Annotated[
        Path | None, typer.Option(help="Folder with tokenizer.json; default: train a byte-level BPE.")
    ] = None,
    vocab_size: Annotated[
        int, typer.Option(help="Vocabulary of the BPE trained when no tokenizer is given.")
    ] = 32768,
    val_fraction: Annotated[
        float, typer.Option(help="Fraction of documents held out for validation.")
    ] = 0.01,
    shard_size_tokens: Annotated[int, typer.Option(help="Tokens per shard (whole documents).")] = 50_000_000,
    min_words: Annotated[int, typer.Option(help="Drop documents with fewer words.")] = 50,
    max_line_chars: Annotated[int, typer.Option(help="Drop documents with a longer line.")] = 5000,
    max_symbol_ratio: Annotated[
        float, typer.Option(help="Drop documents with more non-alphanumerics.")
    ] = 0.3,
    max_repeated_line_ratio: Annotated[
        float, typer.Option(help="Drop documents with more repeated lines.")
    ] = 0.3,
    no_filters: Annotated[
        bool, typer.Option("--no-filters", help="Keep every document (skip quality filters).")
    ] = False,
    exact_dedup: Annotated[bool, typer.Option(help="Drop exact duplicate documents.")] = True,
    near_dedup: Annotated[bool, typer.Option(help="Drop near duplicates (MinHash-LSH).")] = True,
    jaccard_threshold: Annotated[
        float, typer.Option(help="Near-duplicate Jaccard threshold (5-word shingles).")
    ] = 0.8,
    overwrite: Annotated[bool, typer.Option(help="Replace the output of a different earlier run.")] = False,
    format_: Annotated[
        str,
        typer.Option(
            "--format",
            help="text (pretraining documents) or chat (SFT JSONL: 'messages', or 'prompt'/'completion'; "
            "needs --tokenizer; the loss mask is stored beside the shards).",
        ),
    ] = "text",
) -> None:
    """Turn raw text into token shards. Rerun the same command to resume an interrupted run."""
    if format_ == "chat":
        return _prepare_chat(inputs, output, tokenizer, val_fraction)
    if format_ != "text":
        from kiln.errors import KilnError

        raise KilnError(f"--format must be text or chat, got {format_!r}")
    from kiln.data.dedup import DedupConfig
    from kiln.data.filters import FilterConfig
    from kiln.data.prepare import PrepareConfig, prepare
    from kiln.data.report import summary_table

    filters = FilterConfig(
        min_words=min_words,
        max_line_chars=max_line_chars,
        max_symbol_ratio=max_symbol_ratio,
        max_repeated_line_ratio=max_repeated_line_ratio,
    )
    if no_filters:
        filters = FilterConfig(
            min_words=None, max_line_chars=None, max_symbol_ratio=None, max_repeated_line_ratio=None
        )
    config = PrepareConfig(
        inputs=inputs,
        output_dir=str(output),
        text_field=text_field,
        tokenizer=str(tokenizer) if tokenizer else None,
        vocab_size=vocab_size,
        filters=filters,
        dedup=DedupConfig(exact=exact_dedup, near=near_dedup, jaccard_threshold=jaccard_threshold),
        val_fraction=val_fraction,
        shard_size_tokens=shard_size_tokens,
        overwrite=overwrite,
    )
    manifest = prepare(config)
    Console().print(summary_table(manifest))


def _prepare_chat(inputs: list[str], output: Path, tokenizer: Path | None, val_fraction: float) -> None:
    from kiln.data.sft import prepare_sft
    from kiln.errors import KilnError

    if tokenizer is None:
        raise KilnError("--format chat needs --tokenizer: the base model's folder (its chat template)")
    manifest = prepare_sft(inputs, output, tokenizer, val_fraction)
    for split, values in manifest["splits"].items():
        Console().print(
            f"{split}: {values['num_documents']:,} examples, {values['num_tokens']:,} tokens "
            f"({values['num_target_tokens']:,} trained on)"
        )
