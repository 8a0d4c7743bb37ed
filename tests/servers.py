"""Real servers on loopback for the backend tests: two OpenAI-compatible servers in
subprocesses (llama.cpp's own llama-server, which takes token ids, and llama-cpp-python's,
which takes text), and a small fault-injecting proxy in a thread that forwards to either."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import httpx

# llama-cpp-python's server, through the project's launcher (it turns llama.cpp's AMX buffers off)
_LAUNCHER = Path(__file__).resolve().parents[1] / "scripts" / "serve_llamacpp.py"


# The threads an engine may use, in its process or in ours: the pytest-xdist workers share the
# machine's cores, and llama.cpp's threads spin between operators, so two workers' engines with
# every core each stall each other at every decode (a 1-second test measured 50 s that way).
ENGINE_THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _ServerProcess:
    """A server in a subprocess on a free loopback port; ``url`` is its /v1 root."""

    name = "server"

    def __init__(self, command: list[str]):
        self.port = free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = self.root + "/v1"
        self.log = open(os.devnull, "w")
        self.process = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(self.port)],
                                        stdout=self.log, stderr=self.log)

    def ready(self) -> bool:
        return httpx.get(f"{self.url}/models", timeout=2).status_code == 200

    def wait(self, timeout: float = 120.0) -> _ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.process.returncode}")
            try:
                if self.ready():
                    # The first completion pages the weights in (seconds); pay it here, not in a test's timeout.
                    httpx.post(f"{self.url}/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=timeout)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer within {timeout} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


class LlamaCppPythonServer(_ServerProcess):
    """``python -m llama_cpp.server``: takes text prompts only."""

    name = "llama_cpp.server"

    def __init__(self, model: Path, n_ctx: int = 2048, threads: int = ENGINE_THREADS):
        super().__init__([sys.executable, str(_LAUNCHER), "--model", str(model), "--n_ctx", str(n_ctx),
                          "--n_threads", str(threads), "--n_threads_batch", str(threads), "--verbose", "False"])


def default_llama_server() -> LlamaServer:
    """llama.cpp's ``llama-server`` on the default GGUF, started and ready; the test is skipped
    where the server is not built. Stop it with ``.stop()``."""
    import pytest

    from guardprob.models import default_gguf

    binary = llama_server_binary()
    if binary is None:
        pytest.skip("llama-server is not built: run scripts/build_llama_server.sh")
    return LlamaServer(binary, default_gguf()).wait()


def llama_server_binary() -> Path | None:
    """llama.cpp's ``llama-server`` as scripts/build_llama_server.sh builds it: $GUARDPROB_LLAMA_SERVER,
    else the cached build for the installed llama-cpp-python, else None. A path named in the
    variable that does not exist is an error, so a run that means to test it cannot skip it."""
    named = os.environ.get("GUARDPROB_LLAMA_SERVER")
    if named:
        if not os.access(named, os.X_OK):
            raise RuntimeError(f"GUARDPROB_LLAMA_SERVER={named} is not an executable; run scripts/build_llama_server.sh")
        return Path(named)
    from importlib.metadata import PackageNotFoundError, version

    from guardprob.models import cache_dir

    try:
        built = cache_dir() / "llama-server" / version("llama-cpp-python") / "llama-server"
    except PackageNotFoundError:
        return None
    return built if os.access(built, os.X_OK) else None


class LlamaServer(_ServerProcess):
    """llama.cpp's own ``llama-server``: takes token-id prompts and names the ids in its answers.
    Flash attention off and no repacked weight layouts (AMX), as in guardprob's llama.cpp engine."""

    name = "llama-server"

    def __init__(self, binary: Path, model: Path, n_ctx: int = 8192, parallel: int = 4, threads: int = ENGINE_THREADS):
        super().__init__([str(binary), "--model", str(model), "--ctx-size", str(n_ctx), "--parallel", str(parallel),
                          "--kv-unified", "--threads", str(threads), "--threads-batch", str(threads),
                          "--flash-attn", "off", "--no-repack", "--no-webui"])

    def ready(self) -> bool:
        return httpx.get(f"{self.root}/health", timeout=2).status_code == 200


class FaultProxy:
    """An HTTP/1.1 proxy on loopback that forwards to ``upstream`` and plays queued faults.

    faults: a deque of "429", "500", "hang" (no answer until the client times out),
    "cut" (a truncated body), "short" (top_logprobs cut to ``short_k`` entries) or "ok";
    each request takes the next one (an empty queue forwards unchanged).
    """

    def __init__(self, upstream: str, short_k: int = 2):
        self.upstream = upstream.rstrip("/")
        self.faults: deque[str] = deque()
        self.requests = 0
        self.short_k = short_k
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.client = httpx.AsyncClient(timeout=120)
        server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self.server = server
        ready.set()
        self.loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
                length = int(next((v for k, v in headers.items() if k.lower() == "content-length"), "0"))
                body = await reader.readexactly(length) if length else b""
                self.requests += 1
                fault = self.faults.popleft() if self.faults else "ok"
                if fault == "hang":
                    await asyncio.sleep(30)
                    return
                if fault in ("429", "500"):
                    await self._reply(writer, int(fault), b'{"error": "injected"}')
                    continue
                upstream = await self.client.request(method, self.upstream + path[len("/v1"):] if path.startswith("/v1") else
                                                     self.upstream[: -len("/v1")] + path, content=body,
                                                     headers={"content-type": "application/json"})
                data = upstream.content
                if fault == "cut":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(data))
                    writer.write(data[: len(data) // 2])
                    await writer.drain()
                    writer.close()
                    return
                if fault == "short":
                    reply = json.loads(data)
                    logprobs = reply["choices"][0]["logprobs"]
                    if "content" in logprobs:  # llama-server: a list of {id, token, logprob}, most likely first
                        entries = logprobs["content"][0]["top_logprobs"]
                        logprobs["content"][0]["top_logprobs"] = entries[: self.short_k]
                    else:
                        top = logprobs["top_logprobs"][0]
                        logprobs["top_logprobs"][0] = dict(sorted(top.items(), key=lambda kv: -kv[1])[: self.short_k])
                    data = json.dumps(reply).encode()
                await self._reply(writer, upstream.status_code, data)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if not writer.is_closing():
                writer.close()

    async def _reply(self, writer: asyncio.StreamWriter, status: int, data: bytes) -> None:
        writer.write(b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % (status, len(data)))
        writer.write(data)
        await writer.drain()

    def stop(self) -> None:
        async def _shutdown() -> None:
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.client.aclose()

        asyncio.run_coroutine_threadsafe(_shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()
