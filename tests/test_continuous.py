"""Continuous batching: requests join a running search between model calls.

Searches that join a pool mid-run (any call, any settings, any round budget) keep the bounds
of the brute force and, where no rule cuts them, equal their own runs; a call's nodes are
shared fairly across requests; the scheduler admits requests in turn within its limits and
a failed shared call fails only the item that broke it. CI runs 25 random plans,
``scripts/deep_check.sh`` 400.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardprob.backends.base import Query
from guardprob.core.search import _water_fill
from guardprob.errors import InputError
from guardprob.server.continuous import ContinuousBatcher
from helpers import budget
from oracle import POOL, PROMPT_CHARS, brute, setup

EXAMPLES = budget(25, 400)
SLACK = 2e-6

joiners = st.lists(st.fixed_dictionaries({
    "oracle": st.booleans(),  # the set-up's own prompt (checked against the brute force) or another
    "chars": st.integers(0, 10**6),  # seeds another prompt
    "at": st.integers(0, 4),  # model calls of the pool before it joins
    "stop_after": st.sampled_from([None, None, None, 1, 3]),  # its calls before a deadline stops it
    "search": st.fixed_dictionaries({
        "eps": st.sampled_from([0.0, 1e-3, 0.05, 0.2]),
        "max_nodes": st.sampled_from([None, None, 4, 40]),
        "batch": st.sampled_from([1, 2, 64]),
        "speculate": st.sampled_from([0, 1]),
        "prior": st.sampled_from([0.0, 2.0]),
        "constrained": st.booleans(),
    }),
}), min_size=1, max_size=4)


@dataclass
class _Joined:
    plan: dict
    ids: list[int]
    run: object
    calls: int = 0


def _prompt(s, plan: dict) -> list[int]:
    if plan["oracle"]:
        return list(s.prompt)
    rng = random.Random(plan["chars"])
    return [s.vocab[c] for c in rng.choices(PROMPT_CHARS, k=rng.randint(3, 12))]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(seed=st.integers(0, POOL - 1), plans=joiners, round_nodes=st.sampled_from([None, 1, 3, 16]))
def test_joined_searches_keep_their_bounds_and_equal_their_own_runs(seed, plans, round_nodes):
    s = setup(seed)
    clf = s.classifier
    if s.certified:  # keep the trees finite where they are astronomically large
        plans = [{**p, "search": {**p["search"], "eps": max(p["search"]["eps"], 1e-3),
                                  "max_nodes": min(p["search"]["max_nodes"] or 200, 200)}} for p in plans]
    pool = clf.pool(round_nodes)
    waiting = sorted(plans, key=lambda p: p["at"])
    joined: list[_Joined] = []
    calls = 0
    while waiting or not all(j.run.done for j in joined):
        while waiting and waiting[0]["at"] <= calls:
            plan = waiting.pop(0)
            ids = _prompt(s, plan)
            joined.append(_Joined(plan, ids, pool.join([clf._prompt_from_ids(ids)], **plan["search"])))
        for j in joined:
            if j.plan["stop_after"] is not None and j.calls >= j.plan["stop_after"]:
                j.run.stop_all()
        live = [j for j in joined if not j.run.done]
        if pool.step():
            for j in live:
                j.calls += 1
        calls += 1
    for j in joined:
        j.run.close()
    assert pool.members == []
    pool.close()
    for j in joined:
        scores = j.run.results()[0]["marginal"]
        where = f"{s.describe()} {j.plan} round_nodes={round_nodes}"
        assert scores.p_unsafe_lower - SLACK <= scores.p_unsafe <= scores.p_unsafe_upper + SLACK, where
        for c in scores.categories.values():
            assert -SLACK <= c.lower <= c.p <= c.upper <= 1 + SLACK, (where, c)
            assert c.upper - c.lower <= scores.unexplored_mass + SLACK, (where, c)
        if j.plan["oracle"]:  # the brute force's exact values lie within the bounds
            bf = brute(seed, j.plan["search"]["constrained"])
            for k in s.ids:
                low, high = bf.outcome({k})
                c = scores.categories[k]
                assert c.lower <= high + SLACK and c.upper >= low - SLACK, (where, k, c, (low, high))
        stopped = not scores.complete
        if j.plan["search"]["max_nodes"] is None and not stopped:  # no rule cut it: its own run's result
            alone = clf.score_prompts([clf._prompt_from_ids(j.ids)], **j.plan["search"])[0]["marginal"]
            assert alone.expanded_nodes == scores.expanded_nodes, where
            assert abs(alone.p_unsafe - scores.p_unsafe) <= 1e-6, where
            for k, c in scores.categories.items():
                a = alone.categories[k]
                assert abs(a.p - c.p) <= 1e-6 and abs(a.lower - c.lower) <= 1e-6 and abs(a.upper - c.upper) <= 1e-6, (where, k)


@given(demands=st.lists(st.integers(0, 100), max_size=12), budget=st.integers(0, 300))
def test_water_fill_is_fair(demands, budget):
    out = _water_fill(demands, budget)
    assert sum(out) <= budget and all(0 <= o <= d for o, d in zip(out, demands))
    if sum(demands) <= budget:
        assert out == demands
    short = [o for o, d in zip(out, demands) if o < d]
    if short:  # nobody is served more than one above anyone left short
        assert max(out) <= min(short) + 1
        assert sum(out) >= budget - len(demands)  # integer shares waste less than one node each


def _recording(clf):
    """The classifier on an engine that records each call's queries as (prompt, path)."""
    import copy

    from guardprob.backends.base import begin as begin_session

    calls: list[list[int]] = []

    class Session:
        def __init__(self, inner):
            self._inner = inner
            self.usage = inner.usage

        def __getattr__(self, name):  # a stepped prefill's prefill_step and prefilling
            return getattr(self._inner, name)

        def add(self, prompts):
            return self._inner.add(prompts)

        def next_tokens(self, queries):
            calls.append([q.prompt for q in queries])
            return self._inner.next_tokens(queries)

        def release(self, *args):
            self._inner.release(*args)

        def close(self):
            self._inner.close()

    class Engine:
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def open(self, prompts):
            return Session(self._inner.open(prompts))

        def begin(self, prompts):  # the classifier opens sessions that prefill in steps
            return Session(begin_session(self._inner, prompts))

    out = copy.copy(clf)
    out.backend = Engine(clf.backend)
    return out, calls


