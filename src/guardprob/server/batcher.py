"""A micro-batcher: one worker thread scores items that arrive close together in one call.

Items carry a key (for the server: method + search parameters); only items with equal keys
share a batch, since one batched search runs under one search config. Model work stays on
the worker thread, off the event loop, and one thread means the model is never entered twice
at once. The queue is bounded so an overloaded server refuses work (503) instead of
answering everything late.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("guardprob.server")

ScoreFn = Callable[[Hashable, Sequence[Any]], Sequence[Any]]


class QueueFull(Exception):
    """The queue holds ``queue_size`` items already; retry later."""


class BatcherClosed(Exception):
    """The batcher is shutting down and takes no new work."""


@dataclass(frozen=True)
class Done:
    """What a future resolves to: the item's result and how it was scored."""

    value: Any
    batch_size: int  # items in the call that produced the value (1 after a fallback)
    queued_s: float  # from submit to the start of the call
    run_s: float  # the call's wall time


@dataclass
class _Job:
    key: Hashable
    item: Any
    future: Future
    submitted: float


class MicroBatcher:
    """Collects items for up to ``wait_s`` after the first, at most ``max_batch`` per call.

    ``score(key, items)`` returns one result per item. When it raises for a batch of several
    items, each item is scored again alone, so a bad item fails only its own future.
    ``on_batch(size)`` is called before each call (metrics).
    """

    def __init__(
        self,
        score: ScoreFn,
        *,
        max_batch: int = 16,
        wait_s: float = 0.01,
        queue_size: int = 256,
        on_batch: Callable[[int], None] | None = None,
        on_fallback: Callable[[], None] | None = None,
    ):
        self._score = score
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.queue_size = queue_size
        self._on_batch = on_batch or (lambda size: None)
        self._on_fallback = on_fallback or (lambda: None)
        self._pending: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="guardprob-batcher", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Items waiting to be scored (not counting the batch being scored)."""
        return len(self._pending)

    def submit(self, key: Hashable, items: Sequence[Any]) -> list[Future]:
        """Queue all ``items`` or none of them (so a request never half-enters the queue)."""
        now = time.perf_counter()
        with self._cond:
            if self._closing:
                raise BatcherClosed("the server is shutting down")
            if len(self._pending) + len(items) > self.queue_size:
                raise QueueFull(f"{len(self._pending)} items queued (limit {self.queue_size})")
            jobs = [_Job(key, item, Future(), now) for item in items]
            self._pending.extend(jobs)
            self._cond.notify()
        return [job.future for job in jobs]

    def close(self, timeout: float | None = None) -> None:
        """Take no new items, score those queued, then stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- worker ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._execute(batch)
            except BaseException as exc:  # never let the worker die: fail the batch instead
                log.exception("batcher worker error")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)

    def _next_batch(self) -> list[_Job] | None:
        with self._cond:
            while not self._pending:
                if self._closing:
                    return None
                self._cond.wait()
            first = self._pending.popleft()
            batch = [first]
            deadline = time.perf_counter() + self.wait_s
            while len(batch) < self.max_batch:
                batch.extend(self._take_matching(first.key, self.max_batch - len(batch)))
                left = deadline - time.perf_counter()
                if len(batch) >= self.max_batch or left <= 0 or self._closing:
                    break
                self._cond.wait(left)
        # A future cancelled while queued (its request timed out) is dropped unscored.
        return [job for job in batch if job.future.set_running_or_notify_cancel()]

    def _take_matching(self, key: Hashable, limit: int) -> list[_Job]:
        """Remove up to ``limit`` queued jobs with ``key``, keeping the others in order."""
        taken: list[_Job] = []
        kept: deque[_Job] = deque()
        while self._pending:
            job = self._pending.popleft()
            (taken if job.key == key and len(taken) < limit else kept).append(job)
        self._pending = kept
        return taken

    def _execute(self, batch: list[_Job]) -> None:
        if not batch:
            return
        started = time.perf_counter()
        self._on_batch(len(batch))
        try:
            results = list(self._score(batch[0].key, [job.item for job in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"score returned {len(results)} results for {len(batch)} items")
        except Exception as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            # Re-score each item alone so one bad item cannot fail the others.
            self._on_fallback()
            log.warning("batch of %d failed (%s); scoring each item alone", len(batch), exc)
            for job in batch:
                self._execute_one(job)
            return
        run_s = time.perf_counter() - started
        for job, value in zip(batch, results):
            job.future.set_result(Done(value, len(batch), started - job.submitted, run_s))

    def _execute_one(self, job: _Job) -> None:
        started = time.perf_counter()
        self._on_batch(1)
        try:
            (value,) = self._score(job.key, [job.item])
        except Exception as exc:
            job.future.set_exception(exc)
            return
        job.future.set_result(Done(value, 1, started - job.submitted, time.perf_counter() - started))
