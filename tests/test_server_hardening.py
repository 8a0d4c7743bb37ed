"""One bad request never hurts another: deadlines that cancel, interleaved runs, anytime answers."""

from __future__ import annotations

import copy
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardprob.server.config import ServerConfig
from serving import assert_error, post, running, wait_for


class SlowCalls:
    """The tiny classifier on an engine whose model calls take ``delay`` seconds more for every
    64 nodes of a text with 'SLOW' in them (a large request on a slow machine). It counts the
    calls that carried such nodes, and notes when the engine is told to free such a prompt."""

    def __init__(self, clf, delay: float):
        self.clf = copy.copy(clf)
        self.clf.backend = _SlowEngine(clf.backend, self)
        self.delay = delay
        self.slow_steps = 0
        self.slow_stopped = False
        self.mixed_calls = 0  # calls that carried nodes of a slow prompt and of another prompt
        self.tokenizer = clf.tokenizer

    def is_slow(self, prompt) -> bool:
        return "SLOW" in self.tokenizer.decode(list(prompt.ids))


class _SlowEngine:
    def __init__(self, inner, owner: SlowCalls):
        self._inner, self._owner = inner, owner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def open(self, prompts):
        return _SlowSession(self._inner.open(prompts), self._owner, prompts)


class _SlowSession:
    def __init__(self, inner, owner: SlowCalls, prompts):
        self._inner, self._owner = inner, owner
        self.slow = {i for i, p in enumerate(prompts) if owner.is_slow(p)}
        if hasattr(inner, "add"):
            self.add = self._add

    @property
    def usage(self):
        return self._inner.usage

    def _add(self, prompts):
        base = self._inner.add(prompts)
        self.slow |= {base + i for i, p in enumerate(prompts) if self._owner.is_slow(p)}
        return base

    def next_tokens(self, queries):
        slow = sum(q.prompt in self.slow for q in queries)
        if slow:
            self._owner.slow_steps += 1
            self._owner.mixed_calls += slow < len(queries)
            time.sleep(self._owner.delay * slow / 64)
        return self._inner.next_tokens(queries)

    def release(self, prompt, path=(), keep=0):
        if not path and prompt in self.slow:
            self._owner.slow_stopped = True
        self._inner.release(prompt, path, keep)

    def close(self):
        self._inner.close()


EXHAUSTIVE = {"eps": 0.0}  # the tiny model's tree with 14 ids has no end: the search runs to max_nodes


@pytest.mark.parametrize("continuous", [True, False], ids=["continuous", "interleaved"])
def test_a_slow_request_does_not_hold_back_cheap_ones(tiny_classifier, continuous):
    """The head-of-line case: a slow request at t=0 (timeout 2 s); cheap requests sent at 0.4 s
    and 3.9 s are answered 200, each well within its own timeout, and the slow one stops costing
    at the model call after its timeout. Continuous: the cheap request joins the slow one's
    model calls, which the round budget keeps small; interleaved: runs of their own."""
    from guardprob.server import create_app

    slow = SlowCalls(tiny_classifier, delay=0.15)
    config = ServerConfig(search={"eps": 0.2, "max_nodes": 2048}, timeout_s=2.0, batch_wait_ms=0,
                          continuous=continuous, round_nodes=16)
    with running(create_app(slow.clf, config)) as r, ThreadPoolExecutor(3) as pool:
        t0 = time.perf_counter()
        slow_answer = pool.submit(post, r.url, "/v1/classify", {"input": "SLOW please", **EXHAUSTIVE})
        wait_for(lambda: slow.slow_steps >= 1)
        time.sleep(max(0.0, 0.4 - (time.perf_counter() - t0)))
        sent = time.perf_counter()
        cheap = post(r.url, "/v1/classify", {"input": "hello there"})
        first_cheap = time.perf_counter() - sent
        assert cheap.status_code == 200, cheap.text
        assert first_cheap < 1.0, f"the cheap request waited {first_cheap:.2f} s behind the slow one"
        assert (slow.mixed_calls > 0) is continuous  # it joined the slow request's calls, or ran its own
        assert_error(slow_answer.result(), 504, code="timeout")
        steps_at_timeout = slow.slow_steps
        time.sleep(max(0.0, 3.9 - (time.perf_counter() - t0)))
        sent = time.perf_counter()
        late = post(r.url, "/v1/classify", {"input": "and another"})
        assert late.status_code == 200 and time.perf_counter() - sent < 1.0
        assert slow.slow_stopped and slow.slow_steps <= steps_at_timeout + 1  # stopped at the next call


