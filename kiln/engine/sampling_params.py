"""SamplingParams: what one request asks of generation (the tensor-level work is kiln.engine.sampler)."""

from __future__ import annotations

import math
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass

import torch

from kiln.errors import KilnError

# Temperatures below this sample as greedy: dividing logits by less overflows to inf and NaN (vLLM's rule).
MIN_TEMPERATURE = 1e-5

# Mixes a sample's index into its request's seed, so the n samples of a seeded request differ.
_SEED_STRIDE = 0x9E3779B97F4A7C15


@dataclass(kw_only=True, slots=True)
class SamplingParams:
    """How to generate for one request. temperature 0 is greedy; 0 / 1.0 / 0.0 switch a filter off."""

    n: int = 1  # independent samples of the prompt (they share its KV blocks through the prefix cache)
    temperature: float = 1.0
    top_k: int = 0  # keep the k most likely tokens; 0 (or -1, as vLLM spells it) = off
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p; 1 = off
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one; 0 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and output (CTRL / HF rule)
    presence_penalty: float = 0.0  # subtracted once from every token already in the output (OpenAI)
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output (OpenAI)
    seed: int | None = None  # per-request generator: the same output whatever else is in the batch
    stop: str | SequenceOf[str] = ()  # stop strings; the text ends before them
    stop_token_ids: SequenceOf[int] = ()  # further stop tokens besides EOS; kept in token_ids
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None = until the context length is reached
    min_tokens: int = 0  # no EOS, stop token or stop string before this many tokens
    logprobs: int | None = None  # top-N logprobs (plus the chosen token's) per generated token
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    skip_special_tokens: bool = True
    adapter: str | None = None  # a served adapter's name (LLM(adapters=...), serve --adapter); None = base

    def __post_init__(self) -> None:
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        self.stop_token_ids = tuple(int(token) for token in self.stop_token_ids)
        if self.n < 1:
            raise KilnError(f"n must be >= 1, got {self.n}", param="n")
        floats = (
            "temperature",
            "top_p",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
        )
        for name in floats:
            if not math.isfinite(getattr(self, name)):
                raise KilnError(f"{name} must be a finite number, got {getattr(self, name)}", param=name)
        if self.temperature < 0:
            raise KilnError(
                f"temperature must be >= 0 (0 = greedy), got {self.temperature}", param="temperature"
            )
        if self.temperature < MIN_TEMPERATURE:
            self.temperature = 0.0
        if self.top_k == -1:
            self.top_k = 0
        if self.top_k < 0:
            raise KilnError(f"top_k must be >= 0 (0 or -1 = off), got {self.top_k}", param="top_k")
        if not 0 < self.top_p <= 1:
            raise KilnError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if not 0 <= self.min_p <= 1:
            raise KilnError(f"min_p must be in [0, 1], got {self.min_p}", param="min_p")
        if self.repetition_penalty <= 0:
            raise KilnError(
                f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}",
                param="repetition_penalty",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise KilnError(f"{name} must be in [-2, 2], got {getattr(self, name)}", param=name)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise KilnError(f"max_tokens must be >= 1 or None, got {self.max_tokens}", param="max_tokens")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise KilnError(
                f"min_tokens must be in [0, max_tokens], got {self.min_tokens}", param="min_tokens"
            )
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise KilnError(f"{name} must be >= 0 or None, got {getattr(self, name)}", param=name)
        if any(not stop for stop in self.stop):
            raise KilnError("stop strings must be non-empty", param="stop")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    def sample_generator(self, index: int, device: torch.device) -> torch.Generator | None:
        """The generator of sample `index`, or None when the request has no seed."""
        if self.seed is None:
            return None
        seed = (self.seed + index * _SEED_STRIDE) % 2**63
        return torch.Generator(device=device).manual_seed(seed)
