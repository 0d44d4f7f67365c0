"""Choices: a request's samples, assembled from the engine's streaming deltas, and their logprobs in the
two shapes OpenAI uses (the legacy completions one and the chat one).

A batched completion of P prompts with n samples each has P * n choices; choice `p * n + i` is sample i
of prompt p, as OpenAI numbers them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from kiln.engine.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from kiln.server.protocol import CompletionLogprobs, TokenLogprob, TopLogprob
from kiln.server.streaming import merge_streams
from kiln.tokenizer import Tokenizer


@dataclass(kw_only=True, slots=True)
class Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, delta: CompletionOutput) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs or []
        self.finish_reason = delta.finish_reason
        self.stop_reason = delta.stop_reason


@dataclass(kw_only=True, slots=True)
class Collected:
    choices: list[Choice]
    prompt_logprobs: list[list[PositionLogprobs | None] | None]  # per prompt, when asked

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(choice.token_ids) for choice in self.choices)


async def collect(streams: list[AsyncIterator[RequestOutput]], n: int) -> Collected:
    """Run the requests of every prompt to the end and assemble their choices."""
    collected = Collected(
        choices=[Choice() for _ in range(len(streams) * n)], prompt_logprobs=[None] * len(streams)
    )
    async for prompt_index, output in merge_streams(streams):
        if output.prompt_logprobs is not None:
            collected.prompt_logprobs[prompt_index] = output.prompt_logprobs
        for completion in output.outputs:
            collected.choices[prompt_index * n + completion.index].add(completion)
    return collected


# ------------------------------------------------------------------------------------------ logprobs


def _token_text(entry_text: str | None, token_id: int, tokenizer: Tokenizer | None) -> str:
    if entry_text is not None:
        return entry_text
    return tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer is not None else ""


def completion_logprobs(
    token_ids: Sequence[int],
    positions: Sequence[PositionLogprobs | None],
    tokenizer: Tokenizer | None,
    text_offset: int = 0,
) -> CompletionLogprobs:
    """The completions API's logprobs: per token its text, logprob, offset in the text, and the top
    candidates (the chosen token among them, as vLLM reports). A None position (the first prompt token
    when echoing) has no logprob."""
    out = CompletionLogprobs()
    for token_id, position in zip(token_ids, positions, strict=True):
        chosen = position[token_id] if position is not None else None
        text = _token_text(chosen.decoded_token if chosen else None, token_id, tokenizer)
        out.tokens.append(text)
        out.text_offset.append(text_offset)
        text_offset += len(text)
        out.token_logprobs.append(chosen.logprob if chosen else None)
        out.top_logprobs.append(None if position is None else _top_by_text(position, tokenizer))
    return out


def _top_by_text(position: PositionLogprobs, tokenizer: Tokenizer | None) -> dict[str, float]:
    """{token text: logprob}, most likely first. Tokens can share a text (byte fragments all decode to
    U+FFFD); the likeliest of them keeps the key."""
    top: dict[str, float] = {}
    for token_id, entry in sorted(position.items(), key=lambda item: -item[1].logprob):
        top.setdefault(_token_text(entry.decoded_token, token_id, tokenizer), entry.logprob)
    return top


def chat_logprobs(
    token_ids: Sequence[int], positions: Sequence[PositionLogprobs], num_top: int, tokenizer: Tokenizer | None
) -> list[TokenLogprob]:
    """The chat API's logprobs: per token its text, bytes, logprob and the `num_top` most likely tokens."""
    out = []
    for token_id, position in zip(token_ids, positions, strict=True):
        chosen = position[token_id]
        text = _token_text(chosen.decoded_token, token_id, tokenizer)
        top = sorted(
            ((tid, entry) for tid, entry in position.items() if entry.rank <= num_top),
            key=lambda item: item[1].rank,
        )
        out.append(
            TokenLogprob(
                token=text,
                logprob=chosen.logprob,
                bytes=list(text.encode()),
                top_logprobs=[
                    TopLogprob(
                        token=(top_text := _token_text(entry.decoded_token, tid, tokenizer)),
                        logprob=entry.logprob,
                        bytes=list(top_text.encode()),
                    )
                    for tid, entry in top[:num_top]
                ],
            )
        )
    return out
