"""The scheduler: one worker thread runs the model, one call at a time, for every request.

One loop, in the shape of vLLM's engine loop. Between two model calls the worker

1. **admits** what is queued, as its policy says (below); an item whose ``answer_by`` time
   has passed while it waited is admitted at once, out of turn, so that it is answered;
2. **drops what was given up**: an item whose request stopped waiting (``abandon``) or whose
   ``answer_by`` time has come is stopped, keeping the bounds it reached; a group whose items
   are all stopped is answered after its next step (which only frees its work), whatever
   that step returns;
3. **steps**: one model call, for the groups the policy picks;
4. **answers** the groups whose work is over;
5. **recovers** when a call (or opening or reading a group) failed: the items it held are each
   run again alone, so a bad item fails only its own future.

Every step is one model call and nothing here assumes a step is short or that a prompt's
prefill is one step: a long prompt is a sequence of steps like any search round, and the
policies share the worker by steps, so a short request waits at most one step of another
group per turn. Model work stays on the worker thread, off the event loop, and one thread
means the model is never entered twice at once. The queue is bounded so an overloaded server
refuses work (503) instead of answering everything late.

Two policies decide what a step serves:

- ``Interleave``: each batch of like items is a run of its own (``start(key, items)``), and
  the worker shares its time equally among the open runs, a model call at a time;
- ``Join``: every request joins one running search (a ``Pool``) at its next call, and each
  call serves them all (continuous batching, for engines whose sessions take prompts mid-run).
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

Clock = Callable[[], float]


class Run(Protocol):
    """What ``start(key, items)`` returns: a batched job that advances one model call per step."""

    def step(self) -> bool: ...  # False once every item is done

    def stop(self, item: int) -> None: ...  # end one item's work now, keeping what it reached

    def close(self) -> None: ...

    def results(self) -> Sequence[Any]: ...  # one per item, once done or every item is stopped

    # Optional: ``stop_on(event, deadline)`` lets the run's engine stop a model call in flight
    # once ``event`` is set or at ``deadline`` (an instant on the scheduler's clock); the call
    # then ends the run's work early, with the bounds reached (the openai engine's HTTP rounds).


class Member(Protocol):
    """A request's items in a pool's search."""

    @property
    def done(self) -> bool: ...

    def stop(self, item: int) -> None: ...  # end one item's search now, keeping what it reached

    def close(self) -> None: ...  # leave the search (unfinished items stop there)

    def results(self) -> Sequence[Any]: ...  # one per item, once closed


class Pool(Protocol):
    def join(self, key: Hashable, items: Sequence[Any]) -> Member: ...  # items searched from the next call

    def step(self) -> bool: ...  # one model call for every member; False when none has work

    def close(self) -> None: ...


StartFn = Callable[[Hashable, Sequence[Any]], Run]


class QueueFull(Exception):
    """The queue holds ``queue_size`` items already; retry later."""


class BatcherClosed(Exception):
    """The scheduler is shutting down and takes no new work."""


@dataclass(frozen=True)
class Done:
    """What a future resolves to: the item's result and how it was scored."""

    value: Any
    batch_size: int  # items sharing the calls that produced the value (1 after a fallback)
    queued_s: float  # from submit to the start of its group
    run_s: float  # from the start of its group to its answer


class Ticket(Future):
    """An item's future; ``abandoned`` once its request stopped waiting for it."""

    def __init__(self, answer_by: float | None = None):
        super().__init__()
        self.answer_by = answer_by  # a clock instant: answer with what is reached then
        self.abandoned = False


@dataclass
class Job:
    key: Hashable
    item: Any
    future: Ticket
    submitted: float
    request: int = 0  # which submit() it came with
    stopped: bool = False
    alone: bool = False  # a call it shared failed: it runs again with nothing beside it

    def overdue(self, now: float) -> bool:
        return self.future.answer_by is not None and now >= self.future.answer_by


