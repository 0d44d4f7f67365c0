"""Prompt tuning: trained "virtual token" embeddings prepended to every sequence.

Virtual tokens get ids past the vocabulary (vocab_size + j); `VirtualTokenEmbedding` looks those up in
its own table and every other id in the model's frozen embedding. Training wraps the model so each
sequence starts with the virtual ids; serving writes them into the prompt, so the prefix cache, which
keys blocks by token ids, keeps each adapter's prompts apart by construction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kiln.errors import KilnError
from kiln.finetune.config import PromptTuningConfig
from kiln.finetune.trainable import freeze


class VirtualTokenEmbedding(nn.Embedding):
    """The model's token embedding (the same `weight`) plus `virtual` (num_virtual, hidden) rows that ids
    >= num_embeddings select."""

    def __init__(self, base: nn.Embedding, virtual: torch.Tensor) -> None:
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = None, None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False
        self.weight = base.weight
        self.virtual = nn.Parameter(virtual.to(device=base.weight.device, dtype=base.weight.dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        vocab = self.num_embeddings
        is_virtual = (ids >= vocab)[..., None]  # (..., 1)
        real = F.embedding(ids.clamp(max=vocab - 1), self.weight)
        virtual = F.embedding((ids - vocab).clamp(min=0, max=self.virtual.shape[0] - 1), self.virtual)
        return torch.where(is_virtual, virtual, real)


def initial_prompt(
    model: nn.Module, config: PromptTuningConfig, tokenizer=None, seed: int = 0
) -> torch.Tensor:
    """(num_virtual_tokens, hidden): the embeddings of init_text's tokens, cycled to length, or of random
    vocabulary tokens."""
    weight = model.embed_tokens.weight.detach()
    count = config.num_virtual_tokens
    if config.init_text:
        if tokenizer is None:
            raise KilnError("prompt tuning from init_text needs the base model's tokenizer (tokenizer.json)")
        ids = tokenizer.encode(config.init_text)
        if not ids:
            raise KilnError("prompt tuning init_text encodes to no tokens; give some text or none (random)")
        ids = (ids * (count // len(ids) + 1))[:count]
        return weight[torch.tensor(ids, device=weight.device)].clone()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, weight.shape[0], (count,), generator=generator)
    return weight[ids.to(weight.device)].clone()


class PromptTunedModel(nn.Module):
    """A kiln Transformer whose every sequence starts with the trained virtual tokens.

    `hidden_states(input_ids)` and `forward` return the rows of the real tokens only, so the training
    objective (and any caller) sees the same shapes as without the prompt.
    """

    def __init__(self, model: nn.Module, prompt: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        model.embed_tokens = VirtualTokenEmbedding(model.embed_tokens, prompt)

    @property
    def prompt(self) -> nn.Parameter:
        return self.model.embed_tokens.virtual

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.shape[0]

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.output_weight

    @property
    def layers(self) -> nn.ModuleList:
        """The base's blocks (activation checkpointing wraps them from outside)."""
        return self.model.layers

    @layers.setter
    def layers(self, value: nn.ModuleList) -> None:
        self.model.layers = value

    def moe_layers(self) -> list[nn.Module]:
        """The base's MoE layers (the trainer logs their expert loads)."""
        return self.model.moe_layers()

    def moe_aux_loss(self) -> torch.Tensor | None:
        """The base's MoE router losses of the last forward (the training objective adds them)."""
        return self.model.moe_aux_loss()

    def virtual_ids(self, batch: int, device: torch.device) -> torch.Tensor:
        first = self.config.vocab_size
        return torch.arange(first, first + self.num_virtual_tokens, device=device).expand(batch, -1)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) -> hidden states (B, T, hidden) of the real tokens, after the virtual ones."""
        ids = torch.cat([self.virtual_ids(input_ids.shape[0], input_ids.device), input_ids], dim=1)
        return self.model.hidden_states(ids)[:, self.num_virtual_tokens :]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.logits(self.hidden_states(input_ids))


def apply_prompt_tuning(
    model: nn.Module, config: PromptTuningConfig, tokenizer=None, seed: int = 0
) -> PromptTunedModel:
    """Freeze `model` and wrap it with `config.num_virtual_tokens` fresh, trainable virtual tokens."""
    prompt = initial_prompt(model, config, tokenizer, seed)
    freeze(model)
    return PromptTunedModel(model, prompt)
