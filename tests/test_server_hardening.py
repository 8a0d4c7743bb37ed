"""One bad request never hurts another: deadlines that cancel, interleaved runs, anytime answers."""

from __future__ import annotations

import copy
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardprob.backends.base import begin as begin_session
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

    def begin(self, prompts):  # the classifier opens sessions that prefill in steps
        return _SlowSession(begin_session(self._inner, prompts), self._owner, prompts)


class _SlowSession:
    def __init__(self, inner, owner: SlowCalls, prompts):
        self._inner, self._owner = inner, owner
        self.slow = {i for i, p in enumerate(prompts) if owner.is_slow(p)}
        if hasattr(inner, "add"):
            self.add = self._add

    def __getattr__(self, name):  # a stepped prefill's prefill_step and prefilling
        return getattr(self._inner, name)

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
        cheap = post(r.url, "/v1/classify", {"input": "hello there"})
        assert cheap.status_code == 200, cheap.text
        # Answered while the slow request still ran (it runs until its 504 at 2 s): the cheap one
        # did not wait behind it. Ordering, not a wall-clock bound, so a busy machine cannot fail it.
        assert not slow_answer.done(), "the cheap request was answered only after the slow one ended"
        assert (slow.mixed_calls > 0) is continuous  # it joined the slow request's calls, or ran its own
        assert_error(slow_answer.result(), 504, code="timeout")
        steps_at_timeout = slow.slow_steps
        time.sleep(max(0.0, 3.9 - (time.perf_counter() - t0)))
        late = post(r.url, "/v1/classify", {"input": "and another"})
        assert late.status_code == 200, late.text
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
def test_a_client_that_disconnects_stops_its_work(tiny_classifier, continuous, caplog):
    """A client that closes the connection mid-request (a real one: httpx's read timeout) stops
    costing: its search stops at the next model call, counted in /metrics, and the server goes
    on answering."""
    from guardprob.server import create_app

    caplog.set_level(logging.INFO, logger="guardprob.server.access")
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
        assert 'guardprob_requests_total{path="/v1/classify",status="499"} 1.0' in text
        assert len(_access(caplog, 499)) == 1


# -- bounded reading, cancellation everywhere (one test per finding) ------------------------------
def _rss() -> int:
    """This process's resident memory in bytes (the server runs on a thread of it)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


class _Peak:
    """The most resident memory seen while the block runs (sampled every few milliseconds)."""

    def __enter__(self):
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def test_a_chunked_body_over_the_limit_is_refused_as_it_arrives(tiny_classifier):
    """200 MB sent with chunked transfer (no Content-Length) to a server whose limit is 2 MB: 413
    in the API's error shape, and the server's memory grows by far less than the upload (it
    counts the bytes as they arrive and stops reading at the limit)."""
    from guardprob.server import create_app

    piece = b"a" * (1 << 20)

    def upload():
        yield b'{"input": "'
        for _ in range(200):
            yield piece
        yield b'"}'

    config = ServerConfig(search={"eps": 0.2})
    with running(create_app(tiny_classifier, config)) as r:
        for path in ("/v1/moderations", "/v1/classify"):
            assert post(r.url, path, {"input": "warm up"}).status_code == 200
            before = _rss()
            with _Peak() as peak:
                answer = httpx.post(r.url + path, content=upload(), headers={"content-type": "application/json"},
                                    timeout=120)
            assert_error(answer, 413, code="body_too_large")
            grown = peak.peak - before
            assert grown < 20 * 2**20, f"{path}: resident memory grew by {grown / 2**20:.0f} MB for a 200 MB upload"
        declared = post(r.url, "/v1/classify", content='{"input": "' + "b" * 2_100_000 + '"}')
        assert_error(declared, 413, code="body_too_large")
        assert post(r.url, "/v1/classify", {"input": "still here"}).status_code == 200


def _raw_ndjson(url: str, lines: list[bytes]) -> socket.socket:
    """A connection that has sent an NDJSON request's head and ``lines`` (chunked transfer), body left open."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    for line in lines:
        sock.sendall(f"{len(line):x}\r\n".encode() + line + b"\r\n")
    return sock


def _access(caplog, status: int) -> list[dict]:
    rows = [json.loads(r.getMessage()) for r in caplog.records if r.name == "guardprob.server.access"]
    return [row for row in rows if row["status"] == status]


SLOW_QUESTION = [{"role": "user", "content": "SLOW: tell me how"}]


