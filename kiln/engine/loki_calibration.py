"""`kiln calibrate-loki DIR --data FILES`: the per-layer PCA bases of the post-RoPE keys that Loki scores in
(kiln/engine/loki.py), from a model's keys over calibration tokens, saved as DIR/loki/pca.safetensors.

The basis of each (layer, KV head) is the eigenbasis of the keys' covariance (PCA, centred), eigenvalues
descending. Centred, because Loki only ranks keys: the mean key adds the same q . mean to every key's score,
so the directions worth keeping are those in which keys differ from each other (an uncentred basis spends
a direction on the mean). On the demo model both gave the same perplexity (+10.2% over 64 x 256 tokens,
BENCHMARKS.md), within 0.2 points of exact top-k selection.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
import typer

from kiln.engine.loki import LOKI_FILE, save_loki_basis
from kiln.errors import KilnError
from kiln.models.transformer import Transformer


class KeyMoments:
    """An attention backend that sums each layer's keys and their outer products, then attends causally."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        self.moments = torch.zeros(num_layers, num_kv_heads, head_dim, head_dim, dtype=torch.float64)
        self.sums = torch.zeros(num_layers, num_kv_heads, head_dim, dtype=torch.float64)
        self.num_keys = 0

    def __call__(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys = k.double()  # (B, KVH, T, D)
        self.moments[layer_index] += torch.einsum("bktd,bkte->kde", keys, keys).cpu()
        self.sums[layer_index] += keys.sum((0, 2)).cpu()
        if layer_index == 0:
            self.num_keys += k.shape[0] * k.shape[2]
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])

    def basis(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, KVH, D, D) orthonormal bases (column j = direction j), (L, KVH, D) eigenvalues descending."""
        count = max(self.num_keys, 1)
        mean = self.sums / count  # (L, KVH, D)
        covariance = self.moments / count - mean[..., :, None] * mean[..., None, :]
        eigenvalues, vectors = torch.linalg.eigh(covariance)
        return vectors.flip(-1).float(), eigenvalues.flip(-1).float()


def token_windows(files: Sequence[str | Path], seq_len: int, num_tokens: int) -> Iterator[torch.Tensor]:
    """(1, seq_len) windows of token ids read in order from .npy token shards, up to `num_tokens` in all."""
    remaining = num_tokens
    for file in files:
        tokens = np.load(file, mmap_mode="r")
        for start in range(0, len(tokens) - seq_len + 1, seq_len):
            if remaining < seq_len:
                return
            yield torch.from_numpy(np.asarray(tokens[start : start + seq_len], dtype=np.int64))[None]
            remaining -= seq_len


@torch.no_grad()
def calibrate(
    model: Transformer, files: Sequence[str | Path], seq_len: int, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Loki bases and eigenvalues of `model`'s post-RoPE keys over the tokens of `files`."""
    config = model.config
    moments = KeyMoments(config.num_layers, config.num_kv_heads, config.head_dim)
    device = model.embed_tokens.weight.device
    positions = torch.arange(seq_len, device=device)[None]
    for window in token_windows(files, seq_len, num_tokens):
        model.hidden_states(window.to(device), positions, attention=moments)
    if moments.num_keys == 0:
        raise KilnError(f"no {seq_len}-token window in {', '.join(map(str, files))}; pass more tokens")
    return moments.basis()


def calibrate_loki_command(
    model_dir: Annotated[
        Path, typer.Argument(help="HF model directory; loki/pca.safetensors is written into it.")
    ],
    data: Annotated[list[Path], typer.Option(help="Token shards (.npy, kiln data prepare) to calibrate on.")],
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 256,
    num_tokens: Annotated[int, typer.Option(help="Calibration tokens in all.")] = 131072,
    output: Annotated[
        Path | None, typer.Option(help="Where to write (default DIR/loki/pca.safetensors).")
    ] = None,
) -> None:
    """Compute Loki's per-layer PCA bases of the post-RoPE keys (then serve with --loki-top-k)."""
    from kiln.models.hf.io import load_model

    missing = [str(file) for file in data if not file.is_file()]
    if missing:
        raise KilnError(
            f"no such token file(s): {', '.join(missing)}; pass .npy shards from `kiln data prepare`"
        )
    model = load_model(model_dir, dtype="float32", device="cpu").eval()
    seq_len = min(seq_len, model.config.max_position_embeddings)
    basis, eigenvalues = calibrate(model, data, seq_len, num_tokens)
    target = output or model_dir / LOKI_FILE
    save_loki_basis(target, basis, eigenvalues)
    quarter = max(1, model.config.head_dim // 4)
    explained = (eigenvalues[..., :quarter].sum(-1) / eigenvalues.sum(-1)).mean()
    typer.echo(
        f"wrote {target}: {basis.shape[0]} layers; the top quarter of dimensions explains {explained:.1%} "
        "of the keys' variance"
    )
