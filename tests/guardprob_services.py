"""guardprob services on loopback for the integration tests: the real app (``create_app``)
over a classifier loaded once, served by uvicorn in a thread."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from servers import free_port
from serving import running

__all__ = ["free_port", "guardprob_service"]


@contextmanager
def guardprob_service(classifier: Any, **settings: Any) -> Iterator[str]:
    """``guardprob serve`` over ``classifier`` with ServerConfig(**settings); yields its URL."""
    from guardprob.server.app import create_app
    from guardprob.server.config import ServerConfig

    with running(create_app(classifier, ServerConfig(**settings))) as served:
        yield served.url
