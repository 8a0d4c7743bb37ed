"""The moderation service on Ray Serve against the plain service, in one run on one machine.

    python benchmarks/ray_serve_load.py                      # the default model
    python benchmarks/ray_serve_load.py --tiny --requests 60 # the tiny random test model (seconds)

1. Throughput and latency (benchmarks/load_server.py's load: N moderation requests from C
   concurrent clients, one text each) of the plain service (``guardprob serve`` in a process
   of its own), then of the Ray Serve application with 1 replica and with 2 replicas (the
   machine's CPUs split between them, torch on as many threads), on a local Ray cluster.
   On a shared machine the load drifts between these runs, so Ray Serve's own cost per
   request is also measured paired: one client alternates the same request (GET /health,
   then one moderation) between the plain service and the 1-replica application.
2. The prefix cache turn by turn, on 2 replicas with conversation affinity and without: K
   conversations grow turn by turn (all conversations' turn t, then turn t+1), each turn the
   whole conversation so far on /v1/classify; after each turn the replicas' cache counters
   (/metrics, each replica's read through the answers' x-guardprob-replica header) give that
   turn's hit rate and the share of prompt tokens the cache saved.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_server import TEXTS, LoadResult, run_load  # noqa: E402

_CACHE = ("lookups", "hits", "lookup_tokens", "tokens_saved")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny random test model instead of the default model")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (the GPUs are split between the replicas)")
    p.add_argument("--requests", type=int, default=60, help="moderation requests per service")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--conversations", type=int, default=4, help="conversations of the turn-by-turn part")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray cluster")
    p.add_argument("--pairs", type=int, default=20, help="requests of the paired overhead measurement, per service")
    p.add_argument("--skip-load", action="store_true", help="only the turn-by-turn part")
    args = p.parse_args(argv)
    from guardprob.spec import ClassifierSpec

    spec = _tiny_spec() if args.tiny else ClassifierSpec()
    compare(replace(spec, device=args.device), requests=0 if args.skip_load else args.requests,
            concurrency=args.concurrency, conversations=args.conversations, turns=args.turns, cpus=args.cpus,
            pairs=args.pairs)
    return 0


def compare(spec, *, requests: int, concurrency: int, conversations: int, turns: int, cpus: int,
            pairs: int = 20) -> dict:
    """Run both parts (the load part only where ``requests`` > 0); print and return the figures."""
    import ray
    from ray import serve

    from guardprob.server import ServerConfig
    from guardprob.server.config import RayServeConfig

    config = ServerConfig(max_batch=16, batch_wait_ms=10, queue_size=max(256, requests), timeout_s=600,
                          openai_categories="none", decide=False)
    gpus = _gpus() if spec.device.startswith("cuda") else 0
    results: dict[str, LoadResult] = {}
    figures: dict = {"load": {}, "turns": {}}
    plain, stop_plain = _plain_service(spec, config) if requests else (None, lambda: None)
    if requests:
        run_load(plain, TEXTS, len(TEXTS), 1)  # warm-up: every text once
        results["plain"] = _report("plain service", run_load(plain, TEXTS, requests, concurrency))

    ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"

    def split(replicas: int, **kw) -> RayServeConfig:  # the machine's CPUs (and GPUs) shared by the replicas
        return RayServeConfig(replicas=replicas, num_cpus=cpus / replicas, num_gpus=gpus / replicas, **kw)

    try:
        for replicas in (1, 2) if requests else ():
            _deploy(spec, replace(config, ray=split(replicas)))
            run_load(url, TEXTS, len(TEXTS), 1)
            name = f"Ray Serve, {replicas} replica(s)"
            results[name] = _report(name, run_load(url, TEXTS, requests, concurrency))
            if replicas == 1:
                figures["overhead"] = _overhead(plain, url, pairs)
            serve.delete("guardprob")
        stop_plain()
        for name, r in results.items():
            figures["load"][name] = {"requests_per_s": r.rps, "p50_ms": r.percentile(0.5) * 1000,
                                     "p99_ms": r.percentile(0.99) * 1000, "statuses": dict(r.statuses)}
            if name != "plain" and "plain" in results:
                base = results["plain"]
                print(f"{name} / plain: requests/s {r.rps / base.rps:.2f}x, p50 {r.percentile(0.5) / base.percentile(0.5):.2f}x, "
                      f"p99 {r.percentile(0.99) / base.percentile(0.99):.2f}x")
        for affinity in (True, False):
            _deploy(spec, replace(config, ray=split(2, affinity=affinity)))
            print(f"-- turn by turn, 2 replicas, affinity {'on' if affinity else 'off'}")
            figures["turns"]["affinity" if affinity else "no_affinity"] = _turns(url, conversations, turns)
            serve.delete("guardprob")
    finally:
        stop_plain()
        serve.shutdown()
        ray.shutdown()
    return figures


def _overhead(plain: str, ray_url: str, pairs: int) -> dict:
    """Ray Serve's cost per request, free of the machine's load drifting between the runs
    above: one client alternates the same request between the plain service and the 1-replica
    application (both idle otherwise), and the medians are compared."""
    import statistics

    figures = {}
    for name, method, path, body in (("health", "GET", "/health", None),
                                     ("moderation", "POST", "/v1/moderations", {"input": TEXTS[0]})):
        times: dict[str, list[float]] = {"plain": [], "ray": []}
        with httpx.Client(timeout=600) as client:
            for _ in range(pairs):
                for which, url in (("plain", plain), ("ray", ray_url)):
                    started = time.perf_counter()
                    assert client.request(method, url + path, json=body).status_code == 200
                    times[which].append(time.perf_counter() - started)
        p, r = (statistics.median(times[k]) * 1000 for k in ("plain", "ray"))
        print(f"{method} {path}, one client, {pairs} pairs: median {p:.1f} ms plain, {r:.1f} ms on Ray Serve "
              f"(1 replica): {r - p:+.1f} ms per request")
        figures[name] = {"plain_ms": p, "ray_ms": r, "added_ms": r - p}
    return figures


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _plain_service(spec, config):
    """(url, stop) of ``guardprob serve`` in a process of its own, as the Ray replicas are."""
    import json
    import subprocess

    folder = Path(tempfile.mkdtemp(prefix="plain-"))
    settings = {k: getattr(config, k) for k in ("max_batch", "batch_wait_ms", "queue_size", "timeout_s",
                                                "openai_categories", "decide")}
    (folder / "serve.json").write_text(json.dumps(settings), encoding="utf-8")
    port = _free_port()
    model = ["--model", spec.model, "--format", spec.format, "--taxonomy", spec.taxonomy] if spec.model else []
    model += ["--device", spec.device]
    process = subprocess.Popen([sys.executable, "-m", "guardprob.cli", "serve", "--port", str(port), "--config",
                                str(folder / "serve.json"), "--log-level", "warning", *model])
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise SystemExit("guardprob serve exited; see its log above")
        time.sleep(0.5)
    print(f"plain service ready in {time.perf_counter() - started:.1f} s")

    def stop() -> None:
        process.terminate()
        process.wait(60)

    return url, stop


def _deploy(spec, config) -> None:
    from ray import serve

    from guardprob.server.ray_serve import build

    started = time.perf_counter()
    serve.run(build(spec, config), name="guardprob", route_prefix="/")
    print(f"Ray Serve application ({config.ray.replicas} replica(s)) ready in {time.perf_counter() - started:.1f} s")


def _report(name: str, result: LoadResult) -> LoadResult:
    print(f"{name}: {result.summary()}")
    return result


def _turns(url: str, conversations: int, turns: int) -> list[dict]:
    """Turn t of every conversation at once, then the replicas' cache counters (per turn)."""
    figures = []
    before = _cache(url, 2)
    with httpx.Client(base_url=url, timeout=600) as client, ThreadPoolExecutor(conversations) as pool:
        for turn in range(turns):
            bodies = [{"messages": _conversation(c, turn)} for c in range(conversations)]
            responses = list(pool.map(lambda b: client.post("/v1/classify", json=b), bodies))
            assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
            after = _cache(url, 2)
            d = {k: after[k] - before[k] for k in _CACHE}
            print(f"turn {turn + 1}: {d['hits']:.0f}/{d['lookups']:.0f} prompts hit the cache, "
                  f"{d['tokens_saved'] / max(d['lookup_tokens'], 1):.0%} of {d['lookup_tokens']:.0f} prompt tokens saved, "
                  f"{d['lookup_tokens'] - d['tokens_saved']:.0f} prefilled; "
                  f"replicas {sorted(r.headers['x-guardprob-replica'] for r in responses)}")
            figures.append(d)
            before = after
    return figures


