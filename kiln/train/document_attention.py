"""Attention over packed rows: several documents back to back in one row, none attending to another.

A packed SFT row (kiln.data.sft_packing) holds whole examples, each ending with the separator (EOS), then
separator padding. From the token ids alone, `DocumentAttention` finds where each document starts, gives
every token its position inside its own document (RoPE / learned positions restart at 0) and, as the
model's `AttentionBackend`, lets a query see only the earlier keys of its own document: exactly what each
document computes alone, so packed training equals unpacked training up to float round-off. The model
code stays as it is; this backend is handed to `Transformer.hidden_states` from outside.

On CUDA with Triton kernels the rows run as one variable-length problem through the flash kernel
(`cu_seqlens` at the document starts, no (T, T) mask); elsewhere SDPA takes a block-diagonal causal mask.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kiln.errors import KilnError
from kiln.kernels.flash_attention_common import MAX_HEAD_DIM
from kiln.kernels.runtime import use_triton
from kiln.models.layers import alibi_slopes


def document_starts(input_ids: torch.Tensor, separator_id: int) -> torch.Tensor:
    """Bool (B, T): True where a document starts (each row's first token, and after every separator)."""
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = input_ids[:, :-1] == separator_id
    return starts


class DocumentAttention:
    """The `AttentionBackend` of one packed batch of input_ids (B, T); `positions` (B, T) restart at
    each document."""

    def __init__(self, input_ids: torch.Tensor, separator_id: int, config, kernels: str = "torch") -> None:
        if config.sliding_window is not None:
            raise KilnError("packing does not support sliding-window models yet; train with padding")
        batch, length = input_ids.shape
        starts = document_starts(input_ids, separator_id)
        index = torch.arange(length, device=input_ids.device).expand(batch, length)
        first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # (B, T)
        self.positions = index - first
        self.documents = starts.cumsum(dim=1)  # (B, T) document number within the row
        self.starts = starts
        self.kernels = kernels
        self.slopes = (
            alibi_slopes(config.num_heads).to(input_ids.device) if config.position == "alibi" else None
        )
        self._mask: torch.Tensor | None = None

    def __call__(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, H, T, D), k/v (B, KVH, T, D) -> (B, H, T, D)."""
        if use_triton(self.kernels, q) and q.shape[-1] <= MAX_HEAD_DIM:
            return self._flash(q, k, v)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=self.mask(q.dtype), enable_gqa=q.shape[1] != k.shape[1]
        )

    def mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Bool (B, 1, T, T) of allowed keys (own document, causal), or with ALiBi the additive bias
        (B, H, T, T): slope * key position inside the document, which equals slope * (key - query) up
        to a per-query constant that softmax removes."""
        if self._mask is None or self._mask.dtype != (torch.bool if self.slopes is None else dtype):
            length = self.documents.shape[1]
            causal = torch.ones(length, length, dtype=torch.bool, device=self.documents.device).tril()
            allowed = (self.documents[:, :, None] == self.documents[:, None, :]) & causal  # (B, T, T)
            allowed = allowed[:, None]  # (B, 1, T, T)
            if self.slopes is None:
                self._mask = allowed
            else:
                bias = self.slopes[None, :, None, None] * self.positions[:, None, None, :].float()
                self._mask = bias.to(dtype).masked_fill(~allowed, float("-inf"))
        return self._mask

    def _flash(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from kiln.kernels.flash_attention import flash_attention

        batch, heads, length, head_dim = q.shape
        bounds = self.starts.flatten().nonzero().flatten()
        total = torch.tensor([batch * length], device=bounds.device)
        cu_seqlens = torch.cat([bounds, total]).to(torch.int32)
        packed = [x.transpose(1, 2).reshape(batch * length, x.shape[1], head_dim) for x in (q, k, v)]
        out = flash_attention(*packed, causal=True, alibi_slopes=self.slopes, cu_seqlens=cu_seqlens)
        return out.view(batch, length, heads, head_dim).transpose(1, 2)


def packed_hidden_states(
    model: nn.Module, separator_id: int, kernels: str = "torch"
) -> Callable[[torch.Tensor], torch.Tensor]:
    """input_ids (B, T) of packed rows -> the model's hidden states (B, T, hidden), each document alone."""

    def hidden_states(input_ids: torch.Tensor) -> torch.Tensor:
        documents = DocumentAttention(input_ids, separator_id, model.config, kernels)
        return model.hidden_states(input_ids, documents.positions, attention=documents)

    return hidden_states
