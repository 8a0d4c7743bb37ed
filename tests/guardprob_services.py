"""guardprob services on loopback for the integration tests: the real app (``create_app``)
over a classifier loaded once, served by uvicorn in a thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from servers import free_port

__all__ = ["free_port", "guardprob_service"]


@contextmanager
def guardprob_service(classifier: Any, **settings: Any) -> Iterator[str]:
    """``guardprob serve`` over ``classifier`` with ServerConfig(**settings); yields its URL."""
    import uvicorn

    from guardprob.server.app import create_app
    from guardprob.server.config import ServerConfig

    app = create_app(classifier, ServerConfig(**settings))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the guardprob service did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
