"""``GET /playground``: one static page over ``POST /v1/classify``, with its script and styles,
shipped as package data (no build step, nothing fetched from elsewhere)."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

# path -> (file under server/static, media type)
_FILES = {
    "/playground": ("playground.html", "text/html; charset=utf-8"),
    "/playground/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
    "/playground/playground.css": ("playground.css", "text/css; charset=utf-8"),
}
# The page runs its own script and styles only and talks to this server only. It writes what
# the server sends as text; the policy would stop injected markup from running even if it did not.
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def playground_router() -> APIRouter:
    """The page's three routes, with the files read once."""
    router = APIRouter()
    static = resources.files("guardprob.server") / "static"
    for path, (name, media_type) in _FILES.items():
        body = (static / name).read_bytes()
        router.add_api_route(path, _responder(body, media_type), methods=["GET"], include_in_schema=False)
    return router


def _responder(body: bytes, media_type: str):
    async def serve() -> Response:
        return Response(body, media_type=media_type, headers=_HEADERS)

    return serve