def test_a_small_request_gets_its_share_of_every_call(tiny_classifier):
    """A request of six wide searches and one of a single search share calls of 16 nodes: the
    small one's search takes its whole round in each of them (8 would be its share), the large
    one the rest, and no call holds more than the budget."""
    clf, calls = _recording(tiny_classifier)
    pool = clf.pool(round_nodes=16)
    big = pool.join([clf.prompt(f"tell me about thing {i}") for i in range(6)], eps=0.0, max_nodes=300, batch=64,
                    prior=0.0, speculate=0)
    assert pool.step()
    small = pool.join([clf.prompt("How do I hit a man")], eps=0.01, batch=8, prior=0.0, speculate=0)
    (search,) = [pool.running.searches[i] for i in small._ids]
    both = 0
    while not small.done:
        wants, big_wants = search.wants(), sum(pool.running.searches[i].wants() for i in big._ids if not pool.running.searches[i].done)
        made = len(calls)
        pool.step()
        if len(calls) == made:  # a step of a prompt's prefill: no tree call
            continue
        last = calls[-1]
        if big_wants and wants:
            both += 1
            assert len(last) <= max(16, 7), last  # no speculation here: the budget, or a node per search
            assert sum(p >= 6 for p in last) == min(wants, 8 if big_wants >= 8 else 16 - big_wants), (last, wants)
    assert both >= 2
    small.close()
    alone = tiny_classifier.score("How do I hit a man", eps=0.01, batch=8, prior=0.0, speculate=0)
    assert abs(small.results()[0]["marginal"].p_unsafe - alone.p_unsafe) <= 1e-6
    big.close()
    pool.close()


def test_a_pool_needs_an_engine_that_takes_prompts_mid_run(tiny_classifier):
    import copy

    clf = copy.copy(tiny_classifier)

    class Fixed:
        name = "fixed"

        def __getattr__(self, name):
            if name == "joinable":
                raise AttributeError(name)
            return getattr(tiny_classifier.backend, name)

    clf.backend = Fixed()
    assert not clf.joinable
    with pytest.raises(InputError, match="take no prompts once open"):
        clf.pool()
    run = tiny_classifier.start([tiny_classifier.prompt("hello")], eps=0.2)
    with pytest.raises(InputError, match="round_nodes"):
        tiny_classifier.pool(round_nodes=0).join([tiny_classifier.prompt("hello")])
    run.finish()


def test_leaving_the_pool_frees_the_engine_rows(tiny_classifier):
    """A closed run's prompts leave the engine (its rows and root distributions), so a pool
    that serves for a long time holds only what runs now."""
    pool = tiny_classifier.pool()
    for i in range(5):
        run = pool.join([tiny_classifier.prompt(f"message {i}")], eps=0.2)
        while not run.done:
            pool.step()
        run.close()
    session = pool.running.session
    assert session.active == [] and session.root == {} and session.rows == {} and session.layers == []
    assert pool.running.searches == {}
    pool.close()


