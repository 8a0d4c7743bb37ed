"""Interleaved runs (``MicroBatcher``): the scheduler (scheduler.py) under its ``Interleave``
policy, with the constructor this module has always had. The queue, tickets and answers
(``QueueFull``, ``BatcherClosed``, ``Done``, ``Ticket``) are the scheduler's."""

from __future__ import annotations

import time
from collections.abc import Callable

from guardprob.server.scheduler import (
    BatcherClosed,
    Clock,
    Done,
    Interleave,
    Job,
    QueueFull,
    Run,
    Scheduler,
    StartFn,
    Ticket,
)

__all__ = ["BatcherClosed", "Done", "Job", "MicroBatcher", "QueueFull", "Run", "Scheduler", "StartFn", "Ticket"]


class MicroBatcher(Scheduler):
    """Collects items for up to ``wait_s`` after the first (when the worker is idle), at most
    ``max_batch`` per run, and takes turns among the open runs, a model call each, with at
    most ``max_running`` items running (default: ``max_runs`` full runs); see ``Interleave``.

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
        max_running: int | None = None,
        quantum_s: float = 0.25,
        on_batch: Callable[[int], None] | None = None,
        on_fallback: Callable[[], None] | None = None,
        clock: Clock = time.perf_counter,
    ):
        running = max_running if max_running is not None else max(max_runs, 1) * max_batch
        super().__init__(Interleave(start, max_batch=max_batch, max_running=running, quantum_s=quantum_s),
                         queue_size=queue_size, wait_s=wait_s, on_batch=on_batch, on_fallback=on_fallback,
                         clock=clock, name="guardprob-batcher")
        self.max_batch, self.max_running = max_batch, running
