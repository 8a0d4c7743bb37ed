"""Head-of-line benchmark: do cheap requests wait behind heavy ones?

    python benchmarks/head_of_line.py                  # the default model, served in this process
    python benchmarks/head_of_line.py --tiny --cheap 10   # the tiny random test model (seconds)
    python benchmarks/head_of_line.py --url http://127.0.0.1:8000   # a server already running

A stream of cheap requests (``POST /v1/classify``, one short sentence, ``method: greedy``,
one at a time, ``--gap-ms`` apart) is timed four ways in one run: alone, then while
(a) a conversation of two long messages (``--long-chars`` in all, about 8,000 tokens on the
default model) is scored, (b) a 32-text ``/v1/moderations`` request is scored, (c) an
NDJSON stream (``application/x-ndjson``) sends its chunks and hangs up after ``--hang-up-s``.
Prints the cheap requests' p50/p99 latency per case against the same requests alone, their
statuses (a 504 is a cheap request that waited past its timeout), and how the heavy request
ended. Served in this process, each scheduler (``--scheduler``) gets its own server.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
from load_server import TEXTS, _tiny_classifier, serve_in_thread

CHEAP = [t for t in TEXTS if len(t) < 45]  # one short sentence each
FILLER = ("The committee met again on Tuesday to go over the budget for the coming year, line by line, "
          "and agreed to meet once more before the end of the month. ")


@dataclass
class Stream:
    latencies: list[float] = field(default_factory=list)  # seconds, answers with status 200
    statuses: Counter = field(default_factory=Counter)
    overlapped: int = 0  # requests sent while the heavy request was still going

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@dataclass
class Heavy:
    status: str = "-"
    seconds: float = float("nan")


def cheap_stream(url: str, count: int, gap_s: float, heavy: Future | None, timeout: float) -> Stream:
    out = Stream()
    with httpx.Client(base_url=url, timeout=timeout + 5) as client:
        for i in range(count):
            going = heavy is not None and not heavy.done()
            started = time.perf_counter()
            response = client.post("/v1/classify", json={"input": CHEAP[i % len(CHEAP)], "method": "greedy"})
            took = time.perf_counter() - started
            out.statuses[response.status_code] += 1
            out.overlapped += going
            if response.status_code == 200:
                out.latencies.append(took)
            time.sleep(gap_s)
    return out


def long_prompt(url: str, chars: int, timeout: float) -> Heavy:
    """One conversation of two messages of ``chars / 2`` characters each."""
    half = (FILLER * (chars // (2 * len(FILLER)) + 1))[: chars // 2]
    body = {"messages": [{"role": "user", "content": half}, {"role": "assistant", "content": half}]}
    return _timed(lambda: httpx.post(url + "/v1/classify", json=body, timeout=timeout + 5))


def many_texts(url: str, texts: int, timeout: float) -> Heavy:
    body = {"input": [f"{TEXTS[i % len(TEXTS)]} (number {i})" for i in range(texts)]}
    return _timed(lambda: httpx.post(url + "/v1/moderations", json=body, timeout=timeout + 5))


def abandoned_stream(url: str, chunks: int, hang_up_s: float) -> Heavy:
    """An NDJSON stream that sends every chunk at once and hangs up ``hang_up_s`` later,
    reading nothing: over a raw socket, so nothing but the hang-up tells the server."""
    parts = urlsplit(url)
    lines = [json.dumps({"input": "Tell me a story about a long journey.", "stream": True})]
    lines += [json.dumps({"chunk": f"Part {i}: " + FILLER[: 60]}) for i in range(chunks)]
    payload = "".join(line + "\n" for line in lines).encode()
    head = (f"POST /v1/classify HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/x-ndjson\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()

    def run() -> str:
        with socket.create_connection((parts.hostname, parts.port)) as sock:
            sock.sendall(head + f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
            time.sleep(hang_up_s)  # the body stays open: the client is still "writing"
        return f"hung up at {hang_up_s:g} s"

    return _timed(run)


def _timed(call: Callable[[], object]) -> Heavy:
    started = time.perf_counter()
    try:
        answer = call()
    except httpx.HTTPError as exc:
        answer = type(exc).__name__
    if isinstance(answer, httpx.Response):
        code = answer.json().get("error", {}).get("code") if answer.status_code != 200 else None
        status = f"{answer.status_code}" + (f" {code}" if code else "")
    else:
        status = str(answer)
    return Heavy(status, time.perf_counter() - started)


def measure(url: str, args) -> list[tuple[str, Stream, Heavy]]:
    cases: list[tuple[str, Callable[[], Heavy] | None]] = [
        ("alone", None),
        (f"(a) {args.long_chars:,}-char prompt", lambda: long_prompt(url, args.long_chars, args.timeout)),
        (f"(b) {args.texts}-text request", lambda: many_texts(url, args.texts, args.timeout)),
        (f"(c) abandoned NDJSON stream ({args.chunks} chunks)",
         lambda: abandoned_stream(url, args.chunks, args.hang_up_s)),
    ]
    cheap_stream(url, len(CHEAP), 0.0, None, args.timeout)  # warm-up: each cheap text once
    rows = []
    for name, heavy in cases:
        with ThreadPoolExecutor(1) as pool:
            going = pool.submit(heavy) if heavy is not None else None
            if going is not None:
                time.sleep(args.lead_s)  # the heavy request is under way first
            stream = cheap_stream(url, args.cheap, args.gap_ms / 1000, going, args.timeout)
            result = going.result() if going is not None else Heavy()
        rows.append((name, stream, result))
        if heavy is not None:
            wait_idle(url, args.timeout)
    return rows


def wait_idle(url: str, timeout: float) -> None:
    """Let what a case left behind (a stream's work, say) end before the next case."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if httpx.get(url + "/health", timeout=10).json().get("queue_depth", 0) == 0:
            return
        time.sleep(0.2)


def table(rows: list[tuple[str, Stream, Heavy]]) -> str:
    alone = rows[0][1]
    lines = [f"{'case':44} {'p50 ms':>8} {'p99 ms':>8} {'p50 x':>6} {'p99 x':>6} {'during':>6}  statuses     heavy"]
    for name, s, heavy in rows:
        p50, p99 = s.percentile(0.5), s.percentile(0.99)
        lines.append(f"{name:44} {p50 * 1000:8.0f} {p99 * 1000:8.0f} {p50 / alone.percentile(0.5):6.2f} "
                     f"{p99 / alone.percentile(0.99):6.2f} {s.overlapped:6d}  {dict(sorted(s.statuses.items()))!s:12} "
                     + (f"{heavy.status} in {heavy.seconds:.1f} s" if heavy.status != "-" else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server; default: serve the model in this process")
    p.add_argument("--tiny", action="store_true", help="the tiny random test model instead of the default model")
    p.add_argument("--scheduler", choices=("interleaved", "continuous", "both"), default="both",
                   help="served in this process: which scheduler(s); each gets its own server")
    p.add_argument("--cheap", type=int, default=20, help="cheap requests per case")
    p.add_argument("--gap-ms", type=float, default=100, help="pause between two cheap requests")
    p.add_argument("--lead-s", type=float, default=0.5, help="how long the heavy request runs before the cheap ones")
    p.add_argument("--long-chars", type=int, default=None,
                   help="(a): characters in all (default 34,000: about 7,200 tokens on the default model; "
                        "300 with --tiny, whose context holds 2,048 characters with the template)")
    p.add_argument("--texts", type=int, default=32, help="(b): texts in the large request")
    p.add_argument("--chunks", type=int, default=200, help="(c): chunks the stream sends")
    p.add_argument("--hang-up-s", type=float, default=2.0, help="(c): when the stream's client hangs up")
    p.add_argument("--timeout", type=float, default=60.0, help="the server's timeout_s (served here) and the clients'")
    p.add_argument("--eps", type=float, default=None, help="search eps for the served model (default: the package's)")
    args = p.parse_args(argv)
    if args.long_chars is None:
        args.long_chars = 300 if args.tiny else 34_000
    if args.url is not None:
        rows = measure(args.url.rstrip("/"), args)
        print(table(rows))
        return 0
    from guardprob import Classifier
    from guardprob.server import ServerConfig, create_app

    started = time.perf_counter()
    classifier = _tiny_classifier() if args.tiny else Classifier.from_pretrained()
    print(f"model {classifier.name} loaded in {time.perf_counter() - started:.1f} s")
    schedulers = ("interleaved", "continuous") if args.scheduler == "both" else (args.scheduler,)
    for scheduler in schedulers:
        config = ServerConfig(search={"eps": args.eps} if args.eps is not None else {}, timeout_s=args.timeout,
                              continuous=scheduler == "continuous", max_inputs=max(32, args.texts),
                              max_chars=max(20_000, args.long_chars), openai_categories="none")
        url, stop = serve_in_thread(create_app(classifier, config))
        try:
            print(f"-- {scheduler}")
            print(table(measure(url, args)), flush=True)
        finally:
            stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
