"""The default kiln model: a small Llama-layout model trained on the Python standard library's source.

Every machine with Python has this text, so `make demo` needs no download. Point `inputs` at your own
text to train the same model on it.
"""

from __future__ import annotations

import dataclasses
import sysconfig
from pathlib import Path

from kiln.config import ModelConfig
from kiln.data.filters import FilterConfig
from kiln.data.prepare import PrepareConfig
from kiln.paths import cache_root
from kiln.train.config import TrainConfig


def stdlib_sources() -> list[str]:
    """Globs for every .py file of the standard library, leaving out installed third-party packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name not in skip and any(p.rglob("*.py")))
    return [str(root / "*.py"), *(str(folder / "**" / "*.py") for folder in folders)]


def code_filters() -> FilterConfig:
    # Source code is symbol-dense (operators, brackets, underscores) and short files are fine, so the
    # prose-oriented symbol-ratio, length and repeated-line rules are relaxed (code repeats lines such as
    # `else:` and `return None` far more than prose does).
    return FilterConfig(min_words=20, max_symbol_ratio=None, max_repeated_line_ratio=0.5)


def demo(
    inputs: list[str] | None = None, data_dir: str | None = None, out_dir: str | None = None
) -> TrainConfig:
    """~3M parameters (d=192, 4 layers, GQA 6:2, vocab 8192, tied), 256-token context, about 10 minutes on
    2 CPU cores. Data defaults to the standard library's .py files, prepared once into the cache."""
    own_data = inputs is not None
    data = data_dir or str(cache_root() / "data" / ("custom" if own_data else "stdlib-bpe8k"))
    prepare = PrepareConfig(
        inputs=inputs or stdlib_sources(),
        output_dir=data,
        vocab_size=8192,
        filters=code_filters(),
        val_fraction=0.02,
        shard_size_tokens=5_000_000,
    )
    model = ModelConfig(
        vocab_size=8192,
        hidden_size=192,
        num_layers=4,
        num_heads=6,
        num_kv_heads=2,
        intermediate_size=512,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    return TrainConfig(
        model=model,
        data_dir=data,
        prepare=prepare,
        out_dir=out_dir or str(cache_root() / "runs" / "demo"),
        seq_len=256,
        batch_size=16,
        max_steps=800,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=50,
        weight_decay=0.1,
        precision="auto",
        eval_every=200,
        eval_batches=16,
        log_every=10,
        checkpoint_every=200,
        max_minutes=10.0,
    )


def tiny(
    inputs: list[str] | None = None, data_dir: str | None = None, out_dir: str | None = None
) -> TrainConfig:
    """A seconds-long run of a ~0.6M-parameter model on the same data, for smoke tests."""
    config = demo(inputs=inputs, data_dir=data_dir, out_dir=out_dir or str(cache_root() / "runs" / "tiny"))
    model = config.model.replace(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=192
    )
    return dataclasses.replace(
        config,
        model=model,
        max_steps=30,
        seq_len=64,
        batch_size=8,
        eval_every=10,
        eval_batches=2,
        checkpoint_every=10,
        warmup_steps=5,
        log_every=5,
        max_minutes=None,
    )
