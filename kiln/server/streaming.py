"""Streaming plumbing: server-sent events, merging the streams of a batched request, and noticing that a
client has gone away so its requests are aborted (and their KV blocks freed) instead of running on.

Back-pressure: nothing here buffers without bound. A stream's events are produced only as the socket
takes them (Starlette awaits each send), the merge of a batched request holds at most one item per
stream, and the engine's per-stream buffer aborts the request when its reader falls
ServerConfig.max_stream_buffer outputs behind (AsyncEngine's StreamOverflow)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from kiln.server.errors import APIError, error_body

T = TypeVar("T")
DONE = "data: [DONE]\n\n"
_END = object()


def sse(payload: BaseModel | dict[str, Any]) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


def sse_error(error: BaseException) -> str:
    """An error after the 200 header went out: OpenAI's clients raise it from the stream."""
    if isinstance(error, APIError):
        return sse(error_body(error.message, type=error.type, param=error.param, code=error.code))
    return sse(error_body(f"generation failed: {error}", type="server_error"))


class EventStream(StreamingResponse):
    """An SSE response that always closes its body iterator and runs `on_close`, even when the client
    disconnects before the first event (Starlette then never touches the iterator), so aborting and
    giving back the admission lease never wait for garbage collection."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._content, self._on_close = content, on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._content.aclose()  # type: ignore[attr-defined]
            finally:
                self._on_close()


async def merge_streams(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several streams as they come, tagged with the stream's index. Closing the merge closes
    every stream (aborting their requests); an error in one is raised here."""
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()  # type: ignore[attr-defined]
        return
    # Bounded: while the consumer waits on its socket, the pumps wait here, and what piles up piles up in
    # the engine's per-stream buffers, which abort a request that falls too far behind.
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(streams))

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            try:
                async for item in stream:
                    await queue.put((index, item))
            except Exception as error:
                await queue.put((index, error))
                return
            await queue.put((index, _END))
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    tasks = [asyncio.create_task(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ClientDisconnected(Exception):
    pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (which aborts its engine requests) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnected
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
