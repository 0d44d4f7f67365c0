"""SamplingParams (what a request asks for) and the Sampler (one batched pick per sequence per step).

Logits are processed in Hugging Face's order: penalties, then the min_tokens mask on stop tokens, then
temperature, top-k, top-p and min-p. Reported logprobs are those of the raw model distribution, before
any of that processing (as vLLM reports them by default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kiln.errors import KilnError

if TYPE_CHECKING:
    from kiln.engine.sequence import Sequence

# Mixes a sample's index into its request's seed, so the n samples of a seeded request differ.
_SEED_STRIDE = 0x9E3779B97F4A7C15


@dataclass(kw_only=True, slots=True)
class SamplingParams:
    """How to generate for one request. temperature 0 is greedy; 0 / 1.0 / 0.0 switch a filter off."""

    n: int = 1  # independent samples of the prompt (they share its KV blocks through the prefix cache)
    temperature: float = 1.0
    top_k: int = 0  # keep the k most likely tokens; 0 = off
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

    def __post_init__(self) -> None:
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        self.stop_token_ids = tuple(int(token) for token in self.stop_token_ids)
        if self.n < 1:
            raise KilnError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise KilnError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise KilnError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise KilnError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise KilnError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise KilnError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise KilnError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise KilnError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise KilnError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise KilnError(f"{name} must be >= 0 or None, got {getattr(self, name)}")
        if any(not stop for stop in self.stop):
            raise KilnError("stop strings must be non-empty")

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


@dataclass(kw_only=True, slots=True)
class TopLogprobs:
    """Logprobs of one position: the chosen token's, its rank (1 = most likely), and the top-N."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


@dataclass(kw_only=True, slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TopLogprobs | None]  # per row; None where the request did not ask


def top_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: SequenceOf[int]
) -> list[TopLogprobs]:
    """logprobs (R, V) fp32, chosen token_ids (R,), N per row -> each row's chosen and top-N logprobs."""
    chosen = logprobs.gather(1, token_ids[:, None])[:, 0]  # (R,)
    ranks = (logprobs > chosen[:, None]).sum(-1) + 1
    top_values, top_ids = logprobs.topk(max(num_top, default=0), dim=-1)  # (R, N)
    return [
        TopLogprobs(token_id=token, logprob=value, rank=rank, top_ids=ids[:n], top_logprobs=values[:n])
        for token, value, rank, ids, values, n in zip(
            token_ids.tolist(),
            chosen.tolist(),
            ranks.tolist(),
            top_ids.tolist(),
            top_values.tolist(),
            num_top,
            strict=True,
        )
    ]


class Sampler:
    """Picks the next token of each sequence from its logits row, honouring its SamplingParams."""

    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)  # for requests without a seed

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, seqs: SequenceOf[Sequence]) -> SamplerOutput:
        """logits (S, V), one row per sequence -> the chosen token of each and, if asked, logprobs."""
        logits = logits.float()
        wants_logprobs = [row for row, seq in enumerate(seqs) if seq.params.logprobs is not None]
        raw = logits[wants_logprobs].log_softmax(-1) if wants_logprobs else None
        if any(seq.params.has_penalties for seq in seqs):
            logits = apply_penalties(logits.clone(), seqs)
        if any(seq.num_output_tokens < seq.params.min_tokens for seq in seqs):
            logits = mask_stop_tokens(logits.clone(), seqs)
        chosen = logits.argmax(-1)  # (S,) greedy rows keep this
        sampled = [row for row, seq in enumerate(seqs) if not seq.params.is_greedy]
        if sampled:
            chosen[sampled] = self._sample(logits[sampled], [seqs[row] for row in sampled])
        logprobs: list[TopLogprobs | None] = [None] * len(seqs)
        if raw is not None:
            num_top = [seqs[row].params.logprobs for row in wants_logprobs]
            for row, entry in zip(
                wants_logprobs, top_logprobs(raw, chosen[wants_logprobs], num_top), strict=True
            ):
                logprobs[row] = entry
        return SamplerOutput(token_ids=chosen.tolist(), logprobs=logprobs)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logits (S, V) of sampling rows -> token ids (S,), drawn by the exponential race (Gumbel-max)."""
        temperature = torch.tensor([seq.params.temperature for seq in seqs], device=logits.device)
        logits = filter_logits(logits / temperature[:, None], [seq.params for seq in seqs])
        probs = logits.softmax(-1)
        # argmax(p / E) with E ~ Exp(1) draws i with probability p_i. Each seeded row draws its noise
        # from its own generator, so its choices do not depend on which rows share the batch.
        noise = torch.empty_like(probs)
        unseeded = [row for row, seq in enumerate(seqs) if seq.generator is None]
        if unseeded:
            noise[unseeded] = torch.empty_like(probs[unseeded]).exponential_(generator=self.generator)
        for row, seq in enumerate(seqs):
            if seq.generator is not None:
                noise[row].exponential_(generator=seq.generator)
        return (probs / noise).argmax(-1)


def filter_logits(logits: torch.Tensor, params: SequenceOf[SamplingParams]) -> torch.Tensor:
    """Mask (-inf) what top-k, top-p and min-p drop, each row with its own settings. logits (S, V)."""
    num_rows, vocab_size = logits.shape
    if any(p.min_p > 0 for p in params):
        # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p); no softmax needed.
        min_p = torch.tensor([p.min_p for p in params], device=logits.device)
        floor = logits.max(-1, keepdim=True).values + min_p.log()[:, None]
        logits = logits.masked_fill(logits < floor, float("-inf"))
    if not any(p.top_k or p.top_p < 1 for p in params):
        return logits
    top_k = torch.tensor([p.top_k or vocab_size for p in params], device=logits.device)
    # top_p of 1 is "off"; 2 keeps fp32 round-off in the cumulative sum from ever dropping a token.
    top_p = torch.tensor([p.top_p if p.top_p < 1 else 2.0 for p in params], device=logits.device)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    drop = torch.arange(vocab_size, device=logits.device)[None, :] >= top_k[:, None]  # (S, V)
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    # A token goes once the more likely tokens before it already reach top_p; the first always stays.
    drop |= probs.cumsum(-1) - probs >= top_p[:, None]
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def apply_penalties(logits: torch.Tensor, seqs: SequenceOf[Sequence]) -> torch.Tensor:
    """Repetition (prompt + output tokens), presence and frequency (output tokens) penalties, in place."""
    for row, seq in enumerate(seqs):
        params = seq.params
        if params.repetition_penalty != 1:
            seen = torch.tensor(sorted(set(seq.token_ids)), device=logits.device)
            values = logits[row, seen]
            penalised = torch.where(
                values > 0, values / params.repetition_penalty, values * params.repetition_penalty
            )
            logits[row, seen] = penalised
        if (params.presence_penalty or params.frequency_penalty) and seq.num_output_tokens:
            output = torch.tensor(seq.output_token_ids, device=logits.device)
            counts = torch.bincount(output, minlength=logits.shape[1]).to(logits.dtype)
            logits[row] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    return logits


def mask_stop_tokens(logits: torch.Tensor, seqs: SequenceOf[Sequence]) -> torch.Tensor:
    """Forbid the stop tokens (EOS and stop_token_ids) of sequences still short of min_tokens, in place."""
    for row, seq in enumerate(seqs):
        if seq.num_output_tokens < seq.params.min_tokens and seq.stop_token_ids:
            logits[row, sorted(seq.stop_token_ids)] = float("-inf")
    return logits
