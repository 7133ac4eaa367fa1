"""Server-sent events in OpenAI's shape, and the response that cancels its request when the client
leaves.

A stream is: (chat) a first chunk that opens the assistant's message, a chunk per router response
that carries text, a chunk with the `finish_reason`, with `stream_options.include_usage` a last chunk
with `usage` and no choices, then `data: [DONE]`. An error after the stream has begun (the HTTP
status is sent by then) is one `data: {"error": {...}}` event, then `data: [DONE]`: every stream
ends with its finish or an explicit error.

`SSEResponse` listens for the client's disconnect while it streams, whatever ASGI version the
server speaks, and then cancels the router's stream: a client that closes the HTTP stream cancels
its request in the router and in the engine. A stream the server cuts short when it stops (after
uvicorn's graceful timeout) is cancelled in the router too, and ends with an error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from qlm_backend.openai_front.errors import OpenAIError
from qlm_backend.openai_front.shapes import Shapes, Tally
from qlm_backend.openai_front.upstream import Piece, RouterError, RouterStream

DONE = b"data: [DONE]\n\n"
STOPPING = OpenAIError(503, "qlm-openai is stopping; the request was cancelled", code="shutdown")


def event(obj: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def stream_events(
    shapes: Shapes,
    stream: RouterStream,
    first: Piece | None,
    error_for: Callable[[RouterError], OpenAIError],
) -> AsyncIterator[bytes]:
    """The events of one streamed answer; `first`: a response already read (or None)."""
    call = shapes.call
    t = Tally()
    if shapes.chat:
        yield event(shapes.chunk("", role=True))
    if call.echo:
        yield event(shapes.chunk(call.echo))
    pending = first
    while True:
        if pending is None:
            try:
                pending = await stream.get()
            except RouterError as e:
                yield event(error_for(e).body())
                yield DONE
                return
        p, pending = pending, None
        t.add(p)
        usage = t.usage() if call.continuous_usage else None
        if p.final:
            text = p.text or (None if shapes.chat else "")
            yield event(shapes.chunk(text, t.finish_reason or "stop", usage=usage))
            if call.include_usage:
                yield event(shapes.usage_chunk(t.usage()))
            yield DONE
            return
        if p.text:
            yield event(shapes.chunk(p.text, usage=usage))


async def until_disconnect(receive: Receive) -> None:
    """Returns when the client has gone (closed the connection or the stream)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class SSEResponse(StreamingResponse):
    """A text/event-stream response that calls `on_close` when it ends, however it ends (the
    client left, the stream finished, the server cancelled it)."""

    def __init__(
        self,
        body: AsyncIterator[bytes],
        on_close: Callable[[], None],
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            body,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
            media_type="text/event-stream",
        )
        self._body = body
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            async for chunk in self._body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        writer = asyncio.ensure_future(pump())
        watcher = asyncio.ensure_future(until_disconnect(receive))
        stopping = False
        try:
            await asyncio.wait({writer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the server is stopping (uvicorn's graceful timeout)
            stopping = True
        finally:
            self.on_close()
            for task in (writer, watcher):
                task.cancel()
            await asyncio.gather(writer, watcher, return_exceptions=True)
            aclose = getattr(self._body, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        if stopping:
            await self._end_with(send, STOPPING)
            return
        exc = writer.exception() if writer.done() and not writer.cancelled() else None
        if exc is not None and not isinstance(exc, OSError):  # OSError: the client left
            raise exc

    async def _end_with(self, send: Send, error: OpenAIError) -> None:
        """End a stream cut short by the server with an explicit error (best effort: the
        connection may be gone too)."""
        with contextlib.suppress(Exception):
            for body in (event(error.body()), DONE, b""):
                await asyncio.wait_for(
                    send({"type": "http.response.body", "body": body, "more_body": bool(body)}),
                    timeout=1.0,
                )
