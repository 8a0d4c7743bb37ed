"""Requests per example and time: one request per search round against one per node, over
llama.cpp's ``llama-server`` serving the default model's GGUF (the figures in docs/engines.md).

The first examples of the shipped sample are scored with ``batch_prompts="on"`` (a round's
token-id prompts in one ``/v1/completions`` request), then with ``batch_prompts="off"`` (a
request per node), each mode on a fresh server so that neither reuses the prompts the other
left in the server's prompt cache. Requests are counted by the engine (retries included).

    .venv/bin/python benchmarks/openai_rounds.py --limit 6 --eps 0.05
    .venv/bin/python benchmarks/openai_rounds.py --base-url http://127.0.0.1:8080/v1   # a server of yours

Without ``--base-url`` it starts ``llama-server`` ($GUARDPROB_LLAMA_SERVER, else the build of
scripts/build_llama_server.sh) on a free loopback port, as the test suite does.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from guardprob.classifier import Classifier
from guardprob.evaluation.datasets import read_dataset
from guardprob.models import cache_dir, default_gguf
from guardprob.spec import ClassifierSpec

MODES = {"per-round": "on", "per-node": "off"}


def _binary(named: str | None) -> Path:
    path = named or os.environ.get("GUARDPROB_LLAMA_SERVER")
    if not path:
        from importlib.metadata import version

        path = str(cache_dir() / "llama-server" / version("llama-cpp-python") / "llama-server")
    if not os.access(path, os.X_OK):
        sys.exit(f"no llama-server at {path}: run scripts/build_llama_server.sh or pass --server PATH")
    return Path(path)


@contextmanager
def llama_server(binary: Path, threads: int, parallel: int):
    """The default GGUF served on loopback with the test suite's settings; yields its /v1 URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [str(binary), "--model", str(default_gguf()), "--ctx-size", "8192", "--parallel", str(parallel), "--kv-unified",
         "--threads", str(threads), "--threads-batch", str(threads), "--flash-attn", "off", "--no-repack", "--no-webui",
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                sys.exit("llama-server did not start")
            try:
                if httpx.get(root + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        yield root + "/v1"
    finally:
        process.terminate()
        process.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", help="an OpenAI-compatible server serving the default model (else llama-server is started)")
    parser.add_argument("--server", help="the llama-server binary to start")
    parser.add_argument("--limit", type=int, default=6, help="examples of the shipped sample (default 6)")
    parser.add_argument("--eps", type=float, default=0.05)
    parser.add_argument("--top-logprobs", type=int, default=500, help="k per node (the default model needs many)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=4, help="llama-server's slots")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)

    examples = read_dataset().examples[: args.limit]

    def run(url: str, mode: str) -> dict:
        clf = Classifier.from_spec(ClassifierSpec(backend="openai", base_url=url, options={
            "top_logprobs": args.top_logprobs, "batch_prompts": MODES[mode]}))
        clf.score("Hello", eps=0.5)  # pages the weights in and learns the prompt form
        rows = []
        for i, example in enumerate(examples):
            before = clf.backend.request_stats()
            started = time.perf_counter()
            scores = clf.score(list(example.messages), eps=args.eps)
            seconds = time.perf_counter() - started
            after = clf.backend.request_stats()
            rows.append({"requests": after["requests"] - before["requests"], "nodes": after["nodes"] - before["nodes"],
                         "seconds": seconds, "p_unsafe": scores.p_unsafe})
            print(f"{mode} example {i}: {rows[-1]['requests']} requests / {rows[-1]['nodes']} nodes in {seconds:.2f} s",
                  file=sys.stderr)
        return {"backend": clf.backend.describe(), "examples": rows}

    figures = {}
    for mode in MODES:
        if args.base_url:
            figures[mode] = run(args.base_url, mode)
        else:
            with llama_server(_binary(args.server), args.threads, args.parallel) as url:
                figures[mode] = run(url, mode)

    summary = {}
    for mode, data in figures.items():
        r = data["examples"]
        summary[mode] = {
            "requests_per_example": statistics.mean(x["requests"] for x in r),
            "nodes_per_example": statistics.mean(x["nodes"] for x in r),
            "seconds_per_example": statistics.mean(x["seconds"] for x in r),
            "median_seconds": statistics.median(x["seconds"] for x in r),
        }
    diff = max(abs(a["p_unsafe"] - b["p_unsafe"]) for a, b in zip(*(figures[m]["examples"] for m in MODES)))
    print(f"{len(examples)} examples of the shipped sample, eps={args.eps}, top_logprobs={args.top_logprobs}")
    print("| mode | requests / example | nodes / example | s / example (mean) | s / example (median) |")
    print("|---|---|---|---|---|")
    for mode, s in summary.items():
        print(f"| {mode} | {s['requests_per_example']:.1f} | {s['nodes_per_example']:.1f} | "
              f"{s['seconds_per_example']:.2f} | {s['median_seconds']:.2f} |")
    a, b = summary["per-node"], summary["per-round"]
    print(f"requests: {a['requests_per_example'] / b['requests_per_example']:.1f}x fewer per round; "
          f"time per-node / per-round: {a['seconds_per_example'] / b['seconds_per_example']:.2f}; "
          f"largest |P(unsafe) difference|: {diff:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "summary": summary, "max_p_unsafe_diff": diff,
                                               "runs": figures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
