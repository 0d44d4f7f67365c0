"""What the engine hands back: per-request outputs (cumulative or as streaming deltas) and timings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# "error": the engine failed this request alone (RequestOutput.error says why) and kept serving the others.
FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(kw_only=True, slots=True, frozen=True)
class Logprob:
    """One candidate token at one position: its logprob, rank (1 = most likely) and text."""

    logprob: float
    rank: int
    decoded_token: str | None = None  # None when the engine runs without a tokenizer


# token id -> Logprob, for the chosen token and the top-N candidates at one position.
PositionLogprobs = dict[int, Logprob]


@dataclass(kw_only=True, slots=True)
class RequestMetrics:
    """Wall-clock times (time.monotonic seconds) of a request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass(kw_only=True, slots=True)
class CompletionOutput:
    """One sample of a request. In a streaming delta, text/token_ids/logprobs hold only what is new."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None  # sum of the chosen tokens' logprobs, when logprobs were asked
    finish_reason: FinishReason | None = None  # None while the sample is still generating
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it (None for EOS)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(kw_only=True, slots=True)
class RequestOutput:
    """A request's prompt and its samples; `finished` once every sample is."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # first prompt token: None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None  # with finish_reason "error": what failed, in words a client can act on
    error_from_input: bool = (
        False  # the request's own input caused the error (a server answers 400, else 500)
    )
