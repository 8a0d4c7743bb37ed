"""Prometheus metrics, in a registry per app so several apps (tests) never share counters."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("guardprob_requests", "HTTP requests by path and status", ["path", "status"], registry=r)
        self.latency = Histogram(
            "guardprob_request_seconds", "request latency by path", ["path"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("guardprob_queue_depth", "prompts waiting to be scored", registry=r)
        self.batch_size = Histogram("guardprob_batch_size", "prompts that start searching together (a run, or a join of the running search)", buckets=_BATCH_BUCKETS, registry=r)
        self.errors = Counter("guardprob_errors", "error answers by type (code)", ["code"], registry=r)
        self.fallbacks = Counter("guardprob_batch_fallbacks", "failed batches re-scored item by item", registry=r)
        self.inputs = Counter("guardprob_inputs_scored", "prompts scored", registry=r)
        self.disconnects = Counter("guardprob_client_disconnects", "requests whose client left before the answer; "
                                   "their work was stopped", registry=r)
        self.ready = Gauge("guardprob_model_ready", "1 once the model is loaded", registry=r)

    def watch_cache(self, read: Callable[[], Any]) -> None:
        """Expose an engine's prefix cache: ``read()`` gives its CacheStats at scrape time (None:
        nothing to report)."""
        self.registry.register(_CacheCollector(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CacheCollector:
    """The engine's own counters, read when scraped (the cache counts; nothing is copied here)."""

    def __init__(self, read: Callable[[], Any]):
        self.read = read

    def describe(self) -> list[Metric]:
        return []  # names are known only once read; nothing else registers these

    def collect(self) -> Iterator[Metric]:
        stats = self.read()
        if stats is None:
            return
        p = "guardprob_prefix_cache"
        yield CounterMetricFamily(f"{p}_lookups", "prompts looked up in the engine's prefix cache", value=stats.lookups)
        yield CounterMetricFamily(f"{p}_hits", "prompts that found a cached prefix", value=stats.hits)
        yield CounterMetricFamily(f"{p}_lookup_tokens", "prompt tokens looked up", value=stats.lookup_tokens)
        yield CounterMetricFamily(f"{p}_tokens_saved", "prompt tokens not prefilled thanks to the cache",
                                  value=stats.tokens_saved)
        yield CounterMetricFamily(f"{p}_evictions", "cache entries evicted to stay within the budget",
                                  value=stats.evictions)
        yield GaugeMetricFamily(f"{p}_bytes", "bytes of keys and values held", value=stats.bytes_held)
        yield GaugeMetricFamily(f"{p}_tokens", "tokens held", value=stats.tokens_held)
        if stats.budget_bytes is not None:
            yield GaugeMetricFamily(f"{p}_budget_bytes", "the most the cache may hold", value=stats.budget_bytes)
