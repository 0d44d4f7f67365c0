"""The OpenAI batch format: a request body to the engine's prompt and SamplingParams, and an engine output
to the response body `/v1/completions` or `/v1/chat/completions` would have answered; the output file's
lines."""

from __future__ import annotations

import time
import uuid
from typing import Any

from kiln.batch.backend import Backend
from kiln.engine.outputs import RequestOutput
from kiln.engine.sampling_params import SamplingParams
from kiln.errors import KilnError

# Body fields passed to SamplingParams as they are (OpenAI's defaults where kiln's differ are below).
_PARAM_FIELDS = ("n", "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "stop")


def sampling_params(body: dict[str, Any]) -> SamplingParams:
    """A request body's sampling settings (OpenAI's defaults: temperature 1, 16 tokens for completions)."""
    fields = {name: body[name] for name in _PARAM_FIELDS if body.get(name) is not None}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 16))
    try:
        return SamplingParams(max_tokens=max_tokens, **fields)
    except TypeError as error:
        raise KilnError(f"bad request body: {error}") from error


def prompt_token_ids(url: str, body: dict[str, Any], backend: Backend) -> list[int]:
    if url == "/v1/chat/completions":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise KilnError("a chat request needs a non-empty `messages` list")
        return backend.chat_token_ids(messages)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if not isinstance(prompt, str | list) or (isinstance(prompt, list) and not _is_token_ids(prompt)):
        raise KilnError("a completion request's `prompt` must be one string or one list of token ids")
    return backend.prompt_token_ids(prompt)


def embedding_inputs(body: dict[str, Any], backend: Backend) -> list[list[int]]:
    inputs = body.get("input")
    if isinstance(inputs, str) or (isinstance(inputs, list) and _is_token_ids(inputs) and inputs):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise KilnError("an embedding request needs `input`: a string or a list of strings")
    return [backend.prompt_token_ids(item) for item in inputs]


def completion_body(url: str, output: RequestOutput, model: str) -> dict[str, Any]:
    """What the server's endpoint answers for this output (non-streaming)."""
    chat = url == "/v1/chat/completions"
    choices = []
    for sample in output.outputs:
        choice: dict[str, Any] = {
            "index": sample.index,
            "finish_reason": sample.finish_reason,
            "logprobs": None,
        }
        if chat:
            choice["message"] = {"role": "assistant", "content": sample.text}
        else:
            choice["text"] = sample.text
        choices.append(choice)
    num_prompt = len(output.prompt_token_ids)
    num_completion = sum(len(sample.token_ids) for sample in output.outputs)
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(num_prompt, num_completion),
    }


def embedding_body(vectors: list[list[float]], num_prompt_tokens: int, model: str) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": num_prompt_tokens, "total_tokens": num_prompt_tokens},
    }


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
    }


def output_line(row: dict[str, Any], response: dict[str, Any] | None) -> dict[str, Any]:
    """One line of an OpenAI batch output (or error) file, from a results-table row."""
    request_id = f"batch_req_{row['job_id']}_{row['record_index']}"
    if row["status"] == "failed":
        return {
            "id": request_id,
            "custom_id": row["custom_id"],
            "response": None,
            "error": {"code": "invalid_request", "message": row["error"]},
        }
    return {
        "id": request_id,
        "custom_id": row["custom_id"],
        "response": {"status_code": 200, "request_id": request_id, "body": response},
        "error": None,
    }


def _is_token_ids(values: list) -> bool:
    return all(isinstance(value, int) and not isinstance(value, bool) for value in values)
