"""POST /v1/chat/completions: a conversation rendered by the model's chat template, `n` replies, whole or
streamed as OpenAI's chunks (role first, then content, finish_reason, and usage when asked)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response

from kiln.engine.outputs import CompletionOutput, RequestOutput
from kiln.engine.sampling_params import SamplingParams
from kiln.server.choices import chat_logprobs, collect
from kiln.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    DeltaMessage,
    UsageInfo,
    random_id,
)
from kiln.server.state import ServerState, input_size
from kiln.server.streaming import (
    DONE,
    ClientDisconnected,
    EventStream,
    merge_streams,
    sse,
    sse_error,
    until_disconnected,
)


@dataclass(kw_only=True, slots=True)
class ChatJob:
    body: ChatCompletionRequest
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams

    @property
    def num_top_logprobs(self) -> int:
        return self.body.top_logprobs or 0


async def prepare(body: ChatCompletionRequest, state: ServerState) -> ChatJob:
    adapter = state.check_model(body.model)
    state.check_request_size(body.n)
    messages = [message.template_message() for message in body.messages]
    prompt_ids = await state.off_loop(
        input_size(messages),
        state.chat_token_ids,
        messages,
        body.add_generation_prompt,
        body.chat_template_kwargs,
    )
    max_tokens = state.resolve_max_tokens(len(prompt_ids), body.requested_max_tokens, param="messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = body.sampling_params(max_tokens, logprobs=logprobs)  # a KilnError here answers 400
    params.adapter = adapter
    return ChatJob(body=body, request_id=random_id("chatcmpl"), prompt_ids=prompt_ids, params=params)


async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, state: ServerState
) -> Response:
    job = await prepare(body, state)
    lease = state.admit(body.n)
    stream = state.generate(job.prompt_ids, job.params, job.request_id, stream=body.stream)
    if body.stream:
        return EventStream(chat_events(job, stream, state), on_close=lease.release)
    try:
        collected = await until_disconnected(request, collect([stream], body.n))
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        lease.release()
    tokenizer = state.engine.tokenizer
    choices = [
        ChatChoice(
            index=index,
            message=AssistantMessage(content=choice.text),
            logprobs=ChoiceLogprobs(
                content=chat_logprobs(choice.token_ids, choice.logprobs, job.num_top_logprobs, tokenizer)
            )
            if body.logprobs
            else None,
            finish_reason=choice.finish_reason,
            stop_reason=choice.stop_reason,
        )
        for index, choice in enumerate(collected.choices)
    ]
    usage = UsageInfo.of(len(job.prompt_ids), collected.num_completion_tokens)
    return ChatCompletionResponse(id=job.request_id, model=state.model_name, choices=choices, usage=usage)


async def chat_events(
    job: ChatJob, stream: AsyncIterator[RequestOutput], state: ServerState
) -> AsyncIterator[str]:
    body, created = job.body, int(time.time())

    def chunk(choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> str:
        return sse(
            ChatCompletionChunk(
                id=job.request_id, created=created, model=state.model_name, choices=choices, usage=usage
            )
        )

    num_completion_tokens = 0
    try:
        # OpenAI opens every choice with its role, before any content.
        opening = DeltaMessage(role="assistant", content="")
        yield chunk([ChatChunkChoice(index=index, delta=opening) for index in range(body.n)])
        async for _, output in merge_streams([stream]):
            choices = []
            for completion in output.outputs:
                num_completion_tokens += len(completion.token_ids)
                choice = _chunk_choice(job, completion, state)
                if choice is not None:
                    choices.append(choice)
            if choices:
                yield chunk(choices)
        if body.include_usage:
            yield chunk([], UsageInfo.of(len(job.prompt_ids), num_completion_tokens))
    except Exception as error:  # the stream has begun: report in-band
        yield sse_error(error)
    yield DONE


def _chunk_choice(job: ChatJob, completion: CompletionOutput, state: ServerState) -> ChatChunkChoice | None:
    """One choice's chunk for a delta, or None when the delta shows nothing yet (text held back)."""
    logprobs = None
    if job.body.logprobs and completion.logprobs:
        content = chat_logprobs(
            completion.token_ids, completion.logprobs, job.num_top_logprobs, state.engine.tokenizer
        )
        logprobs = ChoiceLogprobs(content=content)
    if not completion.text and logprobs is None and not completion.finished:
        return None
    return ChatChunkChoice(
        index=completion.index,
        # The finishing chunk of OpenAI's streams has an empty delta when no text came with it.
        delta=DeltaMessage(content=completion.text) if completion.text or logprobs else DeltaMessage(),
        logprobs=logprobs,
        finish_reason=completion.finish_reason,
        stop_reason=completion.stop_reason,
    )