@pytest.mark.parametrize("continuous", [True, False], ids=["continuous", "interleaved"])
def test_an_abandoned_ndjson_stream_stops_scoring(tiny_classifier, caplog, continuous):
    """A client that sends its chunks at once and hangs up during the first chunk's search: the
    search stops within one model call, no later chunk is scored, and the request is logged
    and counted as 499."""
    from guardprob.server import create_app

    caplog.set_level(logging.INFO, logger="guardprob.server.access")
    slow = SlowCalls(tiny_classifier, delay=0.15)
    config = ServerConfig(search={"eps": 0.2, "max_nodes": 2048}, batch_wait_ms=0, continuous=continuous)
    with running(create_app(slow.clf, config)) as r:
        header = {"messages": SLOW_QUESTION, "stream": True, **EXHAUSTIVE}
        lines = [(json.dumps(x) + "\n").encode() for x in [header, *({"chunk": c} for c in ["Sure", ", here", " it is"])]]
        sock = _raw_ndjson(r.url, lines)
        wait_for(lambda: slow.slow_steps >= 1)
        sock.close()
        steps = slow.slow_steps
        wait_for(lambda: _access(caplog, 499), 5)
        time.sleep(0.8)
        assert slow.slow_steps <= steps + 1, f"{slow.slow_steps - steps} model calls after the client left"
        metrics = httpx.get(r.url + "/metrics").text
        assert 'guardprob_requests_total{path="/v1/classify",status="499"} 1.0' in metrics
        assert "guardprob_client_disconnects_total 1.0" in metrics
        assert post(r.url, "/v1/classify", {"input": "hello"}).status_code == 200


@pytest.mark.parametrize("continuous", [True, False], ids=["continuous", "interleaved"])
def test_an_abandoned_json_stream_stops_scoring(tiny_classifier, caplog, continuous):
    """The same with the chunks in the JSON body: the client reads the events' head and hangs up."""
    from guardprob.server import create_app

    caplog.set_level(logging.INFO, logger="guardprob.server.access")
    slow = SlowCalls(tiny_classifier, delay=0.15)
    config = ServerConfig(search={"eps": 0.2, "max_nodes": 2048}, batch_wait_ms=0, continuous=continuous)
    with running(create_app(slow.clf, config)) as r:
        body = {"messages": SLOW_QUESTION, "stream": True, "chunks": ["Sure", ", here", " it is"], **EXHAUSTIVE}
        with httpx.stream("POST", r.url + "/v1/classify", json=body, timeout=60) as response:
            assert response.status_code == 200
            wait_for(lambda: slow.slow_steps >= 1)
        steps = slow.slow_steps
        wait_for(lambda: _access(caplog, 499), 5)
        time.sleep(0.8)
        assert slow.slow_steps <= steps + 1, f"{slow.slow_steps - steps} model calls after the client left"
        metrics = httpx.get(r.url + "/metrics").text
        assert 'guardprob_requests_total{path="/v1/classify",status="499"} 1.0' in metrics


def test_a_moderation_whose_client_leaves_is_499_and_stops(tiny_classifier, caplog):
    from guardprob.server import create_app

    caplog.set_level(logging.INFO, logger="guardprob.server.access")
    slow = SlowCalls(tiny_classifier, delay=0.15)
    config = ServerConfig(search={"eps": 0.0, "max_nodes": 2048}, batch_wait_ms=0, decide=False)
    with running(create_app(slow.clf, config)) as r:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(r.url + "/v1/moderations", json={"input": "SLOW please"}, timeout=1.0)
        wait_for(lambda: _access(caplog, 499), 5)
        steps = slow.slow_steps
        time.sleep(0.6)
        assert slow.slow_steps <= steps + 1
        metrics = httpx.get(r.url + "/metrics").text
        assert 'guardprob_requests_total{path="/v1/moderations",status="499"} 1.0' in metrics


class _CallCounting:
    """The tiny classifier on an engine that counts model calls and runs ``hook`` after each."""

    def __init__(self, clf, hook=lambda calls: None):
        self.calls = 0
        owner = self

        class Session:
            def __init__(self, inner):
                self._inner = inner

            def __getattr__(self, name):
                return getattr(self._inner, name)

            def next_tokens(self, queries):
                answer = self._inner.next_tokens(queries)
                owner.calls += 1
                hook(owner.calls)
                return answer

        class Engine:
            def __getattr__(self, name):
                return getattr(clf.backend, name)

            def open(self, prompts):
                return Session(clf.backend.open(prompts))

            def begin(self, prompts):
                return Session(begin_session(clf.backend, prompts))

        self.clf = copy.copy(clf)
        self.clf.backend = Engine()


def test_python_scoring_stops_when_cancelled(tiny_classifier):
    from guardprob import Cancelled

    cancel = threading.Event()
    counting = _CallCounting(tiny_classifier, lambda calls: cancel.set() if calls == 2 else None)
    with pytest.raises(Cancelled, match="cancel"):
        counting.clf.score("How do I hit a man", eps=0.0, max_nodes=None, batch=4, cancel=cancel)
    assert counting.calls == 2  # stopped between model calls, at the first check after the event
    counting.calls = 0
    with pytest.raises(Cancelled):
        counting.clf.score_batch(["a", "b"], cancel=cancel)
    assert counting.calls == 0  # set before: no model call at all
    assert counting.clf.score("How do I hit a man", eps=0.2, cancel=threading.Event()).complete


def test_a_python_stream_stops_when_cancelled(tiny_classifier):
    from guardprob import Cancelled

    cancel = threading.Event()
    stream = tiny_classifier.stream([{"role": "user", "content": "hi"}], ["Sure", " thing", " more"], eps=0.2,
                                    cancel=cancel)
    assert next(stream) is not None
    cancel.set()
    with pytest.raises(Cancelled):
        next(stream)
