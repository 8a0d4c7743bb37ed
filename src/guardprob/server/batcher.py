"""The scheduler: one worker thread runs the model, one call at a time, for every request.

Items carry a key (for the server: method + search parameters); items with equal keys that
arrive close together share a run (one batched search under one config). A run advances one
model call per step. A new run opens once every open run has had ``quantum_s`` of the
worker, and the worker steps the oldest open run that has had less than that, else the
oldest open run: a request that arrives while a long
search runs starts its own run at the next call and is served almost as if alone instead of
waiting for the long one to end, while runs of like size still finish in the order they came. Between calls each item is checked: one whose request
gave up (``abandon``: its timeout passed) is stopped, so it costs nothing more; one past its
``answer_by`` time is stopped too and answered with the bounds reached (incomplete). Model
work stays on the worker thread, off the event loop, and one thread means the model is never
entered twice at once. The queue is bounded so an overloaded server refuses work (503)
instead of answering everything late.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger("guardprob.server")


class Run(Protocol):
    """What ``start(key, items)`` returns: a batched job that advances one model call per step."""

    def step(self) -> bool: ...  # False once every item is done

    def stop(self, item: int) -> None: ...  # end one item's work now, keeping what it reached

    def close(self) -> None: ...

    def results(self) -> Sequence[Any]: ...  # one per item, once done


StartFn = Callable[[Hashable, Sequence[Any]], Run]


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


class Ticket(Future):
    """An item's future; ``abandoned`` once its request stopped waiting for it."""

    def __init__(self, answer_by: float | None = None):
        super().__init__()
        self.answer_by = answer_by  # a time.perf_counter() instant: answer with what is reached then
        self.abandoned = False


@dataclass
class Job:
    key: Hashable
    item: Any
    future: Ticket
    submitted: float
    request: int = 0  # which submit() it came with
    stopped: bool = False
    alone: bool = False  # a call it shared failed: it runs again with nothing joining it (continuous)


