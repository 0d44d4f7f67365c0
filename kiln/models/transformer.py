"""The single-device decoder: embeddings -> blocks -> final norm -> LM head.

Parallelism and activation checkpointing are applied from outside; this file stays plain. The `kernels`
switch only picks, layer by layer, the fused Triton kernels of kiln/kernels/ over the torch code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import ModelConfig
from kiln.kernels.runtime import KernelChoice, check_kernels
from kiln.models.kv_cache import KVCache
from kiln.models.layers import (
    MLP,
    Attention,
    AttentionBackend,
    AttentionInputs,
    RotaryEmbedding,
    alibi_slopes,
    make_norm,
)
from kiln.models.moe import MoE


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_index: int, kernels: KernelChoice = "torch") -> None:
        super().__init__()
        self.attn_norm = make_norm(config, kernels)
        self.attn = Attention(config, layer_index, kernels)
        self.mlp_norm = make_norm(config, kernels)
        self.mlp = MoE(config, kernels) if config.is_moe_layer(layer_index) else MLP(config, kernels)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, kv_cache: KVCache | None = None):
        x = x + self.attn(self.attn_norm(x), inputs, kv_cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """A decoder-only language model described by a `ModelConfig`.

    `kernels` picks the fused Triton kernels (norms, RoPE, flash attention, SwiGLU) or the plain torch
    code: "torch" (the default), "triton", or "auto" (Triton on CUDA). See `set_kernels`.
    """

    def __init__(self, config: ModelConfig, kernels: KernelChoice = "torch") -> None:
        super().__init__()
        self.config = config
        self.kernels = check_kernels(kernels)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        learned = config.position == "learned"
        self.embed_positions = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size) if learned else None
        )
        self.embed_norm = make_norm(config, kernels) if config.embedding_norm else None
        self.layers = nn.ModuleList(Block(config, i, kernels) for i in range(config.num_layers))
        self.norm = make_norm(config, kernels)
        tied = config.tie_word_embeddings
        self.lm_head = None if tied else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config) if config.position == "rope" else None
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    # ------------------------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        attention: AttentionBackend | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V).

        attention_mask (B, S) marks real (1) and padding (0) tokens over the cached plus new tokens,
        as in Hugging Face; positions (B, T) default to the count of real tokens before each one.
        `attention` replaces the built-in attention and KV cache (see `AttentionBackend`); positions
        are then required, since only the backend knows which tokens precede which.
        """
        return self.logits(self.hidden_states(input_ids, positions, attention_mask, kv_cache, attention))

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        attention: AttentionBackend | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> final-normed hidden states (B, T, hidden)."""
        if attention is not None:
            assert positions is not None and attention_mask is None and kv_cache is None
            return self._run(input_ids, positions, self._backend_inputs(positions, attention))
        batch, length = input_ids.shape
        offset = kv_cache.length if kv_cache is not None else 0
        if attention_mask is not None and attention_mask.shape != (batch, offset + length):
            raise ValueError(
                f"attention_mask must be (batch, cached + new tokens) = {(batch, offset + length)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        if positions is None:
            positions = default_positions(batch, length, offset, attention_mask, input_ids.device)
        dtype = self.embed_tokens.weight.dtype
        inputs = self._attention_inputs(positions, attention_mask, offset, dtype)
        hidden = self._run(input_ids, positions, inputs, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(length)
        return hidden

    def _run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        inputs: AttentionInputs,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return self.norm(self.run_layers(x, inputs, kv_cache))

    def run_layers(
        self, x: torch.Tensor, inputs: AttentionInputs, kv_cache: KVCache | None = None
    ) -> torch.Tensor:
        """The blocks in order. Like a block's forward, an engine may replace it on an instance from outside
        (kiln/engine/cpu_decoder.py runs a decode step's layers in one C++ call)."""
        for block in self.layers:
            x = block(x, inputs, kv_cache)
        return x

    @property
    def output_weight(self) -> torch.Tensor:
        """The LM head's (vocab, hidden) weight: the token embedding when they are tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None and type(self.lm_head) is not nn.Linear:
            return self.lm_head(hidden)  # a replaced head (kiln.quant's QuantizedLinear) runs its own kernel
        return F.linear(hidden, self.output_weight)

    def _backend_inputs(self, positions: torch.Tensor, attention: AttentionBackend) -> AttentionInputs:
        cos = sin = None
        if self.rotary is not None:
            cos, sin = self.rotary(positions, self.embed_tokens.weight.dtype)
        return AttentionInputs(mask=None, is_causal=False, cos=cos, sin=sin, backend=attention)

    def _attention_inputs(
        self, positions: torch.Tensor, attention_mask: torch.Tensor | None, offset: int, dtype: torch.dtype
    ) -> AttentionInputs:
        config = self.config
        cos = sin = None
        if self.rotary is not None:
            cos, sin = self.rotary(positions, dtype)
        length = positions.shape[1]
        total = offset + length
        window = config.sliding_window if config.sliding_window and config.sliding_window < total else None
        if attention_mask is None and window is None and config.position != "alibi":
            if offset == 0:  # plain causal self-attention over the prompt
                return AttentionInputs(mask=None, is_causal=length > 1, cos=cos, sin=sin)
            if length == 1:  # one new token sees every cached token
                return AttentionInputs(mask=None, is_causal=False, cos=cos, sin=sin)
        allowed = attention_allowed(length, offset, attention_mask, window, positions.device)
        if config.position != "alibi":
            return AttentionInputs(mask=allowed, is_causal=False, cos=cos, sin=sin)
        # ALiBi as in BLOOM: slope * key position, shifted per row, which softmax makes equal to
        # -slope * distance. Key positions count real tokens, so left padding does not shift them.
        batch = positions.shape[0]
        if attention_mask is None:
            key_positions = torch.arange(total, device=positions.device).expand(batch, total)
        else:
            key_positions = (attention_mask.cumsum(-1) - 1) * attention_mask
        slopes = alibi_slopes(config.num_heads).to(positions.device)
        bias = slopes[None, :, None, None] * key_positions[:, None, None, :].float()  # (B, H, 1, S)
        bias = bias.to(dtype).masked_fill(~allowed, float("-inf"))  # (B, H, T, S)
        plain_causal = attention_mask is None and window is None and offset == 0
        return AttentionInputs(mask=bias, is_causal=False, alibi_slopes=slopes if plain_causal else None)

    # ------------------------------------------------------------------------------------- set-up

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) weights, zero biases, unit norms; residual output projections
        scaled by 1/sqrt(2 * num_layers) (GPT-2) so the residual stream's variance stays flat."""
        std = self.config.initializer_range
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = (
                    1 / math.sqrt(2 * self.config.num_layers) if name.endswith(("o_proj", "down_proj")) else 1
                )
                nn.init.normal_(module.weight, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif hasattr(module, "reset_parameters") and module is not self:
                module.reset_parameters()

    def set_kernels(self, kernels: KernelChoice) -> None:
        """Switch every layer between the Triton kernels and torch ("triton" | "torch" | "auto")."""
        self.kernels = check_kernels(kernels)
        for module in self.modules():
            if hasattr(module, "kernels"):
                module.kernels = kernels

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def moe_layers(self) -> list[MoE]:
        return [module for module in self.modules() if isinstance(module, MoE)]

    def moe_aux_loss(self) -> torch.Tensor | None:
        """The weighted router losses (load balancing, z-loss) of the last training forward, averaged over
        MoE layers (the scale of Mixtral's one loss over all layers); None for a dense model. The trainer
        adds it to the language-model loss."""
        losses = [layer.aux_loss for layer in self.moe_layers() if layer.aux_loss is not None]
        return torch.stack(losses).mean() if losses else None

    def new_kv_cache(self, batch_size: int, max_length: int) -> KVCache:
        weight = self.embed_tokens.weight
        return KVCache(self.config, batch_size, max_length, dtype=weight.dtype, device=weight.device)


def default_positions(
    batch: int, length: int, offset: int, attention_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """(B, T) positions: the number of real tokens before each token (left padding does not count)."""
    if attention_mask is None:
        return torch.arange(offset, offset + length, device=device).expand(batch, length)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, offset:]


def attention_allowed(
    length: int, offset: int, attention_mask: torch.Tensor | None, window: int | None, device: torch.device
) -> torch.Tensor:
    """Bool (B|1, 1, T, S) of keys each query may attend: causal, inside the sliding window, not padding.

    Each query may always attend to itself, so a padding query never has an all-masked row (NaN).
    """
    total = offset + length
    query_index = torch.arange(offset, total, device=device)[:, None]  # (T, 1)
    key_index = torch.arange(total, device=device)[None, :]  # (1, S)
    allowed = key_index <= query_index
    if window is not None:
        allowed = allowed & (query_index - key_index < window)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
        allowed = allowed | (key_index == query_index)[None, None]
    return allowed
