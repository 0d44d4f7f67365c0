"""POST /v1/embeddings: the normalised mean of the final hidden states over each input's tokens, as
`kiln.LLM.embed` computes them, in floats or (as OpenAI's Python client asks by default) base64.

At most ServerConfig.max_embedding_inputs inputs per request; large inputs are tokenized off the event
loop, and the engine thread runs them in chunks under its step token budget, one chunk between
generation steps, so a big request slows generation a little instead of stalling it."""

from __future__ import annotations

import base64

from kiln.server.errors import APIError
from kiln.server.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, UsageInfo, prompt_list
from kiln.server.state import ServerState, input_size


async def create_embedding(body: EmbeddingRequest, state: ServerState) -> EmbeddingResponse:
    if state.check_model(body.model) is not None:
        raise APIError(400, "embeddings come from the base model; name it (or none) as model", param="model")
    inputs = prompt_list(body.input)
    if not inputs:
        raise APIError(400, "input is empty; give text, token ids, or a list of either", param="input")
    limit = state.config.max_embedding_inputs
    if len(inputs) > limit:
        raise APIError(
            400,
            f"input has {len(inputs)} items, more than this server's limit of {limit} per request; "
            "split it into several requests",
            param="input",
            code="request_too_large",
        )
    ids = await state.off_loop(input_size(inputs), _tokenize, inputs, state)
    longest = max(len(tokens) for tokens in ids)
    if longest > state.max_model_len:
        raise APIError(
            400,
            f"an input has {longest} tokens, more than this model's maximum context length of "
            f"{state.max_model_len}; shorten it",
            param="input",
            code="context_length_exceeded",
        )
    hidden_size = state.engine.model.config.hidden_size
    if body.dimensions is not None and body.dimensions != hidden_size:
        raise APIError(
            400, f"this model's embeddings have {hidden_size} dimensions; omit dimensions", param="dimensions"
        )
    lease = state.admit(1)
    try:
        vectors = await state.async_engine.embed(ids)
    finally:
        lease.release()
    data = [
        EmbeddingData(
            index=index,
            embedding=vector.tolist()
            if body.encoding_format == "float"
            else base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode(),
        )
        for index, vector in enumerate(vectors)
    ]
    usage = UsageInfo.of(sum(len(tokens) for tokens in ids))
    return EmbeddingResponse(data=data, model=state.model_name, usage=usage)


def _tokenize(inputs: list[str | list[int]], state: ServerState) -> list[list[int]]:
    return [state.prompt_token_ids(text, param="input") for text in inputs]
