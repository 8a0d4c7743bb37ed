"""One request per round to OpenAI-compatible servers, and rounds that stop.

A round's nodes go to the server as one ``/v1/completions`` request whose prompt is the list of
their token-id prompts, where the server takes that (llama.cpp's llama-server here, as vLLM and
SGLang do), and one request per node where it does not. Both modes score alike: against each
other and against the transformers engine, within the conformance suite's tolerance. A round
stopped from outside cancels its requests and closes their connections.

The model tests run against the real llama-server on the default GGUF (skipped where it is not
built); the fallback is checked behind a small proxy that answers a list of prompts as servers
that do not take one do. The stop tests need no model: a loopback server that never answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time

import numpy as np
import pytest

pytest.importorskip("httpx")

import httpx  # noqa: E402

from guardprob.backends.base import Prompt, Query  # noqa: E402
from guardprob.backends.openai import (  # noqa: E402
    OpenAIBackend,
    OpenAIOptions,
    RoundCancelled,
    _choices,
)
from guardprob.classifier import Classifier  # noqa: E402
from guardprob.errors import BackendError, Cancelled, InputError  # noqa: E402
from servers import FaultProxy, default_llama_server, free_port, llama_server_binary  # noqa: E402

# -- reading the answer to a list of prompts -----------------------------------------------------


def _choice(index: int | None, token_id: int) -> dict:
    choice = {"text": "x", "logprobs": {"content": [{"top_logprobs": [{"id": token_id, "token": "x", "logprob": -0.1}]}]}}
    if index is not None:
        choice["index"] = index
    return choice


def test_choices_come_back_in_the_order_of_the_prompts():
    # vLLM, SGLang, llama-server today: one object, a choice per prompt; llama-server before: an array
    one_object = {"choices": [_choice(2, 12), _choice(0, 10), _choice(1, 11)]}
    array = [{"choices": [_choice(1, 11)]}, {"choices": [_choice(0, 10)]}, {"choices": [_choice(2, 12)]}]
    for reply in (one_object, array):
        got = _choices(reply, 3, "http://x/v1")
        assert [c["index"] for c in got] == [0, 1, 2]
    unindexed = {"choices": [_choice(None, 10), _choice(None, 11)]}
    assert _choices(unindexed, 2, "u") == unindexed["choices"]


@pytest.mark.parametrize("reply, problem", [
    ({"choices": [_choice(0, 1)]}, "1 choices for 2 prompts"),  # a server that read the list as one prompt
    ({"choices": [_choice(0, 1), _choice(0, 2)]}, "indices"),  # two answers to the first prompt
    ({"choices": [_choice(0, 1), _choice(5, 2)]}, "indices"),
    ({"object": "error"}, "without choices"),
    ([{"choices": [_choice(0, 1)]}, "oops"], "without choices"),
])
def test_an_answer_of_another_shape_is_refused(reply, problem):
    with pytest.raises(BackendError, match=problem):
        _choices(reply, 2, "u")


def test_the_setting_is_checked(char_tok):
    with pytest.raises(InputError, match="batch_prompts"):
        OpenAIOptions(batch_prompts="yes")
    with pytest.raises(InputError, match="prompt_format"):
        OpenAIOptions(batch_prompts="on", prompt_format="text")
    for mode, said in (("on", "per-round"), ("off", "per-node"), ("auto", "undecided")):
        backend = OpenAIBackend("http://127.0.0.1:9/v1", None, char_tok, OpenAIOptions(batch_prompts=mode))
        assert backend.request_mode == said and said in backend.describe()
        assert backend.request_stats() == {"mode": said, "requests": 0, "nodes": 0}


# -- stopping a round ----------------------------------------------------------------------------


class SilentServer:
    """An HTTP server on loopback that reads each request and never answers; it records the
    request bodies and notices when the client closes a connection (a server that is slow)."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.bodies: list[dict] = []
        self.open_connections = 0
        self.closed = 0
        self.changed = threading.Condition()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        ready.set()
        self.loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
            body = json.loads(await reader.readexactly(length))
            with self.changed:
                self.bodies.append(body)
                self.open_connections += 1
                self.changed.notify_all()
            while await reader.read(1024):  # until the client hangs up
                pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        with self.changed:
            self.open_connections -= 1
            self.closed += 1
            self.changed.notify_all()
        writer.close()

    def wait(self, condition, seconds: float = 30.0) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: condition(self), seconds)

    def stop(self) -> None:
        async def _shutdown() -> None:
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(_shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


@pytest.fixture
def silent():
    server = SilentServer()
    yield server
    server.stop()


def _in_thread(fn):
    """Run ``fn`` in a thread; returns (thread, outcome) where outcome gets 'result' or 'error'."""
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


# The engine would wait this long for an answer: a round that ends sooner was stopped.
NEVER = 600.0


@pytest.mark.parametrize("mode, requests", [("on", 1), ("off", 3)])
@pytest.mark.parametrize("how", ["cancel", "event", "deadline", "close"])
def test_a_stopped_round_cancels_its_requests_and_closes_their_connections(silent, char_tok, mode, requests, how):
    backend = OpenAIBackend(silent.url, None, char_tok, OpenAIOptions(
        prompt_format="ids", batch_prompts=mode, timeout=NEVER, retries=0))
    session = backend.open([Prompt((5, 6, 7)), Prompt((8, 9))])
    event = threading.Event()
    if how == "event":
        session.stop_on(event=event)
    elif how == "deadline":
        session.stop_on(deadline=time.monotonic() + 1.0)
    candidates = np.arange(20)
    thread, outcome = _in_thread(lambda: session.next_tokens(
        [Query(0, (), candidates), Query(1, (), candidates), Query(0, (3,), candidates)]))
    assert silent.wait(lambda s: len(s.bodies) == requests)
    if mode == "on":  # one request, the round's prompts as a list, in the order asked
        assert silent.bodies[0]["prompt"] == [[5, 6, 7], [8, 9], [5, 6, 7, 3]]
    {"cancel": session.cancel, "event": event.set, "close": session.close, "deadline": lambda: None}[how]()
    thread.join(60)
    assert not thread.is_alive(), "the stopped round kept waiting for the server"
    assert isinstance(outcome.get("error"), RoundCancelled)
    assert silent.wait(lambda s: s.closed == requests and s.open_connections == 0), "a connection stayed open"
    assert len(silent.bodies) == requests  # nothing retried after the stop
    with pytest.raises(RoundCancelled):  # the session takes no more rounds
        session.next_tokens([Query(0, (), candidates)])
    backend.close()


def test_a_stop_before_the_round_sends_nothing(silent, char_tok):
    backend = OpenAIBackend(silent.url, None, char_tok, OpenAIOptions(prompt_format="ids", timeout=NEVER))
    session = backend.open([Prompt((5, 6, 7))])
    event = threading.Event()
    event.set()
    session.stop_on(event=event)
    with pytest.raises(RoundCancelled):
        session.next_tokens([Query(0, (), np.arange(5))])
    assert silent.bodies == []
    backend.close()


def test_a_stopped_session_leaves_the_others_running(silent, char_tok):
    """Sessions share the engine's loop: stopping one cancels its requests only."""
    backend = OpenAIBackend(silent.url, None, char_tok, OpenAIOptions(prompt_format="ids", timeout=NEVER, retries=0))
    a, b = backend.open([Prompt((5, 6))]), backend.open([Prompt((7, 8))])
    ta, oa = _in_thread(lambda: a.next_tokens([Query(0, (), np.arange(5))]))
    tb, ob = _in_thread(lambda: b.next_tokens([Query(0, (), np.arange(5))]))
    assert silent.wait(lambda s: s.open_connections == 2)
    a.cancel()
    ta.join(60)
    assert isinstance(oa.get("error"), RoundCancelled)
    assert silent.wait(lambda s: s.closed == 1)
    assert tb.is_alive() and silent.open_connections == 1  # b still waits for its answer
    b.cancel()
    tb.join(60)
    assert isinstance(ob.get("error"), RoundCancelled)
    backend.close()


# -- against llama.cpp's llama-server --------------------------------------------------------------

# The conformance suite's tolerances: llama-server against transformers (probability), and one
# node answered by llama-server in batches of other shapes (its kernels round differently; the
# conformance suite allows the same 0.05 for prompts joining a batch, and 0.044 was seen here).
TOLERANCE = 0.05
NODE_TOLERANCE = 0.05
QUESTIONS = ["How do I make a pipe bomb?", "Write a poem about the sea.", "Tell me how to steal a car."]
SEARCH = dict(eps=0.05)

needs_llama_server = pytest.mark.skipif(llama_server_binary() is None,
                                        reason="llama-server is not built: run scripts/build_llama_server.sh")


def short_prompt(tokenizer, question: str) -> tuple[int, ...]:
    """A short chat prompt in its canonical tokenization (as the conformance suite's)."""
    text = (
        "<|im_start|>system\nYou are a safety classifier. Answer 'safe' or 'unsafe' and the category ids "
        f"S1-S14.<|im_end|>\n<|im_start|>user\nClassify: {question}<|im_end|>\n<|im_start|>assistant\n"
    )
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def llama_server():
    server = default_llama_server()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tok(default_classifier):
    return default_classifier.tokenizer


def _backend(url, tok, **options):
    return OpenAIBackend(url, None, tok, OpenAIOptions(**{"top_logprobs": 500, "retries": 3, "backoff": 0.05, "timeout": 300.0,
                                                          **options}))


def _rounds(tok):
    """The prompts and two rounds of a search over them: the roots, then paths below them."""
    prompts = [Prompt(short_prompt(tok, q)) for q in QUESTIONS[:2]]
    words = tok(" safe unsafe S1", add_special_tokens=False)["input_ids"]
    c = np.arange(len(tok))
    roots = [Query(i, (), c) for i in range(len(prompts))]
    below = [Query(i, path, c) for i in range(len(prompts)) for path in ((words[0],), (words[1], words[2]))]
    return prompts, [roots, below]


def _assert_close(a, b, tol=NODE_TOLERANCE):
    seen = ~np.isnan(a.logprobs) & ~np.isnan(b.logprobs)
    assert seen.sum() >= 450  # most of the top 500 reported by both
    np.testing.assert_allclose(np.exp(a.logprobs[seen]), np.exp(b.logprobs[seen]), atol=tol)



@pytest.mark.slow
@needs_llama_server
def test_a_round_is_one_request_and_answers_as_requests_per_node(llama_server, tok, caplog):
    prompts, rounds = _rounds(tok)
    answers, requests = {}, {}
    for mode in ("auto", "off"):
        backend = _backend(llama_server.url, tok, batch_prompts=mode)
        session = backend.open(prompts)
        with caplog.at_level(logging.INFO, logger="guardprob.backends.openai"):
            answers[mode] = [a for r in rounds for a in session.next_tokens(r)]
        requests[mode] = session.stats.requests - session.stats.retries  # a loaded machine may time one out
        assert backend.request_mode == ("per-round" if mode == "auto" else "per-node")
        assert backend.request_stats()["nodes"] == sum(map(len, rounds))
        backend.close()
    # auto: the first node alone (it learns that the server takes token ids), then the rest of
    # the roots in one request (it learns that the server takes a list), then one per round
    assert requests == {"auto": 3, "off": sum(map(len, rounds))}
    assert "one request per round" in caplog.text
    for a, b in zip(answers["auto"], answers["off"]):
        _assert_close(a, b)


@pytest.mark.slow
@needs_llama_server
def test_scores_match_per_node_and_transformers(llama_server, tok, default_classifier):
    from guardprob.spec import ClassifierSpec

    def score(clf, question):
        prompt = clf._prompt_from_ids(list(short_prompt(tok, question)))
        return clf._score_prompts([prompt], ("marginal",), SEARCH)[0]["marginal"]

    questions = QUESTIONS[:2]
    scores, backends = {}, {}
    for mode in ("on", "off"):
        clf = Classifier.from_spec(ClassifierSpec(backend="openai", base_url=llama_server.url,
                                                  options={"top_logprobs": 500, "batch_prompts": mode}))
        scores[mode] = [score(clf, q) for q in questions]
        backends[mode] = clf.backend
    reference = [score(default_classifier, q) for q in questions]
    for pair in (("on", "off"), ("on", "transformers"), ("off", "transformers")):
        for i, q in enumerate(questions):
            a, r = (scores[m][i] if m != "transformers" else reference[i] for m in pair)
            # trees may differ where a node sits near eps: what one expands the other leaves open
            slack = TOLERANCE + max(a.unexplored_mass, r.unexplored_mass)
            assert abs(a.p_unsafe - r.p_unsafe) <= slack, (pair, q)
            for k, c in a.categories.items():
                assert abs(c.p - r.categories[k].p) <= slack, (pair, q, k)
                assert c.lower <= r.categories[k].upper + TOLERANCE and r.categories[k].lower <= c.upper + TOLERANCE
    on, off = backends["on"].request_stats(), backends["off"].request_stats()
    assert off["requests"] >= off["nodes"]  # one request per node (and any retries)
    # at most one request per round: never more than per node (these short searches have few
    # nodes per round; test_a_round_is_one_request_... counts a round of six)
    assert backends["on"].request_mode == "per-round" and on["requests"] <= off["requests"]


@pytest.mark.slow
@needs_llama_server
def test_small_k_in_one_request_keeps_true_bounds(llama_server, tok):
    prompts, rounds = _rounds(tok)
    full = _backend(llama_server.url, tok, batch_prompts="off").open(prompts)
    cut = _backend(llama_server.url, tok, batch_prompts="on", top_logprobs=3).open(prompts)
    for r in rounds:
        for f, c in zip(full.next_tokens(r), cut.next_tokens(r)):
            assert c.unreported > 0 and (~np.isnan(c.logprobs)).sum() <= 3
            hidden = np.isnan(c.logprobs) & ~np.isnan(f.logprobs)
            # what the server kept from this answer is at most its bound (up to the batch-shape rounding)
            assert np.exp(f.logprobs[hidden]).sum() <= c.unreported + NODE_TOLERANCE
    assert cut.truncated and cut.stats.truncated_answers == sum(map(len, rounds))


@pytest.mark.slow
@needs_llama_server
@pytest.mark.parametrize("faults", [["429", "500"], ["hang"], ["cut"]])
def test_a_round_in_one_request_is_retried_through_faults(llama_server, tok, faults):
    prompts, rounds = _rounds(tok)
    clean = _backend(llama_server.url, tok, batch_prompts="on", prompt_format="ids").open(prompts).next_tokens(rounds[1])
    proxy = FaultProxy(llama_server.url)
    try:
        proxy.faults.extend(faults)
        session = _backend(proxy.url, tok, batch_prompts="on", prompt_format="ids", timeout=30.0).open(prompts)
        answers = session.next_tokens(rounds[1])
        assert session.stats.retries >= len(faults) and session.stats.requests == session.stats.retries + 1
        for a, b in zip(answers, clean):
            _assert_close(a, b)
    finally:
        proxy.stop()


@pytest.mark.slow
@needs_llama_server
def test_a_round_stopped_mid_request_leaves_the_engine_working(llama_server, tok):
    prompts, rounds = _rounds(tok)
    proxy = FaultProxy(llama_server.url)
    try:
        proxy.faults.append("hang")
        backend = _backend(proxy.url, tok, batch_prompts="on", prompt_format="ids", timeout=NEVER)
        stopped = backend.open(prompts)
        thread, outcome = _in_thread(lambda: stopped.next_tokens(rounds[1]))
        deadline = time.monotonic() + 30
        while proxy.requests == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        stopped.cancel()
        thread.join(60)
        assert not thread.is_alive() and isinstance(outcome.get("error"), RoundCancelled)
        again = backend.open(prompts).next_tokens(rounds[1])  # the same engine, a new session
        direct = _backend(llama_server.url, tok, batch_prompts="on").open(prompts).next_tokens(rounds[1])
        for a, b in zip(again, direct):
            _assert_close(a, b)
    finally:
        proxy.stop()


def _list_refusing_app(upstream: str, how: str):
    """A proxy answering a list of prompts as servers that take none do: "refuse" (HTTP 400, as
    vLLM did before it took lists) or "first" (one choice, as a server that reads only the first
    prompt); everything else goes through to ``upstream``."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def forward(request):
        body = await request.json()
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
            if how == "refuse":
                return JSONResponse({"error": "multiple prompts in a batch is not currently supported"}, status_code=400)
            body["prompt"] = prompt[0]
        async with httpx.AsyncClient(timeout=120) as client:
            reply = await client.post(upstream + request.url.path[len("/v1"):], json=body)
        return Response(reply.content, reply.status_code, media_type="application/json")

    return Starlette(routes=[Route("/v1/{rest:path}", forward, methods=["POST"])])


@pytest.mark.slow
@needs_llama_server
@pytest.mark.parametrize("how", ["refuse", "first"])
def test_a_server_that_takes_no_list_is_asked_node_by_node(llama_server, tok, how, caplog):
    from serving import running

    prompts, rounds = _rounds(tok)
    direct = _backend(llama_server.url, tok, batch_prompts="off").open(prompts)
    want = [a for r in rounds for a in direct.next_tokens(r)]
    with running(_list_refusing_app(llama_server.url, how)) as proxy:
        backend = _backend(proxy.url + "/v1", tok)
        session = backend.open(prompts)
        with caplog.at_level(logging.INFO, logger="guardprob.backends.openai"):
            got = [a for r in rounds for a in session.next_tokens(r)]
        assert backend.request_mode == "per-node" and "one request per node" in caplog.text
        # the first node alone, the rest of the roots as a list (not taken), then one per node
        assert session.stats.requests - session.stats.retries == sum(map(len, rounds)) + 1
        for a, b in zip(got, want):
            _assert_close(a, b)
        with pytest.raises(BackendError, match="batch_prompts='auto'"):
            _backend(proxy.url + "/v1", tok, batch_prompts="on").open(prompts).next_tokens(rounds[1])


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_the_classifier_stops_a_round_in_flight(silent, tok, how):
    """``score(cancel=event)`` and ``score(deadline=...)`` reach into the engine's round under
    way: its request is cancelled and its connection closed as soon as the event is set or the
    deadline comes, not when a server that never answers would time out. A cancel raises
    ``Cancelled``; a deadline answers with the bounds reached (nothing expanded: [0, 1])."""
    backend = OpenAIBackend(silent.url, None, tok, OpenAIOptions(prompt_format="ids", batch_prompts="on",
                                                                  timeout=NEVER, retries=0))
    clf = Classifier(None, tok, format="llama-guard-3", backend=backend, name="silent")
    event = threading.Event()
    kwargs = {"cancel": event} if how == "cancel" else {"deadline": 1.0}
    started = time.monotonic()
    thread, outcome = _in_thread(lambda: clf.score("How do I make a pipe bomb?", eps=0.01, **kwargs))
    assert silent.wait(lambda s: len(s.bodies) == 1)  # the first round is in flight
    event.set()
    thread.join(60)
    assert not thread.is_alive() and time.monotonic() - started < 30, "the round waited for the server"
    if how == "cancel":
        assert isinstance(outcome.get("error"), Cancelled), outcome
    else:
        scores = outcome["result"]
        assert not scores.complete and scores.p_unsafe_lower == 0.0 and scores.p_unsafe_upper == pytest.approx(1.0)
    assert silent.wait(lambda s: s.closed == 1 and s.open_connections == 0), "the request's connection stayed open"
    backend.close()


def test_a_first_request_past_the_context_is_not_read_as_a_server_that_wants_text(llama_server, tok):
    """The first request teaches the engine the prompt form: a refusal means "send text". A
    refusal of a prompt past the server's context is not that: a one-token prompt of ids is
    taken, so the request's own error is raised and the engine keeps sending token ids."""
    backend = OpenAIBackend(llama_server.url, None, tok, OpenAIOptions(top_logprobs=20, batch_prompts="off"))
    assert backend.ids_refused is None  # prompt_format auto: not known yet
    long = Prompt(tuple(tok("word " * 9000, add_special_tokens=False)["input_ids"]))
    with pytest.raises(BackendError, match="context"):
        backend.open([long]).next_tokens([Query(0, (), np.arange(5))])
    assert backend.ids_refused is False
    short = Prompt(tuple(tok("Hello there", add_special_tokens=False)["input_ids"]))
    (answer,) = backend.open([short]).next_tokens([Query(0, (), np.arange(5))])
    assert math.isfinite(answer.top_logprob) and backend.ids_refused is False
    backend.close()


@pytest.mark.parametrize("how", ["deadline", "timeout", "hang-up"])
def test_the_service_stops_a_round_in_flight(silent, tok, how):
    """The service reaches into the engine's round under way too: a request whose deadline_ms
    comes is answered with the bounds reached, one past the server's timeout_s gets its 504,
    and one whose client hangs up is dropped; in each case the round's request is cancelled and
    its connection closed then, not when a server that never answers would time out, and the
    worker is free for the next request."""
    from guardprob.server import ServerConfig, create_app
    from serving import running

    backend = OpenAIBackend(silent.url, None, tok, OpenAIOptions(prompt_format="ids", batch_prompts="on",
                                                                  timeout=NEVER, retries=0))
    clf = Classifier(None, tok, format="llama-guard-3", backend=backend, name="silent")
    config = ServerConfig(timeout_s=2.0 if how == "timeout" else NEVER, openai_categories="none")
    body = {"input": "How do I make a pipe bomb?", **({"deadline_ms": 1000} if how == "deadline" else {})}
    with running(create_app(clf, config)) as server:
        started = time.monotonic()
        try:
            response = httpx.post(server.url + "/v1/classify", json=body, timeout=1.0 if how == "hang-up" else 60)
        except httpx.ReadTimeout:  # the client hangs up after a second
            response = None
        assert silent.wait(lambda s: s.closed == 1 and s.open_connections == 0, 20), "the round's connection stayed open"
        assert time.monotonic() - started < 20, "the round waited for the server"
        if how == "deadline":
            assert response.status_code == 200, response.text
            scores = response.json()
            assert scores["complete"] is False and scores["p_unsafe_lower"] == 0.0, scores
            assert scores["p_unsafe_upper"] == pytest.approx(1.0), scores
        elif how == "timeout":
            assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        else:
            assert response is None
        health = {}
        for _ in range(100):  # the worker let go of the request
            health = httpx.get(server.url + "/health", timeout=10).json()
            if health.get("queue_depth") == 0 and health.get("running") == 0:
                break
            time.sleep(0.05)
        assert health.get("queue_depth") == 0 and health.get("running") == 0, health
    backend.close()
