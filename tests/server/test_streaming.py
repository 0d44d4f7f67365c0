"""Streaming plumbing without a server: merged streams close every source (aborting its request)."""

from __future__ import annotations

import asyncio

import pytest

from kiln.server.errors import validation_message
from kiln.server.streaming import merge_streams


def test_closing_a_merge_closes_every_stream():
    closed: list[int] = []

    async def source(index: int, count: int):
        try:
            for item in range(count):
                await asyncio.sleep(0.001)
                yield item
        finally:
            closed.append(index)

    async def main():
        merged = merge_streams([source(0, 100), source(1, 100), source(2, 2)])
        seen = [item async for _, item in _take(merged, 5)]
        await merged.aclose()
        return seen

    assert len(asyncio.run(main())) == 5
    assert sorted(closed) == [0, 1, 2]


def test_an_error_in_one_stream_reaches_the_consumer():
    async def good():
        for item in range(100):
            await asyncio.sleep(0.001)
            yield item

    async def bad():
        yield 1
        raise ValueError("engine broke")

    async def main():
        return [item async for item in merge_streams([good(), bad()])]

    with pytest.raises(ValueError, match="engine broke"):
        asyncio.run(main())


async def _take(stream, count):
    async for item in stream:
        yield item
        count -= 1
        if not count:
            return


def test_validation_messages_name_the_field():
    errors = [
        {"type": "string_type", "loc": ("body", "prompt", "str"), "msg": "bad", "input": 5},
        {"type": "list_type", "loc": ("body", "prompt", "list[int]"), "msg": "bad", "input": 5},
        {
            "type": "int_parsing",
            "loc": ("body", "max_tokens"),
            "msg": "Input should be an integer",
            "input": "x",
        },
    ]
    message, param = validation_message(errors)
    assert param == "prompt"
    assert message == "prompt: 5 is none of the accepted types (and problems with 1 more field)"
    json_error = [
        {"type": "json_invalid", "loc": ("body", 3), "msg": "JSON", "ctx": {"error": "Expecting value"}}
    ]
    assert validation_message(json_error) == ("the request body is not valid JSON (Expecting value)", None)
