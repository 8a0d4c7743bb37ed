"""What the service tests share: a uvicorn server on a loopback port, a rigged classifier, and
small HTTP helpers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import openai

FAST = {"eps": 0.2}  # a narrow search: a few nodes per prompt, so tests stay quick


@dataclass
class Running:
    url: str
    server: object
    thread: threading.Thread

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


@contextmanager
def running(app) -> Iterator[Running]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread, until the block ends."""
    import uvicorn

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield Running(f"http://127.0.0.1:{port}", server, thread)
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


class Rigged:
    """A classifier whose batched scoring fails on 'BOOM' and sleeps on 'SLOW' (tests only)."""

    def __init__(self, clf, delay: float = 0.0):
        self._clf = clf
        self.delay = delay
        self.calls: list[int] = []

    def __getattr__(self, name):
        return getattr(self._clf, name)

    def start(self, prompts, methods, **params):
        texts = [self._clf.tokenizer.decode(list(p.ids)) for p in prompts]
        self.calls.append(len(prompts))
        if any("BOOM" in t for t in texts):
            raise RuntimeError("rigged failure")
        run = self._clf.start(prompts, methods, **params)
        if any("SLOW" in t for t in texts):
            time.sleep(self.delay)  # one long model call
        return run


def post(url: str, path: str, body=None, *, content: str | None = None, headers=None, timeout: float = 30):
    if content is not None:
        headers = {"content-type": "application/json", **(headers or {})}
        return httpx.post(url + path, content=content, headers=headers, timeout=timeout)
    return httpx.post(url + path, json=body, headers=headers, timeout=timeout)


def wait_for(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error