# -- the scheduler ----------------------------------------------------------------------------
class FakeMember:
    def __init__(self, pool, key, items):
        self.pool, self.key, self.items = pool, key, list(items)
        self.left = [int(str(i).split(":")[1]) if ":" in str(i) else 1 for i in items]  # steps each needs
        self.stopped: set[int] = set()
        self.closed = False

    @property
    def done(self):
        return all(n <= 0 for n in self.left)

    def stop(self, item):
        self.stopped.add(item)
        self.left[item] = 0

    def close(self):
        self.closed = True

    def results(self):
        if any("ERR" in str(i) for i in self.items):
            raise ValueError("its scores could not be read")
        return [f"{self.key}/{i}" + ("(stopped)" if n in self.stopped else "") for n, i in enumerate(self.items)]


class FakePool:
    """Members need ``item:N`` steps; a step with a BAD item live fails."""

    opened = 0

    def __init__(self, log):
        self.log, self.members = log, []
        FakePool.opened += 1

    def join(self, key, items):
        if any("BOOM" in str(i) for i in items):
            raise ValueError("bad item at join")
        self.log.append(("join", key, tuple(items)))
        m = FakeMember(self, key, items)
        self.members.append(m)
        return m

    def step(self):
        time.sleep(0.001)  # a model call takes time
        live = [m for m in self.members if not m.done and not m.closed]
        if any("BAD" in str(i) for m in live for n, i in enumerate(m.items) if m.left[n] > 0):
            raise RuntimeError("the call failed")
        self.log.append(("step", tuple(sorted(i for m in live for n, i in enumerate(m.items) if m.left[n] > 0))))
        for m in live:
            m.left = [n - 1 for n in m.left]
        return bool(live)

    def close(self):
        self.log.append(("close",))


def _batcher(log, **kw):
    return ContinuousBatcher(lambda: FakePool(log), wait_s=0.0, **kw)


def test_requests_take_turns_within_the_limits():
    log: list = []
    batcher = _batcher(log, max_batch=2, max_running=3)
    with batcher._cond:  # both queued before the worker looks
        big = batcher.submit("k", [f"a{i}:3" for i in range(5)])
        small = batcher.submit("k", ["b0:1"])
    assert [f.result(5).value for f in small] == ["k/b0:1"]
    values = [f.result(5).value for f in big]
    assert values == [f"k/a{i}:3" for i in range(5)]
    joins = [e for e in log if e[0] == "join"]
    first_step = log.index(next(e for e in log if e[0] == "step"))
    early = [i for e in log[:first_step] if e[0] == "join" for i in e[2]]
    # the first admission: at most two of the large request (its cap) and the small one, three in all
    assert "b0:1" in early and sum(i.startswith("a") for i in early) == 2 and len(early) == 3, log
    for event in log:
        if event[0] == "step":
            assert sum(i.startswith("a") for i in event[1]) <= 2, log  # the per-request cap holds in every call
    assert sum(len(e[2]) for e in joins) == 6
    batcher.close(5)


def test_a_request_arriving_mid_run_joins_the_next_call():
    log: list = []
    batcher = _batcher(log, max_batch=4, max_running=8)
    long = batcher.submit("k", ["long:400"])
    while not any(e[0] == "step" for e in log):
        time.sleep(0.001)
    late = batcher.submit("other", ["late:2"])[0]
    assert late.result(5).value == "other/late:2"
    assert not long[0].done()  # it joined while the long one ran, and finished first
    steps = [e[1] for e in log if e[0] == "step"]
    assert any(set(s) == {"long:400", "late:2"} for s in steps)  # one call served both
    assert long[0].result(5).value == "k/long:400"
    batcher.close(5)


def test_a_failed_call_fails_only_the_item_that_broke_it():
    log: list = []
    fallbacks = []
    batcher = ContinuousBatcher(lambda: FakePool(log), wait_s=0.05, max_batch=8, max_running=8,
                                on_fallback=lambda: fallbacks.append(1))
    good = batcher.submit("k", ["x:2", "y:3"])
    bad = batcher.submit("k", ["BAD:2"])
    other = batcher.submit("j", ["z:1"])
    boom = batcher.submit("k", ["BOOM", "w:1"])
    assert [f.result(5).value for f in good] == ["k/x:2", "k/y:3"]
    assert other[0].result(5).value == "j/z:1"
    with pytest.raises(RuntimeError, match="the call failed"):
        bad[0].result(5)
    with pytest.raises(ValueError, match="bad item at join"):
        boom[0].result(5)
    assert boom[1].result(5).value == "k/w:1"
    assert fallbacks  # counted for the metrics
    unread, fine = batcher.submit("k", ["ERR:2"]), batcher.submit("k", ["after:3"])
    with pytest.raises(ValueError, match="could not be read"):
        unread[0].result(5)
    assert fine[0].result(5).value == "k/after:3"  # the search went on for the others
    batcher.close(5)


