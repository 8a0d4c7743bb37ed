"""The scheduler's one loop, under both policies, with fake runs on a fake clock.

A fake item needs ``prefill`` steps that produce nothing (a long prompt's prefill, one chunk
per step), then ``steps`` search steps; each step costs its items' ``cost`` seconds of the
fake clock. Every step is logged with the items it served, so fairness is checked in steps,
never in wall time: a short request that arrives behind a long step sequence (a long
prefill, a large request) must be served by the next step and then at least every other
step; an item given up or out of time is stopped at the next step and answered with what it
reached (nothing, if its prefill had not ended); a failed shared step fails only the item
that broke it; closing drains the queue.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from guardprob.server.scheduler import BatcherClosed, Interleave, Join, Scheduler

POLICIES = ("interleaved", "continuous")


class Clock:
    """Model time: only fake steps move it."""

    def __init__(self):
        self.now = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


@dataclass(frozen=True)
class Spec:
    name: str
    steps: int = 1  # search steps
    prefill: int = 0  # steps before the first that reaches anything
    cost: float = 0.01  # model seconds per step
    bad: bool = False  # a step that serves it fails
    unopenable: bool = False  # opening a group with it fails
    unreadable: bool = False  # its group's results cannot be read
    unstoppable: bool = False  # stopping it fails


@dataclass(frozen=True)
class Answer:
    name: str
    reached: int  # search steps done: 0 means bounds [0, 1]
    complete: bool


class Work:
    def __init__(self, spec: Spec):
        self.spec, self.prefill, self.left, self.reached, self.stopped = spec, spec.prefill, spec.steps, 0, False

    @property
    def over(self) -> bool:
        return self.stopped or self.left <= 0

    def advance(self) -> None:
        if self.prefill > 0:
            self.prefill -= 1
        else:
            self.left -= 1
            self.reached += 1

    def answer(self) -> Answer:
        return Answer(self.spec.name, self.reached, not self.stopped)


class Model:
    """What the fakes share: the clock, the log of steps (names served), hooks run in a step."""

    def __init__(self):
        self.clock = Clock()
        self.steps: list[tuple[str, ...]] = []
        self.hooks: dict[int, Callable[[], None]] = {}  # step number -> run during that step
        self.closed: list[tuple[str, ...]] = []

    def call(self, works: list[Work]) -> None:
        live = [w for w in works if not w.over]
        if not live:
            return
        n = len(self.steps)
        self.steps.append(tuple(w.spec.name for w in live))
        self.clock.advance(sum(w.spec.cost for w in live))
        if n in self.hooks:
            self.hooks.pop(n)()
        if any(w.spec.bad for w in live):
            raise RuntimeError("the call failed")
        for w in live:
            w.advance()

    def served(self, name: str) -> list[int]:
        return [i for i, names in enumerate(self.steps) if name in names]


def _open(items) -> list[Work]:
    if any(s.unopenable for s in items):
        raise ValueError("could not open")
    return [Work(s) for s in items]


class FakeRun:
    def __init__(self, model: Model, items):
        self.model, self.works = model, _open(items)

    def step(self) -> bool:
        self.model.call(self.works)
        return not all(w.over for w in self.works)

    def stop(self, item: int) -> None:
        if self.works[item].spec.unstoppable:
            raise RuntimeError("could not stop")
        self.works[item].stopped = True

    def close(self) -> None:
        self.model.closed.append(tuple(w.spec.name for w in self.works))

    def results(self):
        if any(w.spec.unreadable for w in self.works):
            raise ValueError("its results could not be read")
        return [w.answer() for w in self.works]


class FakeMember(FakeRun):
    def __init__(self, model: Model, pool: FakePool, items):
        super().__init__(model, items)
        self.pool = pool

    @property
    def done(self) -> bool:
        return all(w.over for w in self.works)

    def step(self) -> bool:
        raise AssertionError("a pool's member is stepped by its pool")

    def close(self) -> None:
        super().close()
        if self in self.pool.members:
            self.pool.members.remove(self)


class FakePool:
    def __init__(self, model: Model):
        self.model, self.members = model, []

    def join(self, key, items) -> FakeMember:
        member = FakeMember(self.model, self, items)
        self.members.append(member)
        return member

    def step(self) -> bool:
        self.model.call([w for m in self.members for w in m.works])
        return any(not m.done for m in self.members)

    def close(self) -> None:
        for m in list(self.members):
            m.close()


def scheduler(policy: str, model: Model, *, max_batch: int = 16, max_running: int = 32, **kw) -> Scheduler:
    if policy == "interleaved":
        chosen = Interleave(lambda key, items: FakeRun(model, items), max_batch=max_batch, max_running=max_running)
    else:
        chosen = Join(lambda: FakePool(model), max_batch=max_batch, max_running=max_running)
    return Scheduler(chosen, wait_s=0.0, clock=model.clock, **kw)


def _longest_wait(model: Model, name: str, since: int) -> int:
    """Most consecutive steps from step ``since`` on that did not serve ``name``, until its last."""
    served = model.served(name)
    assert served, f"{name} was never served"
    marks = [since - 1] + [i for i in served if i >= since]
    return max(b - a - 1 for a, b in zip(marks, marks[1:]))


class Sent(list):
    """The tickets of a request that a fake step sends (``get`` waits for them)."""

    def __init__(self):
        super().__init__()
        self.ready = threading.Event()

    def get(self, i: int = 0):
        assert self.ready.wait(5), "the step that sends it never ran"
        return self[i]


def _submit_during(model: Model, step: int, sched: Scheduler, key, items, out: Sent, **kw) -> None:
    def send():
        out.extend(sched.submit(key, items, **kw))
        out.ready.set()

    model.hooks[step] = send


# -- fairness: no step sequence holds others -------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
def test_a_long_prefill_does_not_hold_a_short_request(policy):
    """A prompt whose prefill takes 40 steps of 0.3 s: a short request sent during its third
    step is served by the next step and every step after until it is answered."""
    model = Model()
    sched = scheduler(policy, model)
    short = Sent()
    _submit_during(model, 2, sched, "k", [Spec("S", steps=4)], short)
    (long,) = sched.submit("k", [Spec("L", prefill=40, steps=5, cost=0.3)])
    assert short.get().result(5).value == Answer("S", 4, True)
    assert _longest_wait(model, "S", since=3) <= 1, model.steps
    assert model.served("S")[-1] < model.served("L")[-1]
    assert long.result(5).value == Answer("L", 5, True)
    sched.close(5)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_long_short_request_takes_turns_with_long_ones(policy):
    """Two long prefills and a request that is itself long enough to use up its head start:
    each turn, no other group is served more than once between two of its steps."""
    model = Model()
    sched = scheduler(policy, model)
    late = Sent()
    _submit_during(model, 3, sched, "k", [Spec("S", steps=30, cost=0.02)], late)
    with sched._cond:
        longs = sched.submit("a", [Spec("L1", prefill=30, steps=2, cost=0.3)]) + sched.submit(
            "b", [Spec("L2", prefill=30, steps=2, cost=0.3)])
    assert late.get().result(5).value == Answer("S", 30, True)
    assert model.served("S")[0] == 4, model.steps  # the next step
    s_steps = model.served("S")
    for a, b in zip(s_steps, s_steps[1:]):
        others = [n for names in model.steps[a + 1:b] for n in names]
        assert len(others) == len(set(others)), (a, b, model.steps[a:b + 1])  # each other group at most once
    assert [f.result(5).value.complete for f in longs] == [True, True]
    sched.close(5)


def test_interleaved_runs_share_the_worker_by_time_not_by_calls():
    """Calls of a long prompt cost 1 s each, a short request's 0.02 s: taking turns a call each
    would make the short one wait a long call for each of its own. It is answered within
    twice its time alone plus one long call (the goal the head-of-line benchmark measures),
    and the long one is not starved meanwhile."""
    model = Model()
    sched = scheduler("interleaved", model)
    short = Sent()
    sent_at: list[float] = []
    answered: list[float] = []

    def send():
        sent_at.append(model.clock())
        short.extend(sched.submit("k", [Spec("S", steps=30, cost=0.02)]))
        short[0].add_done_callback(lambda _: answered.append(model.clock()))
        short.ready.set()

    model.hooks[2] = send
    (long,) = sched.submit("k", [Spec("L", prefill=30, steps=2, cost=1.0)])
    assert short.get().result(5).value == Answer("S", 30, True)
    alone = 30 * 0.02
    assert answered[0] - sent_at[0] <= 2 * alone + 1.0 + 1e-9, (answered, sent_at, model.steps)
    assert len(model.served("L")) > 3  # it went on while the short one ran
    assert long.result(5).value == Answer("L", 2, True)
    sched.close(5)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_large_request_leaves_room_for_a_small_one(policy):
    """32 texts in one request: at most ``max_batch`` of them run at once, and a one-text
    request sent meanwhile is served by the next step."""
    model = Model()
    sched = scheduler(policy, model, max_batch=16, max_running=32)
    small = Sent()
    _submit_during(model, 1, sched, "k", [Spec("S", steps=3)], small)
    big = sched.submit("k", [Spec(f"B{i}", steps=20, cost=0.05) for i in range(32)])
    assert small.get().result(5).value == Answer("S", 3, True)
    assert _longest_wait(model, "S", since=2) <= 1, model.steps[:6]
    assert all(sum(n.startswith("B") for n in names) <= 16 for names in model.steps)
    assert [f.result(5).value.complete for f in big] == [True] * 32
    sched.close(5)


@pytest.mark.parametrize("policy", POLICIES)
def test_queued_requests_take_turns(policy):
    """Queued before the worker looks: the first admission takes an item of each request in
    turn within the limits, not the first request's items first."""
    model = Model()
    sched = scheduler(policy, model, max_batch=3, max_running=3)
    with sched._cond:  # all queued before the worker looks
        big = sched.submit("k", [Spec(f"A{i}", steps=2) for i in range(5)])
        b = sched.submit("k", [Spec("B")])
        c = sched.submit("k", [Spec("C")])
    for f in big + b + c:
        assert f.result(5).value.complete
    assert set(model.steps[0]) == {"A0", "B", "C"}, model.steps
    assert max(len(names) for names in model.steps) <= 3
    sched.close(5)


