"""Streaming moderation over one connection: chunks in, server-sent events out.

A client that writes the answer while it is generated sends ``POST /v1/classify`` with
``Content-Type: application/x-ndjson``: the first line is the request (``"stream": true``),
then one ``{"chunk": "..."}`` line per piece of the answer, as it comes. The server reads the
lines as they arrive and sends an event after each one, while the body is still open
(HTTP/1.1 allows a response before the request ends). Starlette's StreamingResponse would
read the request's messages itself (to notice a disconnect), so the events go out from
``DuplexEvents``, which leaves the body to the event generator.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from guardprob.server.schemas import ApiError, ClassifyRequest, validation_error

NDJSON = "application/x-ndjson"


async def read_stream_header(request: Request, limit: int) -> tuple[ClassifyRequest, AsyncIterator[str]]:
    """The request on the body's first line, and the chunks of the lines after it, read lazily."""
    lines = _lines(request, limit)
    first = await anext(lines, None)
    if first is None:
        raise ApiError(422, f"an {NDJSON} request begins with a line holding the request (\"stream\": true)",
                       code="missing_field")
    try:
        body = ClassifyRequest.model_validate_json(first)
    except ValidationError as exc:
        raise validation_error(exc) from None
    if not body.stream:
        raise ApiError(400, f"an {NDJSON} body streams an answer: its first line needs \"stream\": true",
                       param="stream", code="invalid_value")
    if body.chunks is not None:
        raise ApiError(400, "send the chunks as lines after the request, one {\"chunk\": ...} per line, not in it",
                       param="chunks", code="invalid_value")
    return body, _chunks(lines)


async def _lines(request: Request, limit: int) -> AsyncIterator[bytes]:
    buffer, total = b"", 0
    async for data in request.stream():
        total += len(data)
        if total > limit:
            raise ApiError(413, f"the streamed body passed {limit} bytes, this server's limit; start a new request",
                           code="body_too_large")
        buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield line
    if buffer.strip():
        yield buffer


async def _chunks(lines: AsyncIterator[bytes]) -> AsyncIterator[str]:
    async for line in lines:
        try:
            value = json.loads(line)
        except ValueError:
            raise ApiError(400, "a line of the stream is not JSON; send {\"chunk\": \"...\"} per line",
                           code="invalid_json") from None
        if not (isinstance(value, dict) and set(value) == {"chunk"} and isinstance(value["chunk"], str)):
            raise ApiError(422, "each line after the request is {\"chunk\": \"<text>\"}", param="chunk",
                           code="invalid_type")
        yield value["chunk"]


class DuplexEvents(StreamingResponse):
    """Server-sent events produced while the request body is still being read."""

    def __init__(self, events: AsyncIterator[bytes]):
        super().__init__(events, media_type="text/event-stream")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for event in self.body_iterator:
                await send({"type": "http.response.body", "body": event, "more_body": True})
        except (ClientDisconnect, OSError):
            return  # the client has gone: nobody reads the rest
        await send({"type": "http.response.body", "body": b"", "more_body": False})