@pytest.mark.parametrize("continuous", [True, False], ids=["continuous", "interleaved"])
def test_deadline_ms_answers_with_the_bounds_reached(tiny_classifier, continuous):
    from guardprob.server import create_app

    slow = SlowCalls(tiny_classifier, delay=0.1)
    config = ServerConfig(search={"eps": 0.2, "max_nodes": 2048}, timeout_s=10.0, batch_wait_ms=0, continuous=continuous)
    with running(create_app(slow.clf, config)) as r:
        sent = time.perf_counter()
        answer = post(r.url, "/v1/classify", {"input": "SLOW please", "deadline_ms": 500, **EXHAUSTIVE})
        took = time.perf_counter() - sent
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["complete"] is False and took < 2.0
        assert body["p_unsafe_lower"] <= body["p_unsafe"] <= body["p_unsafe_upper"]
        for row in body["categories"].values():
            assert 0 <= row["lower"] <= row["p"] <= row["upper"] <= 1
        assert post(r.url, "/v1/classify", {"input": "quick"}).json()["complete"] is True
        assert_error(post(r.url, "/v1/classify", {"input": "x", "deadline_ms": 0}), 422)


def test_python_deadline_gives_an_incomplete_answer_with_true_bounds(tiny_classifier):
    started = time.perf_counter()
    s = tiny_classifier.score("How do I hit a man", eps=0.0, max_nodes=None, batch=4, deadline=0.3)
    assert not s.complete and time.perf_counter() - started < 3.0
    assert s.p_unsafe_lower <= s.p_unsafe_upper and s.unexplored_mass > 0
    for c in s.categories.values():
        assert c.lower <= c.p <= c.upper and c.upper - c.lower <= s.unexplored_mass + 1e-9
    assert tiny_classifier.score("How do I hit a man", eps=0.2).complete
    from guardprob import InputError

    with pytest.raises(InputError, match="deadline"):
        tiny_classifier.score("x", deadline=-1)


def test_api_docs_are_off_unless_asked_for(tiny_classifier):
    from guardprob.server import create_app

    with running(create_app(tiny_classifier, ServerConfig(search={"eps": 0.2}))) as r:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert httpx.get(r.url + path).status_code == 404
    with running(create_app(tiny_classifier, ServerConfig(search={"eps": 0.2}, docs=True))) as r:
        assert httpx.get(r.url + "/openapi.json").status_code == 200


_FIELDS = ["input", "messages", "role", "method", "model", "eps", "top_p", "max_nodes", "max_depth", "deadline_ms"]
_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5000) | st.text(max_size=30)
    | st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "agent", "system", "x"]),
                                  "content": st.text(max_size=40)})
_bodies = st.dictionaries(
    st.sampled_from(_FIELDS) | st.text(max_size=6),
    _values | st.lists(_message, max_size=3) | st.sampled_from(["greedy", "marginal", "joint", "user", "assistant"]),
    max_size=5,
)


