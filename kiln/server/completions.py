"""POST /v1/completions: text completion of one prompt or a batch (text or token ids), `n` samples each,
with echo and logprobs, whole or streamed as server-sent events."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response

from kiln.engine.outputs import PositionLogprobs, RequestOutput
from kiln.engine.sampling_params import SamplingParams
from kiln.server.choices import collect, completion_logprobs
from kiln.server.errors import APIError
from kiln.server.protocol import CompletionChoice, CompletionRequest, CompletionResponse, UsageInfo, random_id
from kiln.server.state import ServerState
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
class CompletionJob:
    """A validated request: each prompt's token ids, sampling params, and the text echo would show."""

    body: CompletionRequest
    request_id: str
    prompt_ids: list[list[int]]
    params: list[SamplingParams]
    echo_texts: list[str]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompt_ids)


async def prepare(body: CompletionRequest, state: ServerState) -> CompletionJob:
    adapter = state.check_model(body.model)
    prompts = body.prompts()
    if not prompts:
        raise APIError(400, "prompt is empty; give text, token ids, or a list of either", param="prompt")
    state.check_request_size(len(prompts) * body.n, param="n" if body.n > 1 else "prompt")
    size = sum(len(prompt) for prompt in prompts)
    prompt_ids, echo_texts = await state.off_loop(size, _tokenize, body, prompts, state)
    echo_logprobs = body.logprobs if body.echo else None
    params = [
        body.sampling_params(
            state.resolve_max_tokens(len(ids), body.max_tokens),
            logprobs=body.logprobs,
            prompt_logprobs=echo_logprobs,
        )
        for ids in prompt_ids
    ]
    for sampling in params:
        sampling.adapter = adapter
    state.check_prompt_tokens(sum(len(ids) for ids in prompt_ids))
    return CompletionJob(
        body=body, request_id=random_id("cmpl"), prompt_ids=prompt_ids, params=params, echo_texts=echo_texts
    )


def _tokenize(
    body: CompletionRequest, prompts: list[str | list[int]], state: ServerState
) -> tuple[list[list[int]], list[str]]:
    """Each prompt's token ids, and the text echo would show (empty without echo)."""
    prompt_ids = [state.prompt_token_ids(prompt) for prompt in prompts]
    echo_texts = [""] * len(prompts)
    if body.echo:
        echo_texts = [p if isinstance(p, str) else state.tokenizer.decode(p) for p in prompts]
    return prompt_ids, echo_texts


async def create_completion(body: CompletionRequest, request: Request, state: ServerState) -> Response:
    job = await prepare(body, state)
    lease = state.admit(len(job.prompt_ids) * body.n)
    streams = [
        state.generate(ids, params, f"{job.request_id}-{index}", stream=body.stream)
        for index, (ids, params) in enumerate(zip(job.prompt_ids, job.params, strict=True))
    ]
    if body.stream:
        return EventStream(completion_events(job, streams, state), on_close=lease.release)
    try:
        collected = await until_disconnected(request, collect(streams, body.n))
    except ClientDisconnected:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
    finally:
        lease.release()
    choices = []
    tokenizer = state.engine.tokenizer
    for index, choice in enumerate(collected.choices):
        prompt_index = index // body.n
        echo = job.echo_texts[prompt_index]
        logprobs = None
        if body.logprobs is not None:
            token_ids, positions = _with_prompt(job, prompt_index, collected.prompt_logprobs[prompt_index])
            logprobs = completion_logprobs(
                token_ids + choice.token_ids, positions + choice.logprobs, tokenizer
            )
        choices.append(
            CompletionChoice(
                index=index,
                text=echo + choice.text,
                logprobs=logprobs,
                finish_reason=choice.finish_reason,
                stop_reason=choice.stop_reason,
            )
        )
    usage = UsageInfo.of(job.num_prompt_tokens, collected.num_completion_tokens)
    return _response(job, state, choices, usage)


def _with_prompt(
    job: CompletionJob, prompt_index: int, prompt_logprobs: list[PositionLogprobs | None] | None
) -> tuple[list[int], list[PositionLogprobs | None]]:
    """The echoed prompt's tokens and logprobs, to go before the completion's (none without echo)."""
    if not job.body.echo or prompt_logprobs is None:
        return [], []
    return list(job.prompt_ids[prompt_index]), list(prompt_logprobs)


def _response(
    job: CompletionJob,
    state: ServerState,
    choices: list[CompletionChoice],
    usage: UsageInfo | None,
    created: int | None = None,
) -> CompletionResponse:
    return CompletionResponse(
        id=job.request_id,
        created=created or int(time.time()),
        model=state.model_name,
        choices=choices,
        usage=usage,
    )


async def completion_events(
    job: CompletionJob, streams: list[AsyncIterator[RequestOutput]], state: ServerState
) -> AsyncIterator[str]:
    """The SSE chunks of a streamed completion; the echo (and its logprobs) opens each choice's first."""
    body, tokenizer, created = job.body, state.engine.tokenizer, int(time.time())
    text_offsets: dict[int, int] = {}  # choice index -> characters sent so far
    prompt_logprobs: dict[int, list[PositionLogprobs | None]] = {}
    num_completion_tokens = 0
    try:
        async for prompt_index, output in merge_streams(streams):
            if output.prompt_logprobs is not None:
                prompt_logprobs[prompt_index] = output.prompt_logprobs
            choices = []
            for completion in output.outputs:
                index = prompt_index * body.n + completion.index
                num_completion_tokens += len(completion.token_ids)
                token_ids, positions, text = list(completion.token_ids), completion.logprobs or [], ""
                if index not in text_offsets:  # this choice's first chunk
                    text = job.echo_texts[prompt_index]
                    echoed = _with_prompt(job, prompt_index, prompt_logprobs.get(prompt_index))
                    token_ids, positions = echoed[0] + token_ids, echoed[1] + positions
                text += completion.text
                if not (text or completion.finished or token_ids):
                    continue
                offset = text_offsets.get(index, 0)
                logprobs = None
                if body.logprobs is not None:
                    logprobs = completion_logprobs(token_ids, positions, tokenizer, offset)
                text_offsets[index] = offset + len(text)
                choices.append(
                    CompletionChoice(
                        index=index,
                        text=text,
                        logprobs=logprobs,
                        finish_reason=completion.finish_reason,
                        stop_reason=completion.stop_reason,
                    )
                )
            if choices:
                yield sse(_response(job, state, choices, None, created))
        if body.include_usage:
            usage = UsageInfo.of(job.num_prompt_tokens, num_completion_tokens)
            yield sse(_response(job, state, [], usage, created))
    except Exception as error:  # the stream has begun: report in-band
        yield sse_error(error)
    yield DONE
