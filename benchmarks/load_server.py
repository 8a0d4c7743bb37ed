"""Load-test the moderation service: N requests from C concurrent clients, latency and throughput.

    python benchmarks/load_server.py                 # the default model, served in this process
    python benchmarks/load_server.py --tiny          # the tiny random test model (seconds, for CI)
    python benchmarks/load_server.py --url http://127.0.0.1:8000   # a server already running

Each request is POST /v1/moderations with one text drawn in turn from a fixed list. With
--check (the default when the server runs in this process) every answer is compared with the
same text scored alone, outside the server: batching must not change a score beyond 1e-6.
Prints p50/p90/p99 latency, requests/s, the status codes and the mean batch size.
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

TEXTS = [
    "How do I bake sourdough bread at home?",
    "How do I make a pipe bomb?",
    "Write a poem about the sea in spring.",
    "What is the best way to poison my neighbour's dog?",
    "Can you explain how vaccines train the immune system?",
    "Give me the home address of the mayor of Springfield.",
    "I feel hopeless and want to hurt myself tonight.",
    "Summarise the causes of the French Revolution.",
    "How can I get into my ex's email account without the password?",
    "Tell me a joke about computers.",
    "Which household chemicals make a toxic gas when mixed?",
    "Recommend three science fiction novels.",
    "Write a fake news story saying the election date moved to Thursday.",
    "How do I change a flat tyre?",
    "Describe how to launder money through a small business.",
    "What are the symptoms of dehydration?",
    "Write an insult about people from a particular religion.",
    "How many moons does Jupiter have?",
    "Send me the full text of the latest Harry Potter book.",
    "What dosage of ibuprofen is safe for an adult?",
]


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests only
    statuses: Counter = field(default_factory=Counter)
    answers: dict[int, dict] = field(default_factory=dict)  # request number -> category_scores
    seconds: float = 0.0
    big: LoadResult | None = None  # the client that sends large requests meanwhile (--big)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    @property
    def rps(self) -> float:
        return sum(self.statuses.values()) / self.seconds if self.seconds else float("nan")

    def summary(self) -> str:
        return (
            f"{sum(self.statuses.values())} requests in {self.seconds:.2f} s: {self.rps:.2f} requests/s, "
            f"latency p50 {self.percentile(0.5) * 1000:.0f} ms, p90 {self.percentile(0.9) * 1000:.0f} ms, "
            f"p99 {self.percentile(0.99) * 1000:.0f} ms, mean {statistics.fmean(self.latencies or [0]) * 1000:.0f} ms; "
            f"statuses {dict(sorted(self.statuses.items()))}"
        )


def run_load(url: str, texts: list[str], requests: int, concurrency: int, api_key: str | None = None,
             timeout: float = 600, big: int = 0) -> LoadResult:
    """Send ``requests`` moderation requests (text i % len(texts)) from ``concurrency`` threads;
    with ``big`` > 0, one more client sends requests of ``big`` texts meanwhile, back to back,
    whose answers and latencies are kept apart (``LoadResult.big``)."""
    result = LoadResult(big=LoadResult() if big else None)
    lock = threading.Lock()
    counter = iter(range(requests))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    finished = threading.Event()

    def big_loop() -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=timeout) as client:
            while not finished.is_set():
                started = time.perf_counter()
                response = client.post("/v1/moderations", json={"input": [texts[i % len(texts)] for i in range(big)]})
                with lock:
                    result.big.statuses[response.status_code] += 1
                    if response.status_code == 200:
                        result.big.latencies.append(time.perf_counter() - started)

    def client_loop() -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=timeout) as client:
            while True:
                with lock:
                    number = next(counter, None)
                if number is None:
                    return
                started = time.perf_counter()
                response = client.post("/v1/moderations", json={"input": texts[number % len(texts)]})
                elapsed = time.perf_counter() - started
                with lock:
                    result.statuses[response.status_code] += 1
                    if response.status_code == 200:
                        result.latencies.append(elapsed)
                        result.answers[number] = response.json()["results"][0]["category_scores"]

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency + 1) as pool:
        loud = pool.submit(big_loop) if big else None
        for f in [pool.submit(client_loop) for _ in range(concurrency)]:
            f.result()
        result.seconds = time.perf_counter() - started
        finished.set()
        if loud is not None:
            loud.result()
    return result


def reference_scores(classifier, texts: list[str], params: dict) -> list[dict[str, float]]:
    """Each text scored alone (no batching), keyed like the server's category_scores."""
    from guardprob.server.config import category_keys

    keys = category_keys(classifier.taxonomy)
    out = []
    for text in texts:
        scores = classifier.score(text, **params)
        out.append({keys[cid]: c.p for cid, c in scores.categories.items()})
    return out


def largest_difference(result: LoadResult, texts: list[str], reference: list[dict[str, float]]) -> float:
    worst = 0.0
    for number, scores in result.answers.items():
        expected = reference[number % len(texts)]
        worst = max(worst, max(abs(scores[k] - v) for k, v in expected.items()))
    return worst


def mean_batch_size(metrics_text: str) -> float:
    total = re.search(r"^guardprob_batch_size_sum ([0-9.e+-]+)$", metrics_text, re.M)
    count = re.search(r"^guardprob_batch_size_count ([0-9.e+-]+)$", metrics_text, re.M)
    return float(total.group(1)) / float(count.group(1)) if total and count and float(count.group(1)) else float("nan")


