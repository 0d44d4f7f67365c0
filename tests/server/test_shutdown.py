"""SIGTERM: the server stops accepting connections, lets in-flight streams finish (bounded by
--drain-timeout, after which they are aborted but still end with [DONE]), and exits 0."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

LONG = {"prompt": "def main():", "max_tokens": 300, "ignore_eos": True, "stream": True}


async def read_events(response: httpx.Response) -> list[str]:
    return [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]


def test_sigterm_finishes_in_flight_streams_then_exits_0(start_server):
    server = start_server("--drain-timeout", "60")

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            async with client.stream("POST", "/v1/completions", json=LONG) as response:
                lines = response.aiter_lines()
                first = await anext(lines)
                server.terminate()
                await asyncio.sleep(0.5)
                with httpx.Client(timeout=2) as other:  # a new connection is refused
                    try:
                        refused = other.get(server.url + "/health").status_code == 503
                    except httpx.ConnectError:
                        refused = True
                rest = [line async for line in lines]
        return [first, *rest], refused

    lines, refused = asyncio.run(main())
    events = [line[6:] for line in lines if line.startswith("data: ")]
    assert refused
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]] == [
        "length"
    ]
    assert server.process.wait(30) == 0


def test_drain_timeout_bounds_the_shutdown(start_server):
    server = start_server("--drain-timeout", "1")
    endless = {**LONG, "max_tokens": 1000}

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            streams = [client.stream("POST", "/v1/completions", json=endless) for _ in range(32)]
            responses = await asyncio.gather(*(stream.__aenter__() for stream in streams))
            server.terminate()
            start = time.monotonic()
            results = await asyncio.gather(*(read_events(r) for r in responses))
            return results, time.monotonic() - start

    results, elapsed = asyncio.run(main())
    assert server.process.wait(30) == 0
    assert elapsed < 10
    # Cut off at the timeout, every stream still ends properly: finish_reason "abort", then [DONE].
    for events in results:
        assert events[-1] == "[DONE]"
        finishes = [
            c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"] if c["finish_reason"]
        ]
        assert finishes == ["abort"]
    assert "Traceback" not in server.log()