def _conversation(c: int, turn: int) -> list[dict]:
    """Conversation c at turn t: a user message, then t exchanges."""
    messages = [{"role": "user", "content": f"{TEXTS[c % len(TEXTS)]} (conversation {c})"}]
    for t in range(turn):
        messages += [{"role": "assistant", "content": f"Here is my answer number {t + 1}, with some detail about it."},
                     {"role": "user", "content": f"{TEXTS[(c + t + 1) % len(TEXTS)]} Please say more."}]
    return messages


def _cache(url: str, replicas: int) -> dict[str, float]:
    """The prefix-cache counters summed over the replicas: /metrics reaches one replica at a
    time (by load), so it is read until each of them has answered."""
    seen: dict[str, dict[str, float]] = {}
    for _ in range(200):
        response = httpx.get(url + "/metrics", timeout=60)
        seen[response.headers["x-guardprob-replica"]] = {
            k: float(m.group(1)) if (m := re.search(rf"^guardprob_prefix_cache_{k}_total ([0-9.e+-]+)$", response.text, re.M))
            else 0.0 for k in _CACHE}
        if len(seen) == replicas:
            break
    return {k: sum(v[k] for v in seen.values()) for k in _CACHE}


def _tiny_spec():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from guardprob.spec import ClassifierSpec
    from helpers import char_tokenizer, tiny_llama

    path = Path(tempfile.mkdtemp(prefix="tiny-"))
    tokenizer = char_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return ClassifierSpec(model=str(path), taxonomy="llama-guard-3", format="llama-guard-3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