class Scheduler:
    """What both schedulers share: a bounded queue that takes a request's items all or none,
    tickets a request can give up, and one worker thread (``_work``, started by the subclass
    once it is set up)."""

    def __init__(self, queue_size: int, name: str):
        self.queue_size = queue_size
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._requests = itertools.count()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)

    def _work(self) -> None:
        raise NotImplementedError

    @property
    def depth(self) -> int:
        """Items waiting to be started (not counting those in the search)."""
        return len(self._pending)

    def submit(self, key: Hashable, items: Sequence[Any], answer_by: float | None = None) -> list[Ticket]:
        """Queue all ``items`` or none of them (so a request never half-enters the queue)."""
        now = time.perf_counter()
        with self._cond:
            if self._closing:
                raise BatcherClosed("the server is shutting down")
            if len(self._pending) + len(items) > self.queue_size:
                raise QueueFull(f"{len(self._pending)} items queued (limit {self.queue_size})")
            request = next(self._requests)
            jobs = [Job(key, item, Ticket(answer_by), now, request) for item in items]
            self._pending.extend(jobs)
            self._cond.notify()
        return [job.future for job in jobs]

    @staticmethod
    def _given_up(job: Job, now: float) -> bool:
        """True when a running item must stop now: its request stopped waiting, or its
        ``answer_by`` time (answer with the bounds reached) has come."""
        ticket = job.future
        return not job.stopped and (ticket.abandoned or (ticket.answer_by is not None and now >= ticket.answer_by))

    def abandon(self, tickets: Sequence[Future]) -> None:
        """The request stopped waiting: queued items are dropped, running ones stopped."""
        for ticket in tickets:
            if isinstance(ticket, Ticket):
                ticket.abandoned = True
            ticket.cancel()

    def close(self, timeout: float | None = None) -> None:
        """Take no new items, finish those queued and running, then stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)


@dataclass
class _Open:
    """A run the worker steps, with its jobs in item order."""

    run: Run
    jobs: list[Job]
    order: int = 0  # when it opened, among all runs
    started: float = field(default_factory=time.perf_counter)
    spent: float = 0.0  # worker seconds its calls took


class MicroBatcher(Scheduler):
    """Collects items for up to ``wait_s`` after the first (when the worker is idle), at most
    ``max_batch`` per run, and steps up to ``max_runs`` open runs (see the module docstring).

    ``start(key, items)`` opens a run over the items. When a run of several items fails,
    each item is run again alone, so a bad item fails only its own future. ``on_batch(size)``
    is called as each run opens (metrics).
    """

    def __init__(
        self,
        start: StartFn,
        *,
        max_batch: int = 16,
        wait_s: float = 0.01,
        queue_size: int = 256,
        max_runs: int = 2,
        quantum_s: float = 0.5,
        on_batch: Callable[[int], None] | None = None,
        on_fallback: Callable[[], None] | None = None,
    ):
        super().__init__(queue_size, "guardprob-batcher")
        self._start = start
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.max_runs = max_runs
        self.quantum_s = quantum_s
        self._opened = 0
        self._on_batch = on_batch or (lambda size: None)
        self._on_fallback = on_fallback or (lambda: None)
        self._open: list[_Open] = []
        self._thread.start()

    # -- worker ---------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._open:
                    if self._closing:
                        return
                    self._cond.wait()
            try:
                self._admit()  # what arrived during the last call starts before the next one
                if self._open:
                    # Two levels, oldest first in each: runs that have had less than a quantum of
                    # the worker go before those that have had more. A small request that arrives
                    # behind a long one runs almost as if alone, and runs of like size still finish
                    # in the order they came (sharing the worker among all would delay them all).
                    entry = min(self._open, key=lambda e: (e.spent >= self.quantum_s, e.order))
                    started = time.perf_counter()
                    self._advance(entry)
                    entry.spent += time.perf_counter() - started
            except BaseException as exc:  # never let the worker die: fail what it held instead
                log.exception("batcher worker error")
                for entry in self._open:
                    self._fail(entry, exc)
                self._open.clear()

    def _admit(self) -> None:
        """Open a run for queued items while fewer than ``max_runs`` are open and none of them is
        still within its first quantum: under load, what arrives meanwhile gathers into one
        larger run instead of many small ones."""
        while len(self._open) < self.max_runs and all(e.spent >= self.quantum_s for e in self._open):
            batch = self._next_batch(wait=not self._open)
            if batch is None:
                return
            self._open_run(batch)

    def _next_batch(self, wait: bool) -> list[Job] | None:
        with self._cond:
            if not self._pending:
                return None
            first = self._pending.popleft()
            batch = [first]
            deadline = time.perf_counter() + (self.wait_s if wait else 0.0)
            while len(batch) < self.max_batch:
                batch.extend(self._take_matching(first.key, self.max_batch - len(batch)))
                left = deadline - time.perf_counter()
                if len(batch) >= self.max_batch or left <= 0 or self._closing:
                    break
                self._cond.wait(left)
        # A future cancelled while queued (its request timed out) is dropped unscored.
        return [job for job in batch if job.future.set_running_or_notify_cancel()]

    def _take_matching(self, key: Hashable, limit: int) -> list[Job]:
        """Remove up to ``limit`` queued jobs with ``key``, keeping the others in order."""
        taken: list[Job] = []
        kept: deque[Job] = deque()
        while self._pending:
            job = self._pending.popleft()
            (taken if job.key == key and len(taken) < limit else kept).append(job)
        self._pending = kept
        return taken

    def _open_run(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        self._on_batch(len(jobs))
        try:
            run = self._start(jobs[0].key, [job.item for job in jobs])
        except Exception as exc:
            self._fall_back(jobs, exc)
            return
        self._opened += 1
        self._open.append(_Open(run, jobs, self._opened))

    def _advance(self, entry: _Open) -> None:
        """Stop the items nobody waits for or whose time is up, then run one call."""
        now = time.perf_counter()
        for i, job in enumerate(entry.jobs):
            if self._given_up(job, now):
                job.stopped = True
                entry.run.stop(i)
        try:
            more = entry.run.step()
            results = None if more else list(entry.run.results())
        except Exception as exc:
            self._open.remove(entry)
            _close(entry.run)
            self._fall_back(entry.jobs, exc)
            return
        if more:
            return
        self._open.remove(entry)
        if len(results) != len(entry.jobs):
            self._fall_back(entry.jobs, RuntimeError(f"{len(results)} results for {len(entry.jobs)} items"))
            return
        run_s = time.perf_counter() - entry.started
        for job, value in zip(entry.jobs, results):
            if not job.future.done():
                job.future.set_result(Done(value, len(entry.jobs), entry.started - job.submitted, run_s))

    def _fall_back(self, jobs: list[Job], exc: Exception) -> None:
        """A run failed: a lone item fails; several are each run again alone."""
        live = [job for job in jobs if not job.future.done()]
        if len(jobs) == 1:
            for job in live:
                job.future.set_exception(exc)
            return
        self._on_fallback()
        log.warning("batch of %d failed (%s); scoring each item alone", len(jobs), exc)
        for job in live:
            self._open_run([job])

    def _fail(self, entry: _Open, exc: BaseException) -> None:
        _close(entry.run)
        for job in entry.jobs:
            if not job.future.done():
                job.future.set_exception(exc)


def _close(run: Run) -> None:
    try:
        run.close()
    except Exception:  # a run that failed may fail to close too; its engine state goes with it
        log.exception("closing a failed run")