@dataclass(eq=False)
class Group:
    """Jobs opened together and what scores them (a run, or a request's member of a pool)."""

    handle: Any  # Run or Member: stop(i), close(), results()
    jobs: list[Job]
    started: float
    order: int  # when it opened, among all groups
    sharing: int  # items sharing its calls when it opened (Done.batch_size)
    spent: float = 0.0  # worker seconds of the calls that served it
    head: float | None = None  # Interleave: its share of the worker is counted from here (head + spent)
    turn: int = -1  # the step that last served it (-1: none yet)
    finished: bool = False  # its work is over: answer it
    ending: bool = False  # every item is stopped: answered after its next step, whatever that returns
    given_up: threading.Event | None = None  # set once no item is waited for: a call in flight stops (stop_on)

    @property
    def live(self) -> int:
        return sum(not job.stopped and not job.future.done() for job in self.jobs)


class Policy(Protocol):
    """What a step serves. ``admit`` opens groups from the queue (``Scheduler.take``,
    ``Scheduler.open``); ``pick`` chooses the groups the next call serves; ``step`` runs that
    call and marks the groups whose work is over; ``discard`` lets go of groups that failed
    (``call``: in a model call); ``close`` frees what the policy holds at shutdown."""

    name: str

    def admit(self, scheduler: Scheduler) -> None: ...

    def open(self, key: Hashable, items: Sequence[Any]) -> Any: ...

    def pick(self, groups: list[Group]) -> list[Group]: ...

    def step(self, served: list[Group]) -> None: ...

    def discard(self, groups: list[Group], call: bool) -> None: ...

    def close(self) -> None: ...