# -- giving up --------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
def test_an_abandoned_request_stops_at_the_next_step(policy):
    model = Model()
    sched = scheduler(policy, model)
    with sched._cond:
        gone = sched.submit("k", [Spec("G", prefill=50, steps=1000)])
        other = sched.submit("k", [Spec("O", steps=12)])
    model.hooks[5] = lambda: sched.abandon(gone)
    assert other[0].result(5).value == Answer("O", 12, True)
    assert max(model.served("G")) == 5, model.steps  # none after the step in which it gave up
    sched.close(5)
    assert any("G" in names for names in model.closed)  # its work was let go of


@pytest.mark.parametrize("policy", POLICIES)
def test_a_deadline_in_the_prefill_answers_with_nothing_reached(policy):
    """``answer_by`` passes while the first steps still produce nothing: answered at the next
    step with nothing reached (bounds [0, 1], incomplete), and not served again."""
    model = Model()
    sched = scheduler(policy, model)
    (f,) = sched.submit("k", [Spec("P", prefill=10, steps=3, cost=0.3)], answer_by=0.5)
    assert f.result(5).value == Answer("P", 0, False)
    assert len(model.served("P")) == 2  # 0.3 s, then 0.6 s: past its time
    (g,) = sched.submit("k", [Spec("Q", steps=100, cost=0.1)], answer_by=model.clock() + 0.55)
    assert g.result(5).value == Answer("Q", 6, False)  # the bounds its six steps reached
    sched.close(5)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_deadline_never_waits_for_another_request(policy):
    """A request with a deadline and one without, same key, queued together: the first is
    answered at its time, while the other still runs."""
    model = Model()
    sched = scheduler(policy, model)
    answered: dict[str, float] = {}
    with sched._cond:
        (a,) = sched.submit("k", [Spec("A", steps=100, cost=0.1)])
        (b,) = sched.submit("k", [Spec("B", steps=100, cost=0.1)], answer_by=0.35)
        for name, f in (("A", a), ("B", b)):
            f.add_done_callback(lambda _, name=name: answered.setdefault(name, model.clock()))
    assert b.result(5).value.complete is False and 1 <= b.result().value.reached <= 4
    assert a.result(5).value == Answer("A", 100, True)
    assert answered["B"] <= 1.0 < answered["A"], answered
    sched.close(5)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_deadline_passing_in_the_queue_still_answers(policy):
    """No room to start it: at its ``answer_by`` time it is answered with nothing reached."""
    model = Model()
    sched = scheduler(policy, model, max_batch=1, max_running=1)
    answered: list[float] = []
    queued = Sent()

    def send():
        queued.extend(sched.submit("k", [Spec("Q", steps=5)], answer_by=0.45))
        queued[0].add_done_callback(lambda _: answered.append(model.clock()))
        queued.ready.set()

    with sched._cond:
        (long,) = sched.submit("k", [Spec("L", steps=100, cost=0.1)])
        model.hooks[1] = send
    assert queued.get().result(5).value == Answer("Q", 0, False)
    assert answered[0] <= 0.6 and model.served("Q") == []
    assert long.result(5).value == Answer("L", 100, True)
    sched.close(5)


