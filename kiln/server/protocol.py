"""OpenAI API schemas (pydantic): requests as clients send them, responses and stream chunks as the official
clients parse them. Names and defaults follow OpenAI's API reference; the extra sampling fields (top_k,
min_p, repetition_penalty, ignore_eos, ...) follow vLLM's extensions, which clients send via `extra_body`.

Unknown request fields are ignored (clients add their own, e.g. `user` or `service_tier`); fields kiln
declares are validated strictly (no booleans as numbers, no numbers as booleans or strings, finite floats,
integers bounded to what the engine holds), every string anywhere in a body must be valid Unicode, and a
violation becomes a 400 error naming the field. /openapi.json states the same bounds.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kiln.engine.sampling_params import SamplingParams
from kiln.server.fields import (
    MAX_INT32,
    MAX_INT64,
    MAX_LOGPROBS,
    MAX_N,
    MAX_REPETITION_PENALTY,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MIN_INT64,
    MIN_REPETITION_PENALTY,
    MIN_TEMPERATURE,
    MIN_TOP_P,
    NonEmptyText,
    NonNegative,
    Penalty,
    Positive,
    PromptInput,
    TokenId,
    field_error,
    invalid_unicode_path,
    prompt_list,
)

# Values of an unsupported field that mean "not used", so clients that always send them still work.
UNUSED = (None, "", [], {}, {"type": "text"}, "none")


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIRequest(BaseModel):
    """The base of every request body (and of the objects nested in one)."""

    # strict: `max_tokens: true`, `n: 1.0` or `stream: 1` are type errors, not quietly converted.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
    # OpenAI fields kiln does not implement. Set, they get a 400 rather than a silently different answer.
    unsupported: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in cls.unsupported:
                if data.get(name) not in UNUSED:
                    raise field_error(name, "this field is not supported by kiln; leave it out")
        return data

    @model_validator(mode="before")
    @classmethod
    def _refuse_invalid_unicode(cls, data: Any) -> Any:
        path = invalid_unicode_path(data)
        if path is not None:
            raise field_error(
                path.removeprefix("."),
                "the text holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), which is not "
                "valid Unicode; send UTF-8 text or paired surrogates",
            )
        return data


class StreamOptions(OpenAIRequest):
    include_usage: bool = False


class SamplingRequest(OpenAIRequest):
    """The fields completions and chat completions share: the model, sampling and streaming."""

    model: str | None = None  # None: the served model
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None  # honoured only as n (no reranking)
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=MIN_TOP_P, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=MAX_INT32)] | None = None  # 0 or -1: off
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: (
        Annotated[float, Field(ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)] | None
    ) = None
    seed: Annotated[int, Field(ge=MIN_INT64, le=MAX_INT64)] | None = None
    stop: NonEmptyText | Annotated[list[NonEmptyText], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    ignore_eos: bool = False
    min_tokens: NonNegative = 0
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _best_of_is_n(self) -> SamplingRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise field_error(
                "best_of", "best_of other than n is not supported by kiln; omit it or set it to n"
            )
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(
        self, max_tokens: int, logprobs: int | None = None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        """SamplingParams for one prompt; `max_tokens` is already resolved against the context length."""
        temperature = 1.0 if self.temperature is None else self.temperature
        return SamplingParams(
            n=self.n,
            temperature=0.0 if temperature < MIN_TEMPERATURE else temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed,
            stop=self.stop or (),
            stop_token_ids=self.stop_token_ids or (),
            ignore_eos=self.ignore_eos,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )


# ------------------------------------------------------------------------------------------ requests


class CompletionRequest(SamplingRequest):
    unsupported = ("suffix", "logit_bias")
    prompt: PromptInput
    max_tokens: Positive | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        return prompt_list(self.prompt)


class TextPart(OpenAIRequest):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIRequest):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def template_message(self) -> dict[str, Any]:
        """The message as chat templates expect it: plain-text content; `developer` is the newer name
        OpenAI gives the system role, which templates know as `system`."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(SamplingRequest):
    unsupported = tuple(
        "tools tool_choice functions function_call logit_bias response_format audio prediction".split()
    )
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Positive | None = None  # None: up to the context length
    max_completion_tokens: Positive | None = None  # OpenAI's newer name for max_tokens; wins over it
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class EmbeddingRequest(OpenAIRequest):
    model: str | None = None
    input: PromptInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Positive | None = None
    user: str | None = None


class TokenizeRequest(OpenAIRequest):
    """vLLM's /tokenize: text (`prompt`) or a conversation (`messages`, through the chat template)."""

    # Exactly one of the two, non-null: the schema's statement of _one_input.
    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
                {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
            ]
        }
    )
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(OpenAIRequest):
    model: str | None = None
    tokens: list[TokenId]


# ----------------------------------------------------------------------------------------- responses


class Response(BaseModel):
    pass


class UsageInfo(Response):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int = 0) -> UsageInfo:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class CompletionLogprobs(Response):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop string or token that ended it (vLLM's extension)


class CompletionResponse(Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(Response):
    content: list[TokenLogprob] | None = None


class AssistantMessage(Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(Response):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(Response):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class EmbeddingData(Response):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingResponse(Response):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: UsageInfo


class ModelCard(Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kiln"
    root: str | None = None  # the model directory (an adapter's: its adapter directory)
    parent: str | None = None  # an adapter's base model
    max_model_len: int


class ModelList(Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(Response):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(Response):
    prompt: str


class ErrorInfo(Response):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(Response):
    error: ErrorInfo