class Scheduler:
    """A bounded queue that takes a request's items all or none, tickets a request can give
    up, and the one worker loop (see the module docstring) that serves them under ``policy``.

    ``on_batch(size)`` is called as each group opens (metrics); ``on_fallback()`` when a
    shared call failed and its items run again alone. ``clock`` measures ``answer_by`` and the
    worker's time (tests pass a fake one)."""

    def __init__(
        self,
        policy: Policy,
        *,
        queue_size: int = 256,
        wait_s: float = 0.01,
        on_batch: Callable[[int], None] | None = None,
        on_fallback: Callable[[], None] | None = None,
        clock: Clock = time.perf_counter,
        name: str = "guardprob-scheduler",
    ):
        self.policy = policy
        self.queue_size = queue_size
        self.wait_s = wait_s
        self.clock = clock
        self._on_batch = on_batch or (lambda size: None)
        self._on_fallback = on_fallback or (lambda: None)
        self._pending: deque[Job] = deque()
        self._groups: list[Group] = []
        self._cond = threading.Condition()
        self._closing = False
        self._requests = itertools.count()
        self._opened = itertools.count()
        self._turns = itertools.count()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    # -- the public face ----------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Items waiting to be started (not counting those running)."""
        return len(self._pending)

    @property
    def running(self) -> int:
        """Items being scored now (not stopped)."""
        return sum(group.live for group in list(self._groups))

    def submit(self, key: Hashable, items: Sequence[Any], answer_by: float | None = None) -> list[Ticket]:
        """Queue all ``items`` or none of them (so a request never half-enters the queue)."""
        now = self.clock()
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

    def abandon(self, tickets: Sequence[Future]) -> None:
        """The request stopped waiting: queued items are dropped, running ones stopped at the next
        step, or in the call under way where the run's engine can stop one (``stop_on``) and no
        other request waits for that run."""
        for ticket in tickets:
            if isinstance(ticket, Ticket):
                ticket.abandoned = True
            ticket.cancel()
        for group in list(self._groups):  # read from the request's thread: a copy, the worker may change it
            if group.given_up is not None and all(job.future.done() or job.future.abandoned for job in group.jobs):
                group.given_up.set()

    def close(self, timeout: float | None = None) -> None:
        """Take no new items, finish those queued and running, then stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- for policies ---------------------------------------------------------------------
    def take(self, choose: Callable[[deque[Job]], list[Job]], gather: int = 0) -> list[Job]:
        """Remove the jobs ``choose(queue)`` names from the queue, in queue order. With ``gather``
        set, first wait up to ``wait_s`` until ``choose`` names that many (what arrives then
        shares the first call). Jobs whose request gave up while queued are dropped."""
        with self._cond:
            if gather and self.wait_s > 0 and self._pending:
                deadline = time.perf_counter() + self.wait_s
                while not self._closing and len(choose(self._pending)) < gather:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            ids = {id(job) for job in choose(self._pending)}
            chosen = [job for job in self._pending if id(job) in ids]
            if chosen:
                self._pending = deque(job for job in self._pending if id(job) not in ids)
        # a job run again after a failed call is running already
        return [job for job in chosen if job.future.running() or job.future.set_running_or_notify_cancel()]

    def queued(self, test: Callable[[Job], bool]) -> bool:
        """Whether a queued job passes ``test``."""
        with self._cond:
            return any(test(job) for job in self._pending)

    def groups(self) -> list[Group]:
        return self._groups

    def open(self, jobs: list[Job]) -> None:
        """Open a group over ``jobs`` (one key); a failure to open is recovered like a failed call."""
        if not jobs:
            return
        sharing = len(jobs) + (self.running if getattr(self.policy, "shares_calls", False) else 0)
        self._on_batch(len(jobs))
        try:
            handle = self.policy.open(jobs[0].key, [job.item for job in jobs])
        except Exception as exc:
            self._recover(jobs, exc)
            return
        group = Group(handle, jobs, self.clock(), next(self._opened), sharing)
        stop_on = None if getattr(self.policy, "shares_calls", False) else getattr(handle, "stop_on", None)
        if stop_on is not None:  # (a call shared with other requests is never stopped for one)
            # a call in flight stops once nobody waits (abandon), or when every item's time is up
            times = [job.future.answer_by for job in jobs]
            group.given_up = threading.Event()
            stop_on(group.given_up, None if None in times else max(times))
        self._groups.append(group)

    # -- the worker -----------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._groups:
                    if self._closing:
                        self._close_policy()
                        return
                    self._cond.wait()
            try:
                self._admit()
                self._drop_given_up()
                self._step()
            except BaseException as exc:  # a fault of the loop itself: never let the worker die
                log.exception("scheduler worker error")
                groups, self._groups = self._groups, []
                self._discard(groups, True)
                for group in groups:
                    for job in group.jobs:
                        if not job.future.done():
                            job.future.set_exception(exc)

    def _admit(self) -> None:
        """Overdue and alone jobs first, then what the policy admits."""
        now = self.clock()

        def overdue(queue: deque[Job]) -> list[Job]:
            return [job for job in queue if job.overdue(now) or job.future.cancelled()]

        by_request: dict[Hashable, list[Job]] = {}
        for job in self.take(overdue):  # answered now with what they reach (nothing): a deadline always answers
            by_request.setdefault(id(job) if job.alone else job.request, []).append(job)
        for jobs in by_request.values():
            self.open(jobs)
        self.policy.admit(self)

    def _drop_given_up(self) -> None:
        """Stop what nobody waits for or whose time is up, keeping what it reached."""
        now = self.clock()
        for group in list(self._groups):
            try:
                for i, job in enumerate(group.jobs):
                    if not job.stopped and (job.future.abandoned or job.overdue(now)):
                        job.stopped = True
                        group.handle.stop(i)
            except Exception as exc:
                self._fail_groups([group], exc, call=False)
                continue
            if group.live == 0:
                group.ending = True  # its next step frees its work (no model call); then it is answered

    def _step(self) -> None:
        served = self.policy.pick(self._groups) if self._groups else []
        if not served:
            return
        turn = next(self._turns)
        started = self.clock()
        try:
            self.policy.step(served)
        except Exception as exc:
            self._fail_groups(served, exc)
            return
        finally:
            took = self.clock() - started
            for group in served:
                group.spent += took
                group.turn = turn
                group.finished |= group.ending
        self._answer()

    def _answer(self) -> None:
        for group in [g for g in self._groups if g.finished]:
            self._groups.remove(group)
            try:
                group.handle.close()
                results = list(group.handle.results())
                if len(results) != len(group.jobs):
                    raise RuntimeError(f"{len(results)} results for {len(group.jobs)} items")
            except Exception as exc:
                log.exception("reading a finished group's results")
                self._recover(group.jobs, exc)
                continue
            now = self.clock()
            for job, value in zip(group.jobs, results):
                if not job.future.done():
                    job.future.set_result(Done(value, group.sharing, group.started - job.submitted, now - group.started))

    def _fail_groups(self, groups: list[Group], exc: Exception, call: bool = True) -> None:
        """A call that served ``groups`` failed (or, ``call`` false, stopping an item of one):
        let them go and run their items again alone."""
        log.warning("a model call failed (%s: %s)", type(exc).__name__, exc)
        for group in groups:
            if group in self._groups:
                self._groups.remove(group)
        self._discard(groups, call)
        self._recover([job for group in groups for job in group.jobs], exc)

    def _recover(self, jobs: list[Job], exc: BaseException) -> None:
        """The one failure path: a lone item fails; several each run again alone, before
        anything queued. An item nobody waits for any more is not run again."""
        live = [job for job in jobs if not job.future.done()]
        if len(live) <= 1:
            for job in live:
                job.future.set_exception(exc)
            return
        again = []
        for job in live:
            if job.future.abandoned:
                job.future.set_exception(TimeoutError("the request stopped waiting"))
            else:
                job.alone, job.stopped = True, False  # stopped again at once if its time is up
                again.append(job)
        if again:
            self._on_fallback()
            log.warning("%d items shared a failed call; each runs again alone", len(again))
        with self._cond:
            self._pending.extendleft(reversed(again))

    def _discard(self, groups: list[Group], call: bool) -> None:
        try:
            self.policy.discard(groups, call)
        except Exception:  # what failed may fail to close too; its engine state goes with it
            log.exception("letting go of a failed call's work")

    def _close_policy(self) -> None:
        try:
            self.policy.close()
        except Exception:
            log.exception("closing the scheduler's policy")


def _take_turns(queue: deque[Job], room: int, per_request: int, running: dict[int, int],
                matches: Callable[[Job], bool] = lambda job: True) -> list[Job]:
    """Queued jobs to start now: requests take turns, an item each, at most ``per_request``
    of one request running and ``room`` in all; only jobs ``matches`` accepts."""
    counts = dict(running)
    taken: list[Job] = []
    waiting = [job for job in queue if not job.alone and matches(job)]
    while room > 0 and waiting:
        turned: set[int] = set()
        kept = []
        for job in waiting:
            if room > 0 and job.request not in turned and counts.get(job.request, 0) < per_request:
                turned.add(job.request)
                counts[job.request] = counts.get(job.request, 0) + 1
                taken.append(job)
                room -= 1
            else:
                kept.append(job)
        waiting = kept
        if not turned:
            break
    return taken


def _running_by_request(groups: list[Group]) -> dict[int, int]:
    running: dict[int, int] = {}
    for group in groups:
        for job in group.jobs:
            if not job.stopped and not job.future.done():
                running[job.request] = running.get(job.request, 0) + 1
    return running


@dataclass
class Interleave:
    """Runs of their own, interleaved: queued items with equal keys form a run of up to
    ``max_batch``, and the worker takes turns among the open runs, a model call each.

    A new run opens between any two calls while at most ``max_running`` items run and every
    open run has had ``quantum_s`` of the worker (so under steady traffic what arrives
    meanwhile gathers into one larger run); at most ``max_batch`` items of one request run at
    once, so a large request leaves room for others. The worker's time is shared equally
    among the open runs, a newcomer first for up to ``quantum_s`` (``pick``): a short request
    that arrives behind a long one is served almost as if alone, and at worst in twice its
    time alone plus one call of the long one. Items with an ``answer_by`` time share a run
    only with their own request's, so that their answer never waits for someone else's search."""

    start: StartFn
    max_batch: int = 16
    max_running: int = 32
    quantum_s: float = 0.25
    name: str = field(default="interleaved", init=False)
    shares_calls: bool = field(default=False, init=False)

    def admit(self, scheduler: Scheduler) -> None:
        # items that ran in a failed call: each a run of its own, at once
        for job in scheduler.take(lambda queue: [j for j in queue if j.alone]):
            scheduler.open([job])
        while True:
            groups = scheduler.groups()
            if any(g.spent < self.quantum_s for g in groups if not g.finished):
                return
            running = _running_by_request(groups)
            room = self.max_running - sum(running.values())
            if room <= 0:
                return

            def batch(queue: deque[Job], room: int = room, running: dict[int, int] = running) -> list[Job]:
                first = next((j for j in queue if not j.alone and running.get(j.request, 0) < self.max_batch), None)
                if first is None:
                    return []
                like = _batch_key(first)
                return _take_turns(queue, min(room, self.max_batch), self.max_batch, running,
                                   lambda job: _batch_key(job) == like)

            jobs = scheduler.take(batch, gather=0 if groups else self.max_batch)
            if not jobs:
                return
            scheduler.open(jobs)

    def open(self, key: Hashable, items: Sequence[Any]) -> Run:
        return self.start(key, items)

    def pick(self, groups: list[Group]) -> list[Group]:
        """The run that has had the least of the worker's time, counted from the least of the
        others' less a quantum when it opened: a newcomer has up to ``quantum_s`` before it
        shares, then every open run gets an equal share of the worker, whatever its calls cost."""
        placed = [g.head + g.spent for g in groups if g.head is not None]
        floor = min(placed) if placed else 0.0
        for group in groups:
            if group.head is None:
                group.head = floor - self.quantum_s
        # a run whose items are all stopped first: its step only frees its work
        return [min(groups, key=lambda g: (not g.ending, g.head + g.spent, g.turn, g.order))]

    def step(self, served: list[Group]) -> None:
        for group in served:
            group.finished = not group.handle.step()

    def discard(self, groups: list[Group], call: bool) -> None:
        for group in groups:
            try:
                group.handle.close()
            except Exception:  # a run that failed may fail to close too; its engine state goes with it
                log.exception("closing a failed run")

    def close(self) -> None:
        pass


def _batch_key(job: Job) -> Hashable:
    """Jobs that may share a run: equal keys; one with an ``answer_by`` time only with its own request's."""
    return job.key, (job.request if job.future.answer_by is not None else None)


