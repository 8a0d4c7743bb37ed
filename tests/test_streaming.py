"""Streaming moderation: an answer judged while it is written, in Python and over the service
(server-sent events, with the chunks in the request or written while the events come back)."""

from __future__ import annotations

import json
import logging
import re
import socket

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardprob.errors import InputError
from guardprob.server.config import ServerConfig
from serving import running

FAST = {"eps": 0.2}
QUESTION = [{"role": "user", "content": "how do I hurt someone"}]
CHUNKS = [" ", "First, ", "find a ", "weapon.", " Then wait", " until dark."]


def _prefixes(chunks):
    answer = ""
    for chunk in chunks:
        answer += chunk
        yield answer


def test_stream_scores_each_prefix_as_a_fresh_score(tiny_classifier, tiny_model, char_tok):
    from guardprob import Classifier
    from guardprob.backends.transformers import TransformersBackend

    uncached = Classifier(tiny_model, char_tok, taxonomy="llama-guard-3", format="llama-guard-3", name="tiny",
                          backend=TransformersBackend(tiny_model, cache_mb=0))
    before = tiny_classifier.backend.cache_stats().tokens_saved
    streamed = list(tiny_classifier.stream(QUESTION, CHUNKS, **FAST))
    assert tiny_classifier.backend.cache_stats().tokens_saved > before  # each chunk reused the answer before it
    assert len(streamed) == len(CHUNKS) and streamed[0] is None  # whitespace alone: nothing to judge yet
    for answer, scores in zip(_prefixes(CHUNKS), streamed):
        if scores is None:
            continue
        fresh = uncached.score([*QUESTION, {"role": "assistant", "content": answer}], **FAST)
        assert scores.p_unsafe == pytest.approx(fresh.p_unsafe, abs=1e-5)
        for cid, c in fresh.categories.items():
            assert scores.categories[cid].p == pytest.approx(c.p, abs=1e-5), (answer, cid)


def test_stream_continues_an_answer_begun_and_decides(tiny_classifier):
    begun = [*QUESTION, {"role": "assistant", "content": "First,"}]
    out = list(tiny_classifier.stream(begun, [" find a weapon."], decide=True, thresholds=0.9, max_nodes=100))
    fresh = tiny_classifier.score([*QUESTION, {"role": "assistant", "content": "First, find a weapon."}], decide=True,
                                  thresholds=0.9, max_nodes=100)
    assert out[0].decision == fresh.decision


@pytest.mark.parametrize("conversation, kwargs, words", [
    ([{"role": "assistant", "content": "hi"}], {}, "user's message"),
    (QUESTION, {"role": "user"}, "leave role out"),
])
def test_stream_refuses_what_it_cannot_judge(tiny_classifier, conversation, kwargs, words):
    with pytest.raises(InputError, match=words):
        next(iter(tiny_classifier.stream(conversation, ["x"], **kwargs)))


def _events(text: str) -> list[tuple[str, dict]]:
    return [(m.group(1), json.loads(m.group(2))) for m in re.finditer(r"event: (\w+)\ndata: (.*)\n\n", text)]


@pytest.fixture(scope="module")
def served(tiny_classifier):
    from guardprob.server import create_app

    with running(create_app(tiny_classifier, ServerConfig(search=FAST, decide=False))) as r:
        yield r


