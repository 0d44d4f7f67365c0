"""`make demo`: the default kiln model, built once and cached, completing a Python prompt.

Until the trainer lands, the demo model has random weights (so its completion is noise) but every
other part is real: a byte-level BPE tokenizer trained on the Python standard library's source, the
`demo` preset saved as a Llama-layout HF directory, and generation through its KV cache.
"""

from __future__ import annotations

import os
import sysconfig
import time
from pathlib import Path

import torch
from rich.console import Console

from kiln.config import preset
from kiln.generation import GenerationConfig, generate
from kiln.models.hf.io import load_model, save_model
from kiln.models.transformer import Transformer
from kiln.tokenizer import Tokenizer, train_bpe

DEMO_NAME = "demo-random"


def cache_root() -> Path:
    """~/.cache/kiln, or $KILN_CACHE."""
    return Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln"))


def stdlib_sources(limit: int | None = None) -> list[Path]:
    """The Python standard library's .py files: text every machine with Python has."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    return files[:limit] if limit else files


def build_demo_model(directory: Path, console: Console) -> None:
    config = preset("demo")
    with console.status("training the demo tokenizer on the standard library"):
        tokenizer = train_bpe(stdlib_sources(limit=400), config.vocab_size, show_progress=False)
    config = config.replace(eos_token_id=tokenizer.eos_token_id, vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    model = Transformer(config)
    save_model(model, directory, tokenizer=tokenizer)
    console.print(f"built {directory} ({model.num_parameters() / 1e6:.1f}M parameters, random weights)")


def run_demo(cache_dir: Path | None, prompt: str, max_new_tokens: int, console: Console) -> str:
    directory = (cache_dir or cache_root() / "models") / DEMO_NAME
    if not (directory / "config.json").is_file():
        build_demo_model(directory, console)
    tokenizer = Tokenizer.from_dir(directory)
    model = load_model(directory, dtype="float32")
    console.print(f"[dim]model: {directory} (random weights until `kiln train` produces the demo model)[/]")
    start = time.perf_counter()
    ids = generate(
        model,
        [tokenizer.encode(prompt)],
        GenerationConfig(
            max_new_tokens=max_new_tokens,
            temperature=0.8,
            top_k=50,
            seed=0,
            stop_token_ids=tuple(tokenizer.eos_token_ids),
        ),
    )[0]
    elapsed = time.perf_counter() - start
    text = tokenizer.decode(ids)
    console.print(prompt, end="", style="bold", markup=False, highlight=False)
    console.print(text, markup=False, highlight=False)
    console.print(f"[dim]{len(ids)} tokens in {elapsed:.2f}s ({len(ids) / elapsed:.0f} tokens/s)[/]")
    return text