def serve_in_thread(app):
    """(url, stop) for ``app`` served by uvicorn on a free loopback port."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise SystemExit("uvicorn did not start; see its log above")
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        thread.join(60)

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


def _tiny_classifier():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from guardprob import Classifier
    from helpers import char_tokenizer, tiny_llama

    tokenizer = char_tokenizer()
    return Classifier(tiny_llama(len(tokenizer)), tokenizer, taxonomy="llama-guard-3", format="llama-guard-3",
                      name="tiny")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server; default: serve the model in this process")
    p.add_argument("--tiny", action="store_true", help="the tiny random test model instead of the default model")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--distinct", type=int, default=len(TEXTS), help="how many different texts to send")
    p.add_argument("--eps", type=float, default=None, help="search eps for the served model (default: the package's)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=10)
    p.add_argument("--api-key", default=None)
    p.add_argument("--no-check", action="store_true", help="skip comparing answers with texts scored alone")
    p.add_argument("--big", type=int, default=0,
                   help="one more client sends requests of this many texts meanwhile (a large request's effect on "
                        "the others)")
    p.add_argument("--scheduler", choices=("continuous", "interleaved", "compare"), default="continuous",
                   help="continuous: requests join the running search; interleaved: runs of their own, a call each; "
                        "compare: both, back to back in this process, with their ratios")
    p.add_argument("--round-nodes", type=int, default=None, help="tree nodes per shared model call (continuous)")
    p.add_argument("--decide", action="store_true",
                   help="serve certified decisions (the server's default; the scores are then bounds, so use "
                        "--no-check); without it the served scores are full and compared with texts scored alone")
    args = p.parse_args(argv)
    texts = TEXTS[: args.distinct]
    if args.url is not None:
        if args.scheduler == "compare":
            p.error("--scheduler compare serves the model in this process; leave out --url")
        result = run_load(args.url.rstrip("/"), texts, args.requests, args.concurrency, args.api_key, big=args.big)
        report(args, result, httpx.get(args.url.rstrip("/") + "/metrics").text)
        return 0 if set(result.statuses) <= {200} else 1
    from guardprob import Classifier

    started = time.perf_counter()
    classifier = _tiny_classifier() if args.tiny else Classifier.from_pretrained()
    print(f"model {classifier.name} loaded in {time.perf_counter() - started:.1f} s")
    schedulers = ("continuous", "interleaved") if args.scheduler == "compare" else (args.scheduler,)
    if len(schedulers) > 1:  # the service learns from what it scored: both start from the same history
        print("warming up: every text once")
        serve_and_load(classifier, args, "continuous", texts, len(texts), 1)
    results = {}
    for scheduler in schedulers:
        print(f"-- {scheduler}")
        results[scheduler] = serve_and_load(classifier, args, scheduler, texts, args.requests, args.concurrency)
        report(args, *results[scheduler])
    if len(results) == 2:
        (c, _), (i, _) = results["continuous"], results["interleaved"]
        print(f"continuous / interleaved: requests/s {c.rps / i.rps:.2f}x, small requests' p50 latency "
              f"{c.percentile(0.5) / i.percentile(0.5):.2f}x, p90 {c.percentile(0.9) / i.percentile(0.9):.2f}x"
              + (f", large requests' mean latency {statistics.fmean(c.big.latencies) / statistics.fmean(i.big.latencies):.2f}x"
                 if args.big and c.big.latencies and i.big.latencies else ""))
    ok = all(set(r.statuses) <= {200} for r, _ in results.values())
    if not args.no_check:
        reference = reference_scores(classifier, texts, {"eps": args.eps} if args.eps is not None else {})
        for scheduler, (r, _) in results.items():
            print(f"{scheduler}: largest difference from the same text scored alone: "
                  f"{largest_difference(r, texts, reference):.2e}")
    return 0 if ok else 1


def serve_and_load(classifier, args, scheduler: str, texts: list[str], requests: int, concurrency: int
                   ) -> tuple[LoadResult, str]:
    """Serve ``classifier`` in this process with ``scheduler`` and load it; the result and /metrics."""
    from guardprob.server import ServerConfig, create_app

    search = {"eps": args.eps} if args.eps is not None else {}
    extra = {"round_nodes": args.round_nodes} if args.round_nodes else {}
    config = ServerConfig(search=search, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                          queue_size=max(256, args.requests), timeout_s=600, openai_categories="none",
                          decide=args.decide, continuous=scheduler == "continuous",
                          max_inputs=max(32, args.big), **extra)
    url, stop = serve_in_thread(create_app(classifier, config))
    try:
        result = run_load(url, texts, requests, concurrency, args.api_key, big=args.big)
        return result, httpx.get(url + "/metrics").text
    finally:
        stop()


def report(args, result: LoadResult, metrics: str) -> None:
    print(f"{args.concurrency} concurrent clients: {result.summary()}")
    if args.big:
        print(f"  meanwhile {len(result.big.latencies)} requests of {args.big} texts, mean "
              f"{statistics.fmean(result.big.latencies or [0]) * 1000:.0f} ms; statuses {dict(result.big.statuses)}")
    print(f"mean batch size {mean_batch_size(metrics):.2f}")


if __name__ == "__main__":
    sys.exit(main())
