"""Request bodies counted as they arrive: refused at ``max_body_bytes`` before more is read.

A plain ASGI middleware (so the client's messages, a disconnect included, pass through as
they come). A declared ``Content-Length`` over the limit is answered 413 before the body is
read at all; a body without one (chunked transfer) is counted message by message, and the
message that passes the limit raises ``BodyTooLarge`` (an ``ApiError``, answered 413 in the
API's error shape) instead of being handed on, so at most the limit is ever held.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guardprob.server.schemas import ApiError


class BodyTooLarge(ApiError):
    def __init__(self, size: str, limit: int):
        super().__init__(413, f"the request body has {size} bytes, over this server's limit of {limit} "
                         "(max_body_bytes); send less, or split it into several requests", code="body_too_large")


class BoundedBody:
    """Count the body's bytes while they arrive; ``answer(error)`` gives the ASGI app that
    answers a refusal (the service's error response, so it is counted like any other)."""

    def __init__(self, app: ASGIApp, limit: int, answer: Callable[[ApiError], Any]):
        self.app, self.limit, self.answer = app, limit, answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            await self.answer(BodyTooLarge(str(declared), self.limit))(scope, receive, send)
            return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # this message is dropped: nothing past the limit is kept
                    raise BodyTooLarge(f"more than {self.limit}", self.limit)
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except BodyTooLarge as exc:  # raised where no handler answers it (outside the endpoints)
            if started:
                raise
            await self.answer(exc)(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None
