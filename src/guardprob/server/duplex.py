"""Streaming moderation over one connection: chunks in, server-sent events out.

A client that writes the answer while it is generated sends ``POST /v1/classify`` with
``Content-Type: application/x-ndjson``: the first line is the request (``"stream": true``),
then one ``{"chunk": "..."}`` line per piece of the answer, as it comes. The server reads the
lines as they arrive and sends an event after each one, while the body is still open
(HTTP/1.1 allows a response before the request ends). Starlette's StreamingResponse would
read the request's messages itself (to notice a disconnect), so the events go out from
``DuplexEvents``, which leaves the body to ``NdjsonBody``.

``NdjsonBody`` reads the body on a task of its own, line by line, so that it also hears the
client hang up while a chunk is being scored (lines it had already read are then never
scored). Every line is bounded before it is parsed: in length while it arrives, and in
nesting by a scan of its brackets (a line nested 100,000 deep would exhaust the JSON
reader's recursion).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from guardprob.server.schemas import ApiError, ClassifyRequest, validation_error

NDJSON = "application/x-ndjson"
MAX_NESTING = 32  # a request line nests 3 deep, a chunk line 1
_END = object()
_ESCAPE = re.compile(rb"\\.", re.DOTALL)
# every byte but the brackets is dropped; [ and { become "(", ] and } become ")"
_BRACKETS = bytes.maketrans(b"[{]}", b"(())")
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))


def chunk_line_limit(max_chars: int) -> int:
    """The longest line a chunk of ``max_chars`` characters can take: each character escaped as
    ``\\uXXXX\\uXXXX`` at most, plus ``{"chunk": ""}``."""
    return 12 * max_chars + 64


def nested_deeper_than(line: bytes, limit: int) -> bool:
    """True when the JSON text ``line`` nests arrays and objects more than ``limit`` deep,
    counted outside strings, at the cost of a few passes over the text in C (no recursion).
    Each pass removes the innermost ``()`` pairs, so a text ``limit`` deep is empty after
    ``limit`` passes; a pair left then is deeper, and so are more than ``limit`` brackets
    opened and never closed (the parser would descend into them before it fails)."""
    outside = b"".join(_ESCAPE.sub(b"", line).split(b'"')[::2])  # escapes gone, every '"' opens or closes
    brackets = outside.translate(_BRACKETS, _NOT_BRACKETS)
    for _ in range(limit):
        shorter = brackets.replace(b"()", b"")
        if len(shorter) == len(brackets):
            break
        brackets = shorter
    return b"()" in brackets or brackets.count(b"(") > limit


class NdjsonBody:
    """The lines of an NDJSON body, read as they arrive (at most ``limit`` bytes in all, a
    chunk line at most ``line_limit``), and ``gone``: set when the client hangs up."""

    def __init__(self, receive: Receive, limit: int, line_limit: int):
        self.gone = asyncio.Event()
        self._lines: asyncio.Queue[Any] = asyncio.Queue()
        self._limit, self._line_limit = limit, line_limit
        self._count = 0
        self._task = asyncio.ensure_future(self._read(receive))

    async def header(self) -> ClassifyRequest:
        """The request on the body's first line, checked."""
        first = await self._next()
        if first is None:
            raise ApiError(422, f"an {NDJSON} request begins with a line holding the request (\"stream\": true)",
                           code="missing_field")
        _check_nesting(first, 1)
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
        return body

    async def chunks(self) -> AsyncIterator[str]:
        """The text of each line after the request; ends when the body does or the client goes."""
        number = 1
        while (line := await self._next()) is not None:
            number += 1
            _check_nesting(line, number)
            try:
                value = json.loads(line)
            except ValueError:
                raise ApiError(400, f"line {number} of the stream is not JSON; send {{\"chunk\": \"...\"}} per line",
                               code="invalid_json") from None
            if not (isinstance(value, dict) and set(value) == {"chunk"} and isinstance(value["chunk"], str)):
                raise ApiError(422, "each line after the request is {\"chunk\": \"<text>\"}", param="chunk",
                               code="invalid_type")
            yield value["chunk"]

    def close(self) -> None:
        self._task.cancel()

    async def _next(self) -> bytes | None:
        item = await self._lines.get()
        if isinstance(item, ApiError):
            raise item
        return None if item is _END else item

    def _put(self, line: bytes) -> None:
        if line.strip():
            self._count += 1
            self._lines.put_nowait(line)

    async def _read(self, receive: Receive) -> None:
        buffer, total, more = bytearray(), 0, True
        try:
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.gone.set()
                    self._lines.put_nowait(_END)
                    return
                data, more = message.get("body", b""), message.get("more_body", False)
                total += len(data)
                if total > self._limit:
                    raise ApiError(413, f"the streamed body passed {self._limit} bytes, this server's limit "
                                   "(max_body_bytes); start a new request", code="body_too_large")
                scan = len(buffer)
                buffer += data
                while (end := buffer.find(b"\n", scan)) >= 0:
                    self._put(bytes(buffer[:end]))
                    del buffer[: end + 1]
                    scan = 0
                if self._count and len(buffer) > self._line_limit:  # a chunk line (the request is the body's)
                    raise ApiError(413, f"line {self._count + 1} of the stream passed {self._line_limit} bytes, longer "
                                   "than any chunk can be (max_chars); send the answer in smaller chunks",
                                   param="chunk", code="line_too_long")
            self._put(bytes(buffer))
            self._lines.put_nowait(_END)
            # The body is read; what the client sends now can only be its leaving.
            while (await receive())["type"] != "http.disconnect":
                await asyncio.sleep(0.05)  # a server that repeats empty messages: do not spin
            self.gone.set()
        except ApiError as exc:  # the rest is not read: the stream ends at this error
            self._lines.put_nowait(exc)


def _check_nesting(line: bytes, number: int) -> None:
    if nested_deeper_than(line, MAX_NESTING):
        raise ApiError(400, f"line {number} of the stream nests arrays or objects more than {MAX_NESTING} deep; "
                       "send the request, then one {\"chunk\": \"...\"} per line", code="invalid_json")


class DuplexEvents(StreamingResponse):
    """Server-sent events produced while the request body is still being read."""

    def __init__(self, events: AsyncIterator[bytes], body: NdjsonBody):
        super().__init__(events, media_type="text/event-stream")
        self._body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for event in self.body_iterator:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            return  # the client has gone: nobody reads the rest
        finally:
            self._body.close()
