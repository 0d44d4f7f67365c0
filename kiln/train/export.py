"""`kiln export`: a kiln checkpoint, saved under any parallel layout, to a Hugging Face model directory."""

from __future__ import annotations

from pathlib import Path

import torch

from kiln.config import ModelConfig
from kiln.errors import KilnError
from kiln.models.transformer import Transformer
from kiln.train.checkpoint import COMPLETE_NAME, latest_checkpoint, load_model_weights, read_trainer_state


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest complete one in a checkpoints folder or run folder."""
    path = Path(path)
    if (path / COMPLETE_NAME).is_file():
        return path
    for folder in (path, path / "checkpoints"):
        latest = latest_checkpoint(folder)
        if latest is not None:
            return latest
    raise KilnError(
        f"{path} holds no complete kiln checkpoint; pass a checkpoint folder (OUT_DIR/checkpoints/step-N), "
        "a checkpoints folder or a run's out_dir"
    )


def load_checkpoint_model(path: str | Path) -> tuple[Transformer, dict]:
    """The model of checkpoint `path`, unsharded in this one process, and the checkpoint's JSON state."""
    state = read_trainer_state(path)
    config = ModelConfig.from_dict(state["config"]["model"])
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device="cpu")  # every weight is overwritten from the checkpoint
    load_model_weights(path, model)
    return model.eval(), state


def save_with_tokenizer(model: Transformer, target: str | Path, data_dir: str | Path | None) -> Path:
    """Save `model` as an HF directory (Llama layout), with the data's tokenizer beside it if it has one."""
    from kiln.models.hf.io import save_model
    from kiln.tokenizer import Tokenizer

    tokenizer_dir = Path(data_dir) / "tokenizer" if data_dir else None
    tokenizer = None
    if tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_dir(tokenizer_dir)
    if tokenizer is not None and model.config.eos_token_id is None:
        model.config.eos_token_id = tokenizer.eos_token_id
    return save_model(model, target, tokenizer=tokenizer)


def export_checkpoint(checkpoint: str | Path, target: str | Path, data_dir: str | Path | None = None) -> Path:
    """Write checkpoint `checkpoint` (see `resolve_checkpoint`) as an HF model directory at `target`.
    The tokenizer comes from `data_dir`, by default the run's own data folder."""
    path = resolve_checkpoint(checkpoint)
    model, state = load_checkpoint_model(path)
    return save_with_tokenizer(model, target, data_dir or state["config"].get("data_dir"))