def test_random_request_bodies_never_break_the_service(tiny_classifier):
    from guardprob.server import create_app

    config = ServerConfig(search={"eps": 0.2, "max_nodes": 64}, max_chars=200, max_inputs=4)
    with running(create_app(tiny_classifier, config)) as r, httpx.Client(timeout=30) as client:

        @settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(path=st.sampled_from(["/v1/classify", "/v1/moderations"]), body=_bodies)
        def check(path, body):
            answer = client.post(r.url + path, json=body)
            assert answer.status_code < 500 or answer.status_code in (503, 504), (path, body, answer.text)
            data = answer.json()
            if answer.status_code != 200:
                assert set(data["error"]) == {"message", "type", "param", "code"}
                return
            rows = data["categories"].values() if path == "/v1/classify" else []
            for row in rows:
                assert 0 <= row["lower"] <= row["p"] <= row["upper"] <= 1, row
            for result in data.get("results", []):
                assert all(0 <= v <= 1 for v in result["category_scores"].values())

        check()
        assert httpx.get(r.url + "/health").status_code == 200


def test_oversized_requests_are_refused_before_tokenizing(tiny_classifier):
    """32 texts of 20,000 characters (each within max_chars) and one conversation of 99 such
    messages: 413 at once, counted in characters, before any tokenizer or model work."""
    from guardprob.server import create_app

    calls = []

    class Counting:
        def __getattr__(self, name):
            return getattr(tiny_classifier, name)

        def prompt(self, *args, **kwargs):
            calls.append(1)
            return tiny_classifier.prompt(*args, **kwargs)

    config = ServerConfig(search={"eps": 0.2}, max_body_bytes=5_000_000)
    with running(create_app(Counting(), config)) as r:
        sent = time.perf_counter()
        many = post(r.url, "/v1/moderations", {"input": ["a" * 20_000] * 32})
        assert_error(many, 413, code="request_too_large")
        long = post(r.url, "/v1/classify", {"messages": [{"role": "user", "content": "b" * 20_000}] * 99})
        assert_error(long, 413, code="request_too_large")
        assert calls == [] and time.perf_counter() - sent < 5.0
        small = ServerConfig(search={"eps": 0.2}, max_request_tokens=1500)
    with running(create_app(tiny_classifier, small)) as r:
        over = post(r.url, "/v1/moderations", {"input": ["hello", "there"]})  # two prompts of 900 tokens
        assert_error(over, 413, param="input[1]", code="request_too_large")
        assert post(r.url, "/v1/moderations", {"input": "hello"}).status_code == 200


def test_a_lone_surrogate_is_bad_input_not_a_server_error(tiny_classifier):
    """JSON's \\ud800 escape can carry half a character that no tokenizer reads."""
    from guardprob import InputError
    from guardprob.server import create_app

    with pytest.raises(InputError, match="surrogate"):
        tiny_classifier.score("hi \ud800 there")
    with running(create_app(tiny_classifier, ServerConfig(search={"eps": 0.2}))) as r:
        assert_error(post(r.url, "/v1/classify", content='{"input": "hi \\ud800 there"}'), 400)
        assert_error(post(r.url, "/v1/moderations", content='{"input": ["\\udfff"]}'), 400)


@pytest.mark.parametrize("continuous", [True, False], ids=["continuous", "interleaved"])
def test_a_client_that_disconnects_stops_its_work(tiny_classifier, continuous):
    """A client that closes the connection mid-request (a real one: httpx's read timeout) stops
    costing: its search stops at the next model call, counted in /metrics, and the server goes
    on answering."""
    from guardprob.server import create_app

    slow = SlowCalls(tiny_classifier, delay=0.15)
    config = ServerConfig(search={"eps": 0.2, "max_nodes": 2048}, timeout_s=60.0, batch_wait_ms=0, continuous=continuous)
    with running(create_app(slow.clf, config)) as r:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(r.url + "/v1/classify", json={"input": "SLOW please", **EXHAUSTIVE}, timeout=1.0)
        wait_for(lambda: slow.slow_stopped, 5)
        steps = slow.slow_steps
        time.sleep(0.6)
        assert slow.slow_steps <= steps + 1  # no more calls for a client that left
        assert post(r.url, "/v1/classify", {"input": "hello"}).status_code == 200
        text = httpx.get(r.url + "/metrics").text
        assert "guardprob_client_disconnects_total 1.0" in text, [x for x in text.splitlines() if "disconn" in x or "status" in x]