# -- failures ---------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
def test_a_failed_step_fails_only_the_item_that_broke_it(policy):
    model = Model()
    fallbacks: list[int] = []
    sched = scheduler(policy, model, on_fallback=lambda: fallbacks.append(1))
    with sched._cond:
        good = sched.submit("k", [Spec("x", steps=2), Spec("y", steps=3)])
        bad = sched.submit("k", [Spec("BAD", steps=2, bad=True)])
        other = sched.submit("k", [Spec("z")])
    assert [f.result(5).value for f in good] == [Answer("x", 2, True), Answer("y", 3, True)]
    assert other[0].result(5).value == Answer("z", 1, True)
    with pytest.raises(RuntimeError, match="the call failed"):
        bad[0].result(5)
    assert fallbacks
    assert len(model.steps[model.served("BAD")[0]]) > 1 and ("BAD",) in model.steps  # shared, then alone
    with sched._cond:
        unopened = sched.submit("k", [Spec("U", unopenable=True), Spec("u")])
    with pytest.raises(ValueError, match="could not open"):
        unopened[0].result(5)
    assert unopened[1].result(5).value == Answer("u", 1, True)
    unread, fine = sched.submit("k", [Spec("R", steps=2, unreadable=True)]), sched.submit("k", [Spec("after", steps=3)])
    with pytest.raises(ValueError, match="could not be read"):
        unread[0].result(5)
    assert fine[0].result(5).value == Answer("after", 3, True)
    sched.close(5)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_failure_to_stop_an_item_touches_nobody_else(policy):
    model = Model()
    sched = scheduler(policy, model)
    with sched._cond:
        (stuck,) = sched.submit("k", [Spec("X", steps=100, unstoppable=True)], answer_by=0.05)
        (other,) = sched.submit("j", [Spec("O", steps=20)])
    with pytest.raises(RuntimeError, match="could not stop"):
        stuck.result(5)
    assert other.result(5).value == Answer("O", 20, True)
    assert len(model.served("O")) == 20  # it went on where it was
    sched.close(5)


def test_a_failed_run_leaves_other_runs_alone():
    """Interleaved: a run that fails is the only one touched; another run goes on unaware."""
    model = Model()
    sched = scheduler("interleaved", model)
    (long,) = sched.submit("a", [Spec("L", prefill=5, steps=5, cost=0.3)])
    bad = Sent()
    _submit_during(model, 1, sched, "b", [Spec("BAD", steps=3, bad=True)], bad)
    with pytest.raises(RuntimeError):
        bad.get().result(5)
    assert long.result(5).value == Answer("L", 5, True)
    assert len(model.served("L")) == 10  # not restarted
    sched.close(5)


# -- closing ----------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
def test_close_drains_the_queue(policy):
    model = Model()
    sched = scheduler(policy, model, max_batch=2, max_running=2)
    with sched._cond:
        futures = [f for i in range(6) for f in sched.submit(f"k{i % 2}", [Spec(f"i{i}", steps=3, prefill=2)])]
    sched.close(5)
    assert [f.result(0).value for f in futures] == [Answer(f"i{i}", 3, True) for i in range(6)]
    with pytest.raises(BatcherClosed):
        sched.submit("k", [Spec("late")])
    assert sorted(n for names in model.closed for n in names) == sorted(f"i{i}" for i in range(6))
