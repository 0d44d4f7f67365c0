"""Reference generation: a batch of prompts decoded with the model's contiguous KV cache.

This is the simple, exact path the engine is checked against (tests/engine, `kiln bench generate`); the
serving engine, with its paged KV cache and continuous batching, lives in kiln/engine/ and is what
`kiln generate`, `kiln chat` and `kiln serve` run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kiln.errors import KilnError
from kiln.models.transformer import Transformer


@dataclass(kw_only=True, slots=True)
class GenerationConfig:
    """How to pick each next token. temperature 0 is greedy (argmax)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise KilnError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise KilnError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise KilnError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise KilnError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_next(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None):
    """logits (B, V) -> next token ids (B,)."""
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / config.temperature
    if config.top_k:
        kth = torch.topk(logits, min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token once the tokens before it already cover top_p; the first always stays.
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= config.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], device: torch.device | str = "cpu", pad_id: int = 0):
    """One left-padded batch: input ids (B, T) and attention mask (B, T), 1 on real tokens."""
    longest = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt) :] = torch.tensor(prompt, device=device)
        mask[row, longest - len(prompt) :] = 1
    return input_ids, mask


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Generate continuations for a batch of token-id prompts; returns the new token ids of each.

    Prompts are left-padded into one batch; `on_token(index, token_id)` streams tokens as they come.
    A sequence stops at any of `config.stop_token_ids` (the stop token is included in its output).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise KilnError("every prompt needs at least one token")
    vocab = model.config.vocab_size
    if any(t < 0 or t >= vocab for p in prompts for t in p):
        raise KilnError(f"prompt token ids must be in [0, {vocab}); is the tokenizer for this model?")
    device = model.embed_tokens.weight.device
    longest = max(len(p) for p in prompts)
    total = longest + config.max_new_tokens
    if model.config.position == "learned" and total > model.config.max_position_embeddings:
        raise KilnError(
            f"prompt ({longest} tokens) + max_new_tokens ({config.max_new_tokens}) exceeds this model's "
            f"{model.config.max_position_embeddings} learned positions; shorten one of them"
        )
    input_ids, mask = left_pad(prompts, device)
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    cache = model.new_kv_cache(len(prompts), total)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    stop = torch.tensor(config.stop_token_ids, dtype=torch.long, device=device)
    for _ in range(config.max_new_tokens):
        logits = model(input_ids, attention_mask=mask, kv_cache=cache)[:, -1]
        next_ids = sample_next(logits, config, generator)
        for row in (~done).nonzero().flatten().tolist():
            token = int(next_ids[row])
            outputs[row].append(token)
            if on_token is not None:
                on_token(row, token)
        done |= torch.isin(next_ids, stop)
        if bool(done.all()):
            break
        input_ids = next_ids[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return outputs
