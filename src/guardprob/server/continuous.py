"""The continuous scheduler: every request joins one running search at its next model call.

For engines whose sessions take prompts mid-run (``Classifier.joinable``). One worker thread
drives a pool (``Pool``): between calls it admits what arrived (each request joins the search
as a member of its own, the engine prefilling every new prompt in one pass before the next
call's rounds), stops items whose request gave up or whose time is up,
runs one model call for every admitted item, and answers the items whose searches ended. A
request that arrives while a large one runs is served by the very next call instead of
waiting for it to end, as vLLM does for generation; the pool rations each call's nodes
fairly across requests (``round_nodes``), so a large request cannot make the calls slow.

Admission is fair too: at most ``max_batch`` items of one request search at once, at most
``max_running`` in all, and queued requests take turns, an item each. When a call fails,
the items that shared it are each run again alone (one at a time, nothing joining them), so
a bad item fails only its own future. The interface is MicroBatcher's (batcher.py).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from guardprob.server.batcher import Done, Job, Scheduler

log = logging.getLogger("guardprob.server")


class Member(Protocol):
    """A request's items in the pool's search."""

    @property
    def done(self) -> bool: ...

    def stop(self, item: int) -> None: ...  # end one item's search now, keeping what it reached

    def close(self) -> None: ...  # leave the search (unfinished items stop there)

    def results(self) -> Sequence[Any]: ...  # one per item, once closed


class Pool(Protocol):
    def join(self, key: Hashable, items: Sequence[Any]) -> Member: ...  # a request's items, searched from the next call

    def step(self) -> bool: ...  # one model call for every member; False when none has work

    def close(self) -> None: ...


@dataclass
class _Joined:
    member: Member
    jobs: list[Job]
    started: float = field(default_factory=time.perf_counter)
    sharing: int = 0  # items in the search when it joined (its own included)


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
    ):
        super().__init__(queue_size, "guardprob-continuous")
        self._new_pool = new_pool
        self.max_batch = max_batch
        self.max_running = max(max_running, max_batch)
        self.wait_s = wait_s
        self._on_batch = on_batch or (lambda size: None)
        self._on_fallback = on_fallback or (lambda: None)
        self._pool: Pool | None = None
        self._joined: list[_Joined] = []
        self._thread.start()

    # -- worker ---------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._joined:
                    if self._closing:
                        self._drop_pool()
                        return
                    self._cond.wait()
            try:
                self._admit()
                self._stop_given_up()
                if self._joined:
                    self._pool.step()
                    self._answer_done()
            except BaseException as exc:  # never let the worker die: run what the call held again, alone
                log.exception("continuous batcher: a model call failed")
                self._recover(exc)

    def _admit(self) -> None:
        """Join what is queued, fairly, within the limits; before the first join of an idle
        pool, wait ``wait_s`` for more to arrive (they then share the prefill call)."""
        if self._isolated():
            return
        if not self._joined and self.wait_s > 0:
            with self._cond:
                deadline = time.perf_counter() + self.wait_s
                while len(self._pending) < self.max_batch and not self._closing:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cond.wait(left)
        taken = self._take()
        by_request: dict[int, list[Job]] = {}
        for job in taken:
            if job.future.set_running_or_notify_cancel():  # a request that gave up while queued: dropped
                by_request.setdefault(job.request, []).append(job)
        for jobs in by_request.values():  # each its own share of the calls (the engine prefills them at once)
            self._join(jobs[0].key, jobs)

    def _isolated(self) -> bool:
        """A job running again alone holds the pool to itself: admit one when it is empty."""
        alone = any(job.alone for entry in self._joined for job in entry.jobs)
        if alone:
            return True
        with self._cond:
            first = self._pending[0] if self._pending else None
            if first is None or not first.alone:
                return False
            if self._joined:
                return True  # wait for the others to end
            self._pending.popleft()
        if first.future.abandoned:  # its request gave up meanwhile: nobody reads the answer
            first.future.set_exception(TimeoutError("the request stopped waiting"))
        else:
            self._join(first.key, [first])
        return True

    def _take(self) -> list[Job]:
        """Queued jobs to join now: requests take turns, an item each, within the limits."""
        running: dict[int, int] = {}
        for entry in self._joined:
            for job in entry.jobs:
                if not job.stopped:
                    running[job.request] = running.get(job.request, 0) + 1
        room = self.max_running - sum(running.values())
        taken: list[Job] = []
        with self._cond:
            while room > 0 and self._pending:
                kept: deque[Job] = deque()
                turned: set[int] = set()
                for job in self._pending:
                    if (room > 0 and not job.alone and job.request not in turned
                            and running.get(job.request, 0) < self.max_batch):
                        turned.add(job.request)
                        running[job.request] = running.get(job.request, 0) + 1
                        taken.append(job)
                        room -= 1
                    else:
                        kept.append(job)
                self._pending = kept
                if not turned:
                    break
        return taken

    def _join(self, key: Hashable, jobs: list[Job]) -> None:
        if self._pool is None:
            self._pool = self._new_pool()
        try:
            member = self._pool.join(key, [job.item for job in jobs])
        except Exception as exc:
            if len(jobs) == 1:
                jobs[0].future.set_exception(exc)
                return
            self._on_fallback()
            log.warning("joining %d items failed (%s); joining each alone", len(jobs), exc)
            for job in jobs:  # one bad item must not fail the others: each joins alone
                self._join(key, [job])
            return
        self._on_batch(len(jobs))
        sharing = len(jobs) + sum(not j.stopped for e in self._joined for j in e.jobs)
        self._joined.append(_Joined(member, jobs, sharing=sharing))

    def _stop_given_up(self) -> None:
        """Stop the items nobody waits for or whose time is up (they answer with what they reached)."""
        now = time.perf_counter()
        for entry in self._joined:
            for i, job in enumerate(entry.jobs):
                if self._given_up(job, now):
                    job.stopped = True
                    entry.member.stop(i)

    def _answer_done(self) -> None:
        for entry in [e for e in self._joined if e.member.done]:
            self._joined.remove(entry)
            try:  # what fails here is this request's alone: the search goes on for the others
                entry.member.close()
                results = list(entry.member.results())
                if len(results) != len(entry.jobs):
                    raise RuntimeError(f"{len(results)} results for {len(entry.jobs)} items")
            except Exception as exc:
                log.exception("continuous batcher: reading a finished request's results")
                for job in entry.jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            run_s = time.perf_counter() - entry.started
            for job, value in zip(entry.jobs, results):
                if not job.future.done():
                    job.future.set_result(Done(value, entry.sharing, entry.started - job.submitted, run_s))

    def _recover(self, exc: BaseException) -> None:
        """A call failed: its pool is dropped. A job that ran alone fails; the others run again
        alone, before anything queued."""
        joined, self._joined = self._joined, []
        self._drop_pool()
        again = []
        for entry in joined:
            for job in entry.jobs:
                if job.future.done():
                    continue
                if job.alone or (len(joined) == 1 and len(entry.jobs) == 1):
                    job.future.set_exception(exc)
                else:
                    job.alone, job.stopped = True, False  # stopped again at once if its time is up
                    again.append(job)
        if again:
            self._on_fallback()
        with self._cond:
            self._pending.extendleft(reversed(again))

    def _drop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                pool.close()
            except Exception:  # a pool whose call failed may fail to close too; its engine state goes with it
                log.exception("closing a failed pool")
