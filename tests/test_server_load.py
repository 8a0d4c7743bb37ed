"""A bounded load test: 200 requests from 16 concurrent clients against the tiny model.

Every answer must equal the same text scored alone (batching changes fp32 sums by ~3e-8),
and nothing but 200 may come back. Prints p50/p99 latency and requests/s (pytest -s).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import httpx
import pytest

from guardprob.server import ServerConfig, create_app
from serving import FAST, running

_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "load_server.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("load_server", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("continuous", [True, False], ids=["continuous", "interleaved"])
def test_load_200_requests_16_clients(tiny_classifier, continuous):
    """Both schedulers; with continuous batching, a client sending requests of 8 texts meanwhile."""
    load = _load_script()
    texts = load.TEXTS[:12]
    # full scores (decide: false), compared below with each text scored alone
    config = ServerConfig(search=FAST, max_batch=16, batch_wait_ms=10, queue_size=256, timeout_s=60, openai_categories="none",
                          decide=False, continuous=continuous)
    with running(create_app(tiny_classifier, config)) as r:
        result = load.run_load(r.url, texts, requests=200, concurrency=16, big=8 if continuous else 0)
        batch = load.mean_batch_size(httpx.get(r.url + "/metrics").text)
    print(f"\n16 concurrent clients: {result.summary()}; mean batch size {batch:.2f}")
    assert set(result.statuses) == {200} and sum(result.statuses.values()) == 200
    if continuous:
        assert result.big.latencies and set(result.big.statuses) == {200}
    assert batch > 1  # concurrent requests were in fact batched
    reference = load.reference_scores(tiny_classifier, texts, FAST)
    assert len(result.answers) == 200
    assert load.largest_difference(result, texts, reference) <= 1e-6