@dataclass
class Join:
    """Continuous batching: every request joins one running search (``new_pool()``, again
    after a failed call) at its next model call, and each call serves all of them (the pool
    rations a call's nodes fairly across requests). At most ``max_batch`` items of one request
    search at once, at most ``max_running`` in all, and queued requests take turns, an item
    each; an item that runs again after a failed call holds the pool alone."""

    new_pool: Callable[[], Pool]
    max_batch: int = 16
    max_running: int = 32
    name: str = field(default="continuous", init=False)
    shares_calls: bool = field(default=True, init=False)
    _pool: Pool | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.max_running = max(self.max_running, self.max_batch)

    def admit(self, scheduler: Scheduler) -> None:
        groups = scheduler.groups()
        if any(job.alone for g in groups for job in g.jobs if not job.future.done()):
            return  # one runs again alone: nothing joins it
        if scheduler.queued(lambda job: job.alone):
            if not groups:
                alone = scheduler.take(lambda queue: [j for j in queue if j.alone][:1])
                scheduler.open(alone)
            return  # else wait for the pool to empty
        running = _running_by_request(groups)
        room = self.max_running - sum(running.values())
        taken = scheduler.take(lambda queue: _take_turns(queue, room, self.max_batch, running),
                               gather=0 if groups else self.max_batch)
        by_request: dict[int, list[Job]] = {}
        for job in taken:
            by_request.setdefault(job.request, []).append(job)
        for jobs in by_request.values():  # each request its own share of the calls
            scheduler.open(jobs)

    def open(self, key: Hashable, items: Sequence[Any]) -> Member:
        if self._pool is None:
            self._pool = self.new_pool()
        return self._pool.join(key, items)

    def pick(self, groups: list[Group]) -> list[Group]:
        return list(groups)

    def step(self, served: list[Group]) -> None:
        if self._pool is not None:
            self._pool.step()
        for group in served:
            group.finished = group.handle.done

    def discard(self, groups: list[Group], call: bool) -> None:
        """A failed call: the pool goes (with every member in it); the next join opens a new one.
        Otherwise only the groups leave it."""
        if call:
            self.close()
            return
        for group in groups:
            group.handle.close()

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
