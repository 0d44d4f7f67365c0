"""Loki sparse attention in the engine (Singhania et al., NeurIPS 2024; kiln/kernels/loki_attention.py).

`kiln calibrate-loki DIR --data FILES` (kiln.engine.loki_calibration) writes `loki/pca.safetensors` into the
model directory: per layer an orthonormal PCA basis (KVH, D, D) of the post-RoPE keys, columns by explained
variance. With `loki_top_k` set, the engine's backend `LokiPagedAttention` rotates each layer's new keys
and queries by that basis before they reach the pool, so the pool holds rotated keys (q . k is unchanged:
the basis is orthogonal). Prompts and prefill chunks then attend exactly (the torch backend's SDPA groups,
over the rotated keys); each decode scores its whole context on the first `loki_rank` coordinates, keeps the
top `loki_top_k` fraction of the tokens and attends exactly over those (the C++ op on CPU, the Triton kernels
on CUDA, else torch: kiln/kernels/loki_attention.py). Values are stored as they are. Over an int8/int4 KV
cache (`kv_cache_dtype`) the rotated keys and the values are quantized as they are written, and decodes read
the codes through the C++ op (in the one-call step too) or torch (not Triton).

Post-RoPE keys, because the pool holds post-RoPE keys and the score is taken after RoPE: only a basis of
that space turns the stored keys' first r coordinates into the rank-r score with no projection per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kiln.config import ModelConfig
from kiln.engine.attention import KVPool, PagedBatch, TorchPagedAttention
from kiln.errors import KilnError
from kiln.kernels.cpu_decoder_layer import PagedDecode
from kiln.kernels.loki_attention import loki_decode_attention

# In a folder of its own: kiln's loader reads every *.safetensors at the top of a model directory as weights.
LOKI_FILE = "loki/pca.safetensors"


@dataclass(kw_only=True, slots=True)
class LokiSettings:
    basis: torch.Tensor  # (num_layers, KVH, D, D): column j of [layer, head] is principal direction j
    rank: int  # leading principal coordinates the approximate scores use
    top_k: float  # fraction of the context each decode attends
    use_cpp: bool | None = None  # the C++ op for decodes; None = on CPU where it is built
    use_triton: bool = False  # the Triton kernels for decodes (CUDA, or Triton's interpreter)


def save_loki_basis(path: str | Path, basis: torch.Tensor, eigenvalues: torch.Tensor) -> None:
    """basis (L, KVH, D, D), eigenvalues (L, KVH, D) -> a safetensors file (metadata says which keys)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tensors = {"basis": basis.float().contiguous(), "eigenvalues": eigenvalues.float().contiguous()}
    save_file(tensors, str(path), metadata={"keys": "post_rope", "method": "loki-pca"})