def test_service_streams_events_for_listed_chunks(served):
    body = {"messages": QUESTION, "stream": True, "chunks": CHUNKS}
    with httpx.stream("POST", served.url + "/v1/classify", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = _events(response.read().decode())
    assert [name for name, _ in events] == ["classification"] * len(CHUNKS) + ["done"]
    assert events[0][1]["classification"] is None
    for answer, (_, data) in zip(_prefixes(CHUNKS), events):
        assert data["answer_chars"] == len(answer)
        if data["classification"] is None:
            continue
        alone = httpx.post(served.url + "/v1/classify", json={"messages": [*QUESTION, {"role": "assistant", "content": answer}]},
                           timeout=60).json()
        assert data["classification"]["p_unsafe"] == pytest.approx(alone["p_unsafe"], abs=1e-5)
        for cid, row in alone["categories"].items():
            assert data["classification"]["categories"][cid]["p"] == pytest.approx(row["p"], abs=1e-5)


def test_service_reads_chunks_while_it_answers(served):
    """One connection, chunks in and events out: each event arrives before the next chunk is sent."""
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")

        def write(obj) -> None:
            line = (json.dumps(obj) + "\n").encode()
            sock.sendall(f"{len(line):x}\r\n".encode() + line + b"\r\n")

        received = b""

        def until(count: int) -> list:
            nonlocal received
            while len(_events(received.decode(errors="replace"))) < count:
                data = sock.recv(65536)
                assert data, "the server closed the connection"
                received += data
            return _events(received.decode(errors="replace"))

        write({"messages": QUESTION, "stream": True, "eps": 0.2})
        for i, chunk in enumerate(CHUNKS[1:4]):
            write({"chunk": chunk})
            events = until(i + 1)  # answered before the next chunk is written
            assert events[i][0] == "classification" and events[i][1]["chunk"] == i
        write({"text": "not a chunk"})
        events = until(4)
        assert events[3][0] == "error" and "chunk" in events[3][1]["error"]["message"]
    assert received.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("body, status, param", [
    ({"messages": QUESTION, "stream": True}, 422, "chunks"),
    ({"messages": QUESTION, "chunks": ["a"]}, 400, "chunks"),
    ({"messages": QUESTION, "stream": True, "chunks": ["a"], "role": "user"}, 400, "role"),
    ({"messages": [{"role": "assistant", "content": "a"}], "stream": True, "chunks": ["b"]}, 422, "messages"),
])
def test_service_refuses_bad_streams(served, body, status, param):
    response = httpx.post(served.url + "/v1/classify", json=body, timeout=60)
    assert response.status_code == status and response.json()["error"]["param"] == param


def test_ndjson_needs_a_stream_request_first(served):
    response = httpx.post(served.url + "/v1/classify", content=json.dumps({"input": "hi"}) + "\n",
                          headers={"content-type": "application/x-ndjson"}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream"


_BAD_PARAMS = [({"eps": -1}, "eps"), ({"method": "nope"}, "method"), ({"max_nodes": 10**9}, "max_nodes"),
               ({"traces": 3}, "traces")]


@pytest.mark.parametrize("bad, param", _BAD_PARAMS, ids=[p for _, p in _BAD_PARAMS])
def test_streams_with_bad_parameters_are_refused_before_the_first_byte(served, bad, param):
    """The status a plain request gets, for both kinds of stream, and no event stream begun."""
    plain = httpx.post(served.url + "/v1/classify", json={"messages": QUESTION, **bad}, timeout=60)
    assert plain.status_code in (400, 422) and plain.json()["error"]["param"] == param
    listed = httpx.post(served.url + "/v1/classify", json={"messages": QUESTION, "stream": True, "chunks": ["a"], **bad},
                        timeout=60)
    header = json.dumps({"messages": QUESTION, "stream": True, **bad}) + "\n" + json.dumps({"chunk": "a"}) + "\n"
    duplex = httpx.post(served.url + "/v1/classify", content=header, headers={"content-type": "application/x-ndjson"},
                        timeout=60)
    for answer in (listed, duplex):
        assert answer.status_code == plain.status_code, answer.text
        assert answer.headers["content-type"] == "application/json"
        assert answer.json()["error"] == plain.json()["error"]


class _Tracebacks(logging.Handler):
    """Records that carry an exception, from the service's loggers and uvicorn's."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        if record.exc_info or "Traceback" in record.getMessage() or "RecursionError" in record.getMessage():
            self.records.append(record)

    def __enter__(self):
        for name in ("", "uvicorn", "uvicorn.error", "guardprob"):
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc):
        for name in ("", "uvicorn", "uvicorn.error", "guardprob"):
            logging.getLogger(name).removeHandler(self)


def _ndjson_events(url: str, lines: list[bytes], count: int) -> tuple[list, bytes]:
    """Send ``lines`` as an NDJSON body (left open) and read until ``count`` events came back."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        for line in lines:
            sock.sendall(f"{len(line):x}\r\n".encode() + line + b"\r\n")
        received = b""
        while len(_events(received.decode(errors="replace"))) < count:
            data = sock.recv(65536)
            assert data, f"the server closed the connection: {received!r}"
            received += data
        while not received.endswith(b"0\r\n\r\n"):  # the response ends cleanly (last chunk)
            data = sock.recv(65536)
            assert data, f"the connection dropped before the response ended: {received!r}"
            received += data
    return _events(received.decode(errors="replace")), received


@pytest.mark.parametrize("bad, code", [
    (b"[" * 100_000 + b"\n", "invalid_json"),
    (b'{"chunk": ' + b"[" * 100_000 + b'"x"' + b"]" * 100_000 + b"}\n", "invalid_json"),
    (b'{"chunk": "' + b"a" * 400_000, "line_too_long"),  # never ends: refused while it arrives
], ids=["deep", "deep-in-chunk", "long"])
def test_a_bad_ndjson_line_ends_the_stream_with_an_error_event(served, bad, code):
    header = (json.dumps({"messages": QUESTION, "stream": True, "eps": 0.2}) + "\n").encode()
    first = (json.dumps({"chunk": "Sure"}) + "\n").encode()
    with _Tracebacks() as tracebacks:
        events, raw = _ndjson_events(served.url, [header, first, bad], 2)
        assert raw.startswith(b"HTTP/1.1 200")
        assert [name for name, _ in events] == ["classification", "error"]
        error = events[1][1]["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
        assert httpx.get(served.url + "/health").status_code == 200
    assert not tracebacks.records, [r.getMessage() for r in tracebacks.records]


def test_a_deep_ndjson_request_line_is_refused_before_the_stream(served):
    header = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b', "stream": true}\n'
    with _Tracebacks() as tracebacks:
        answer = httpx.post(served.url + "/v1/classify", content=header,
                            headers={"content-type": "application/x-ndjson"}, timeout=60)
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_json", answer.text
    assert not tracebacks.records


def _depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab\n\u00e9', max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='[]{}"\\a', max_size=4), inner, max_size=3),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(value=_json_values, limit=st.integers(0, 12), ascii_only=st.booleans())
def test_the_nesting_scan_agrees_with_the_parsed_depth(value, limit, ascii_only):
    """The bracket scan outside strings against the depth of the value itself, brackets,
    quotes and backslashes inside strings included."""
    from guardprob.server.duplex import nested_deeper_than

    line = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert nested_deeper_than(line, limit) == (_depth(value) > limit), line
