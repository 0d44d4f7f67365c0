"""SIGTERM: the server stops accepting connections, lets in-flight streams finish (bounded by
--drain-timeout, after which they are aborted but still end with [DONE]), and exits 0, also when a client
has stopped reading (whose stream back-pressure has aborted)."""

from __future__ import annotations

import asyncio
import json
import socket
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


def stalled_stream(server, body: dict) -> socket.socket:
    """A raw client that sends a streamed request and then never reads (a tiny receive window, so the
    server's socket buffers fill at once)."""
    payload = json.dumps(body).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


def test_a_client_that_stops_reading_is_aborted_and_does_not_delay_sigterm(start_server):
    server = start_server("--drain-timeout", "2", "--max-stream-buffer", "16")
    # With 20 logprobs per token, ~20 MB of events: far more than the socket buffers hold.
    wide = {**LONG, "max_tokens": 1000, "n": 16, "logprobs": 20}
    sock = stalled_stream(server, wide)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and server.metric("kiln:num_requests_running") < 16:
            time.sleep(0.05)
        # Back-pressure: once 16 outputs wait for the reader, the request is aborted, its blocks freed,
        # long before its 1000 tokens, and nothing more is generated for it.
        while time.monotonic() < deadline and server.metric("kiln:num_requests_running") > 0:
            time.sleep(0.1)
        steps = server.metric("kiln:engine_steps_total")
        assert server.metric("kiln:num_requests_running") == 0 and 16 < steps < 1000
        assert server.metric("kiln:kv_cache_usage_perc") == 0
        time.sleep(0.5)
        assert server.metric("kiln:engine_steps_total") == steps
        # A second stalled client, still generating when SIGTERM comes.
        second = stalled_stream(server, {**LONG, "max_tokens": 1000})
        time.sleep(0.5)
        start = time.monotonic()
        server.terminate()
        code = server.process.wait(10)
        elapsed = time.monotonic() - start
        second.close()
    finally:
        sock.close()
    assert code == 0
    assert elapsed < 2 + 1, f"exited {elapsed:.1f}s after SIGTERM with --drain-timeout 2"
    log = server.log()
    assert "Traceback" not in log and "CancelledError" not in log, log
