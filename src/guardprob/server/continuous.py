"""Continuous batching (``ContinuousBatcher``): the scheduler (scheduler.py) under its
``Join`` policy, with the constructor this module has always had.

For engines whose sessions take prompts mid-run (``Classifier.joinable``): every request
joins one running search (a ``Pool``) at its next model call, as vLLM does for generation;
the pool rations each call's nodes fairly across requests (``round_nodes``), so a large
request cannot make the calls slow. At most ``max_batch`` items of one request search at
once, at most ``max_running`` in all, and queued requests take turns, an item each. When a
call fails, the items that shared it are each run again alone (one at a time, nothing
joining them), so a bad item fails only its own future.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from guardprob.server.scheduler import Clock, Join, Member, Pool, Scheduler

__all__ = ["ContinuousBatcher", "Member", "Pool"]


class ContinuousBatcher(Scheduler):
    """``new_pool()`` opens a Pool (again after a failed call). ``on_batch(size)`` is called as
    each request's items join (metrics); ``on_fallback()`` when a shared call fails."""

    def __init__(
        self,
        new_pool: Callable[[], Pool],
        *,
        max_batch: int = 16,
        max_running: int = 32,
        wait_s: float = 0.01,
        queue_size: int = 256,
        on_batch: Callable[[int], None] | None = None,
        on_fallback: Callable[[], None] | None = None,
        clock: Clock = time.perf_counter,
    ):
        policy = Join(new_pool, max_batch=max_batch, max_running=max_running)
        super().__init__(policy, queue_size=queue_size, wait_s=wait_s, on_batch=on_batch, on_fallback=on_fallback,
                         clock=clock, name="guardprob-continuous")
        self.max_batch, self.max_running = max_batch, policy.max_running
