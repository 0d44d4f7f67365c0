"""`kiln bench serve` times the first token by the first streamed chunk that delivers tokens, even when
their text is empty (a random-weight model with a small vocabulary streams many empty-text chunks: the bench
used to wait for non-empty text and reported TTFT 0.0 for such streams, BENCHMARKS.md issue 12)."""

import asyncio
import json

import httpx

from kiln.bench.serve import BenchRequest, ServeBenchConfig, send_request

DELAY_S = 0.05


def sse(chunks: list[dict]) -> list[bytes]:
    return [f"data: {json.dumps(chunk)}\n\n".encode() for chunk in chunks] + [b"data: [DONE]\n\n"]


def stream_after_a_delay(events: list[bytes]):
    async def body():
        await asyncio.sleep(DELAY_S)
        for event in events:
            yield event

    return httpx.MockTransport(lambda request: httpx.Response(200, content=body()))


def run(events: list[bytes], endpoint: str = "completions"):
    async def go():
        async with httpx.AsyncClient(transport=stream_after_a_delay(events)) as client:
            config = ServeBenchConfig(base_url="http://server/v1", endpoint=endpoint)
            return await send_request(client, config, "m", BenchRequest(prompt="p", output_len=3))

    return asyncio.run(go())


def test_empty_text_chunks_are_tokens():
    chunks = [{"choices": [{"index": 0, "text": "", "finish_reason": None}]} for _ in range(3)]
    chunks.append({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 3}})
    result = run(sse(chunks))
    assert result.success and result.output_tokens == 3
    assert result.ttft is not None and result.ttft >= DELAY_S
    assert len(result.itl) == 2


def test_the_chat_role_delta_is_not_a_token():
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant"}}]}]
    chunks += [{"choices": [{"index": 0, "delta": {"content": text}}]} for text in ("", "a", "b")]
    result = run(sse(chunks), endpoint="chat")
    assert result.success and result.output_tokens == 3 and len(result.itl) == 2
