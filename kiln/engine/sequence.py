"""EngineRequest and Sequence: a request is one prompt with its SamplingParams; each of its n samples is a
Sequence that the scheduler runs, with its own tokens, KV blocks and progress. `sampling_batch` gathers
what the sampler needs of the sequences that sample in a step."""

from __future__ import annotations

import enum
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field

import torch

from kiln.engine.detokenizer import Detokenizer
from kiln.engine.outputs import (
    CompletionOutput,
    FinishReason,
    PositionLogprobs,
    RequestMetrics,
    RequestOutput,
)
from kiln.engine.sampler import SamplingBatch
from kiln.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not started, or preempted (its KV blocks freed; it will recompute)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(kw_only=True, slots=True, eq=False)
class Sequence:
    """One sample: prompt + output token ids, how many of them are in the KV cache, and its blocks."""

    seq_id: int
    index: int  # which of the request's n samples
    request: EngineRequest
    token_ids: list[int]  # prompt, then output
    num_prompt_tokens: int
    params: SamplingParams
    stop_token_ids: frozenset[int]  # EOS (unless ignore_eos) and params.stop_token_ids
    max_total_tokens: int  # prompt + max_tokens, capped by the context length
    generator: torch.Generator | None = None
    detokenizer: Detokenizer | None = None
    # The sample that computes the shared prompt first; this one waits for it to hit the prefix cache.
    leader: Sequence | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose keys/values are in the KV cache (the engine writes it)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of the full blocks' tokens
    num_cached_blocks: int = 0  # leading blocks of block_table registered in the prefix cache
    prompt_done: bool = False  # the whole prompt has been computed once
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float = 0.0
    num_emitted_tokens: int = 0  # output tokens already handed out in streaming deltas
    finish_emitted: bool = False  # a delta has reported the finish
    # A served adapter: its prompt-tuning virtual tokens lead token_ids (ids past the vocabulary), and the
    # prefix cache's hash chain starts from cache_salt, so no two adapters share KV blocks.
    num_virtual_tokens: int = 0
    cache_salt: bytes = b""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def has_news(self) -> bool:
        """Whether a streaming delta would carry anything: new tokens or the finish."""
        return self.num_emitted_tokens < self.num_output_tokens or (
            self.is_finished and not self.finish_emitted
        )

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Whether computing this sequence's prompt must also yield prompt logprobs (sample 0, once)."""
        return (
            self.index == 0
            and self.params.prompt_logprobs is not None
            and self.request.complete_prompt_logprobs is None
        )

    @property
    def is_blocked_on_leader(self) -> bool:
        """Whether to hold this sample back until its leader's prompt blocks are in the prefix cache."""
        leader = self.leader
        return leader is not None and not leader.prompt_done and not leader.is_finished

    def finish(self, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def completion(self, delta: bool) -> CompletionOutput:
        """This sample's output: all of it, or (delta) what was not handed out before."""
        start = self.num_emitted_tokens if delta else 0
        token_ids = self.output_token_ids[start:]
        text = self.detokenizer.text if self.detokenizer is not None else ""
        if delta:
            text = self.detokenizer.take_delta(self.is_finished) if self.detokenizer is not None else ""
            self.num_emitted_tokens = self.num_output_tokens
            self.finish_emitted = self.is_finished
        return CompletionOutput(
            index=self.index,
            text=text,
            token_ids=token_ids,
            logprobs=None if self.logprobs is None else self.logprobs[start:],
            cumulative_logprob=None if self.logprobs is None else self.cumulative_logprob,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


@dataclass(kw_only=True, slots=True, eq=False)
class EngineRequest:
    """A prompt and its SamplingParams, with the n sequences sampling it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    sequences: list[Sequence] = field(default_factory=list)
    # Filled chunk by chunk while the prompt is computed ([None] for the first token, which has no
    # context); reported once complete.
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    prompt_logprobs_emitted: bool = False
    error: str | None = None  # set when the engine failed this request (its sequences finish "error")

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.sequences)

    @property
    def complete_prompt_logprobs(self) -> list[PositionLogprobs | None] | None:
        logprobs = self.prompt_logprobs
        return logprobs if logprobs is not None and len(logprobs) == len(self.prompt_token_ids) else None

    def output(self, delta: bool = False) -> RequestOutput:
        """The request's outputs so far: cumulative, or (delta) only what is new since the last delta.

        Deltas carry each sample that has news (new tokens or its finish); prompt logprobs come once.
        """
        sequences = [seq for seq in self.sequences if seq.has_news] if delta else self.sequences
        prompt_logprobs = self.complete_prompt_logprobs
        if delta:
            prompt_logprobs = None if self.prompt_logprobs_emitted else prompt_logprobs
            self.prompt_logprobs_emitted |= prompt_logprobs is not None
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[seq.completion(delta) for seq in sequences],
            finished=self.is_finished,
            metrics=self.metrics,
            prompt_logprobs=prompt_logprobs,
            num_cached_tokens=self.num_cached_tokens,
            error=self.error,
        )


def sampling_batch(seqs: SequenceOf[Sequence]) -> SamplingBatch:
    """The sampler's per-row settings for `seqs` (one logits row each), gathered once per step."""
    params = [seq.params for seq in seqs]
    return SamplingBatch(
        temperatures=[p.temperature for p in params],
        top_ks=[p.top_k for p in params],
        top_ps=[p.top_p for p in params],
        min_ps=[p.min_p for p in params],
        generators=[seq.generator for seq in seqs],
        num_logprobs=[p.logprobs for p in params],
        repetition_penalties=[p.repetition_penalty for p in params],
        presence_penalties=[p.presence_penalty for p in params],
        frequency_penalties=[p.frequency_penalty for p in params],
        seen_token_ids=[
            sorted(set(seq.token_ids[seq.num_virtual_tokens :])) if seq.params.repetition_penalty != 1 else []
            for seq in seqs
        ],
        output_token_ids=[
            seq.output_token_ids if seq.params.presence_penalty or seq.params.frequency_penalty else []
            for seq in seqs
        ],
        banned_token_ids=[
            sorted(seq.stop_token_ids) if seq.num_output_tokens < seq.params.min_tokens else []
            for seq in seqs
        ],
    )