def test_stopped_and_abandoned_items_end_at_the_next_call():
    log: list = []
    batcher = _batcher(log, max_batch=4, max_running=4)
    soon = time.perf_counter() + 0.05
    timed = batcher.submit("k", ["t:100000"], answer_by=soon)[0]
    assert timed.result(5).value == "k/t:100000(stopped)"
    left = batcher.submit("k", ["gone:100000"])
    while not any("gone:100000" in e[1] for e in log if e[0] == "step"):
        time.sleep(0.001)
    batcher.abandon(left)
    at = len(log)
    fresh = batcher.submit("k", ["fresh:1"])[0]
    assert fresh.result(5).value == "k/fresh:1"
    time.sleep(0.05)
    assert sum("gone:100000" in e[1] for e in log[at:] if e[0] == "step") <= 1  # the call under way at most
    batcher.close(5)


def test_a_long_lived_session_gives_memory_back(tiny_classifier):
    """Prompts joining and leaving a session for long: its key/value buffers grow with what it
    holds and shrink back when that is gone (rows and slots), and answers stay exact."""
    session = tiny_classifier.backend.open([tiny_classifier.prompt("a short one")])
    long = [tiny_classifier.prompt("a much longer message " * 12 + str(i)) for i in range(8)]
    base = session.add(long)
    cands = np.arange(8, dtype=np.int64)
    session.next_tokens([Query(base + i, (5,), cands) for i in range(8)])
    grown = session.layers[0].keys.shape
    assert session.layers[0].rows == 9 and grown[0] >= 9
    for i in range(8):
        session.release(base + i)
    rows, _, slots, _ = session.layers[0].keys.shape
    fill = session.rows[0].fill
    assert session.layers[0].rows == 1 and rows <= 4 and slots <= fill + fill // 4 + 64 < grown[2]
    fresh = tiny_classifier.backend.open([tiny_classifier.prompt("a short one")])
    q = [Query(0, (5, 6), cands)]
    np.testing.assert_allclose(session.next_tokens(q)[0].logprobs, fresh.next_tokens(q)[0].logprobs, atol=1e-5)


@pytest.mark.parametrize("round_nodes", [1, 5, 16])
@pytest.mark.parametrize("guesses", [False, True], ids=["no-guesses", "guesses"])
def test_a_run_of_its_own_keeps_each_call_within_its_round_budget(tiny_classifier, round_nodes, guesses):
    """``start(round_nodes=N)`` (what the interleaving scheduler opens): no tree call holds more
    than N nodes, or one per search where more searches want in, the children and history's
    guesses asked ahead included, and every score equals the unrationed run's; only the number
    of calls grows."""
    texts = [f"tell me about thing {i}" for i in range(4)]
    # no rule that order cuts; with guesses, speculation and a history of the same searches
    settings_ = {"eps": 1e-3, "max_nodes": None, "batch": 64, "prior": 2.0 if guesses else 0.0,
                 "speculate": 1 if guesses else 0}
    if guesses:
        tiny_classifier.score_batch(texts, **settings_)  # the history the guesses come from
    scores = {}
    for budget_ in (None, round_nodes):
        clf, calls = _recording(tiny_classifier)
        run = clf.start([clf.prompt(t) for t in texts], round_nodes=budget_, **settings_)
        while run.step():
            pass
        scores[budget_] = [r["marginal"] for r in run.results()]
        if budget_ is not None:
            assert calls and all(len(c) <= max(budget_, len(texts)) for c in calls), [len(c) for c in calls]
            assert max(len(c) for c in calls) == max(budget_, len(texts))  # the searches wanted more than that
        else:
            unrationed_calls = len(calls)
    assert len(calls) > unrationed_calls  # the budget did cut the rounds
    for a, b in zip(scores[None], scores[round_nodes]):
        assert abs(a.p_unsafe - b.p_unsafe) <= 1e-6 and a.expanded_nodes == b.expanded_nodes
        for cid in a.categories:
            assert abs(a.categories[cid].p - b.categories[cid].p) <= 1e-6, cid