def load_loki_settings(
    path: str | Path | None, config: ModelConfig, rank: int | None, top_k: float, dtype: torch.dtype,
    device: torch.device,
) -> LokiSettings:  # fmt: skip
    """The basis of `path` checked against the model; rank None = a quarter of head_dim."""
    if path is None or not Path(path).is_file():
        where = f" ({path} does not exist)" if path is not None else ""
        raise KilnError(
            f"Loki needs the model's key PCA basis{where}; run `kiln calibrate-loki MODEL_DIR --data "
            "TOKENS.npy` first (it writes DIR/loki/pca.safetensors), or pass loki_basis=PATH"
        )
    if config.position == "alibi":
        raise KilnError("Loki is implemented for RoPE and learned positions, not ALiBi; turn loki_top_k off")
    basis = load_file(str(path))["basis"]
    expected = (config.num_layers, config.num_kv_heads, config.head_dim, config.head_dim)
    if tuple(basis.shape) != expected:
        raise KilnError(
            f"{path} holds a Loki basis of shape {tuple(basis.shape)}, this model needs {expected}; "
            "re-run `kiln calibrate-loki` for this model"
        )
    rank = max(1, config.head_dim // 4) if rank is None else rank
    if not 1 <= rank <= config.head_dim:
        raise KilnError(f"loki_rank must be between 1 and head_dim ({config.head_dim}), got {rank}")
    return LokiSettings(basis=basis.to(device=device, dtype=dtype), rank=rank, top_k=top_k)


def rotate(rows: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """rows (N, H|KVH, D), basis (KVH, D, D) -> rows @ basis of each row's KV head, (N, H|KVH, D)."""
    num_rows, num_heads, head_dim = rows.shape
    num_kv_heads = basis.shape[0]
    # one bmm over the KV heads, (KVH, N * G, D) @ (KVH, D, D): a decode step calls this twice per layer, and
    # einsum's own planning cost ~3x the arithmetic at decode sizes
    grouped = rows.reshape(num_rows, num_kv_heads, -1, head_dim).transpose(0, 1)
    grouped = grouped.reshape(num_kv_heads, -1, head_dim)
    rotated = torch.bmm(grouped, basis).view(num_kv_heads, num_rows, -1, head_dim)
    return rotated.transpose(0, 1).reshape(num_rows, num_heads, head_dim)


class LokiPagedAttention:
    """Paged attention over rotated keys: exact for prefill chunks, Loki for decodes (module docstring)."""

    def __init__(self, pool: KVPool, batch: PagedBatch, config: ModelConfig, settings: LokiSettings) -> None:
        self.pool, self.settings = pool, settings
        self.slot_mapping = batch.slot_mapping
        self.window = config.sliding_window
        self.scale = config.head_dim**-0.5
        device = batch.slot_mapping.device
        decodes = [i for i, n in enumerate(batch.query_lens) if n == 1]
        several = [i for i, n in enumerate(batch.query_lens) if n > 1]
        self.torch_backend = None
        if several:
            pick = lambda values: [values[i] for i in several]  # noqa: E731
            sub_batch = PagedBatch(
                slot_mapping=batch.slot_mapping, query_starts=pick(batch.query_starts),
                query_lens=pick(batch.query_lens), context_lens=pick(batch.context_lens),
                block_tables=pick(batch.block_tables),
            )  # fmt: skip
            self.torch_backend = TorchPagedAttention(pool, sub_batch, config)
        self.decode_rows = torch.tensor(
            [batch.query_starts[i] for i in decodes], dtype=torch.long, device=device
        )
        self.context_lens = torch.tensor(
            [batch.context_lens[i] for i in decodes], dtype=torch.int32, device=device
        )
        width = max((len(batch.block_tables[i]) for i in decodes), default=1)
        tables = [batch.block_tables[i] + [0] * (width - len(batch.block_tables[i])) for i in decodes]
        self.block_tables = torch.tensor(tables, dtype=torch.int32, device=device).reshape(
            len(decodes), width
        )
        self.max_context = max((batch.context_lens[i] for i in decodes), default=1)
        self.counts = None  # the Triton kernels' kept keys per decode, the same in every layer of the step
        if decodes and settings.use_triton:
            from kiln.kernels.loki_attention_triton import loki_counts

            self.counts = loki_counts(self.context_lens, settings.top_k, self.window)
        # A step of decodes only, on the C++ op, can run every layer in one kiln::decoder_layers call
        # (kiln/engine/cpu_decoder.py): it rotates, writes and attends as __call__ does, layer by layer.
        self.decode_step = None
        if decodes and not several and settings.use_cpp:
            self.decode_step = PagedDecode(
                slot_mapping=self.slot_mapping, block_tables=self.block_tables,
                query_starts=torch.arange(len(decodes), dtype=torch.int32), query_lens=torch.ones(
                    len(decodes), dtype=torch.int32), context_lens=self.context_lens,
                block_size=pool.block_size, scale=self.scale, sliding_window=self.window,
                loki_basis=settings.basis, loki_rank=settings.rank, loki_top_k=settings.top_k,
            )  # fmt: skip

    def __call__(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, H, N, D), k/v (1, KVH, N, D) for the N new tokens -> attention output (1, H, N, D)."""
        basis = self.settings.basis[layer_index]  # (KVH, D, D)
        q_rows = rotate(q[0].transpose(0, 1), basis)  # (N, H, D)
        k_rows = rotate(k[0].transpose(0, 1), basis)  # (N, KVH, D)
        v_rows = v[0].transpose(0, 1)
        pool = self.pool
        keys, values = pool.keys[layer_index], pool.values[layer_index]  # (slots, KVH, D or int4's D / 2)
        quantized = {}
        if pool.bits:  # int8/int4 codes, their scales and zero points beside them
            pool.write(layer_index, self.slot_mapping, k_rows, v_rows)
            params = dict(
                key_params=pool.key_params[layer_index], value_params=pool.value_params[layer_index]
            )
            quantized = dict(bits=pool.bits, **params)
        else:
            keys.index_copy_(0, self.slot_mapping, k_rows)
            values.index_copy_(0, self.slot_mapping, v_rows)
        out = torch.empty_like(q_rows)
        if self.torch_backend is not None:
            self.torch_backend.attend(layer_index, q_rows, k_rows, v_rows, out)
        if self.decode_rows.numel():
            result = loki_decode_attention(
                q_rows.index_select(0, self.decode_rows), keys, values, self.block_tables, self.context_lens,
                self.pool.block_size, self.settings.rank, self.settings.top_k, self.scale, self.window,
                self.settings.use_cpp, self.settings.use_triton, self.max_context, self.counts, **quantized,
            )  # fmt: skip  # (M, H, D)
            out.index_copy_(0, self.decode_rows, result)
        return out.transpose(0, 1)[None]


def loki_backend(settings: LokiSettings) -> Callable[[KVPool, PagedBatch, ModelConfig], LokiPagedAttention]:
    """The engine's backend builder (`ModelRunner(attention=...)`) for `settings`."""

    def build(pool: KVPool, batch: PagedBatch, config: ModelConfig) -> LokiPagedAttention:
        return LokiPagedAttention(pool, batch, config, settings)

    build.__name__ = f"LokiPagedAttention(rank={settings.rank}, top_k={settings.top_k:g})"
    return build


class LokiSequenceAttention:
    """A model attention backend (`Transformer.hidden_states(..., attention=...)`) that runs Loki on every
    query of whole causal sequences: query t keeps ceil(top_k * (t + 1)) keys, as a decode at that position
    would. Perplexity evaluation and the engine's consistency test run it."""

    def __init__(self, settings: LokiSettings) -> None:
        self.settings = settings

    def __call__(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, H, T, D), k/v (B, KVH, T, D) -> (B, H, T, D)."""
        from kiln.kernels.loki_attention import loki_attention_reference

        basis = self.settings.basis[layer_index]  # (KVH, D, D)
        group = q.shape[1] // k.shape[1]
        q_rotated = q @ basis.repeat_interleave(group, 0)  # (B, H, T, D) @ (H, D, D)
        k_rotated = k @ basis
        return loki_attention_reference(q_rotated, k_rotated, v, self.settings.rank, self.settings.top_k)
