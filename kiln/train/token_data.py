"""The token data of a run: the train and validation TokenLoaders over config.data_dir, prepared first
(by one process) when the folder has no manifest yet."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from kiln.errors import KilnError
from kiln.train.config import TrainConfig
from kiln.train.distributed import Distributed


def open_token_data(config: TrainConfig, distributed: Distributed, console: Console):
    """(train loader, validation loader or None), each taking this rank's rows of every global batch."""
    from kiln.data.loader import TokenLoader
    from kiln.data.shards import MANIFEST_NAME

    if not (Path(config.data_dir) / MANIFEST_NAME).is_file():
        if config.prepare is None:
            raise KilnError(
                f"{config.data_dir} has no {MANIFEST_NAME}; run `kiln data prepare` first or pass --data"
            )
        from kiln.data.prepare import prepare

        if distributed.is_main:  # one process prepares; the others wait for its manifest
            console.print(f"preparing data into {config.data_dir}")
            prepare(config.prepare)
        distributed.barrier()
    loader_args = dict(
        seq_len=config.seq_len,
        batch_size=config.batch_size,
        seed=config.seed,
        rank=distributed.dp_rank,
        world_size=distributed.dp_size,
    )
    train = TokenLoader(config.data_dir, "train", **loader_args)
    vocab = train.manifest["vocab_size"]
    if vocab > config.model.vocab_size:
        raise KilnError(
            f"the data's tokenizer has {vocab} tokens but the model's vocab_size is "
            f"{config.model.vocab_size}; set model.vocab_size >= {vocab}"
        )
    try:
        val = TokenLoader(config.data_dir, "val", **loader_args)
    except KilnError:
        console.print("[yellow]no usable validation split; evaluation is skipped[/]")
        val = None
    return train, val
