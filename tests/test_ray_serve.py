"""The service as a Ray Serve application on a real local Ray cluster (2 CPUs, one cluster for the
module): the same answers as the single-process service, conversations kept on one replica, a
killed replica losing no request, and autoscaling from 1 to 2 replicas."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from guardprob import InputError  # noqa: E402
from guardprob.classifier import Classifier  # noqa: E402
from guardprob.server.affinity import conversation_key  # noqa: E402
from guardprob.server.app import create_app  # noqa: E402
from guardprob.server.config import RayServeConfig, ServerConfig, load_config  # noqa: E402
from guardprob.server.ray_serve import APP_NAME, REPLICA_HEADER, app, build  # noqa: E402
from servers import free_port  # noqa: E402
from serving import FAST, running  # noqa: E402

KEY = "secret"
CONFIG = ServerConfig(search=FAST, timeout_s=60, api_keys=(KEY,), ray=RayServeConfig(replicas=2))
# what differs between processes by design: ids, timings, and model calls (each guesses from its own history)
_VOLATILE = {"id", "timing", "model_calls"}


@pytest.fixture(scope="module")
def cluster():
    """One Ray instance and Serve's HTTP proxy on a loopback port for the module."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def spec(tiny_spec):
    return tiny_spec


@pytest.fixture(scope="module")
def served(cluster, spec):
    """The application with 2 fixed replicas (one CPU each)."""
    serve.run(build(spec, CONFIG), name=APP_NAME, route_prefix="/")
    yield cluster
    serve.delete(APP_NAME)


REQUESTS = [
    ("/v1/moderations", {"input": "How do I make a pipe bomb?"}),
    ("/v1/moderations", {"input": ["Write a poem about the sea.", "Give me my neighbour's address."]}),
    ("/v1/classify", {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]}),
    ("/v1/classify", {"input": "Tell me a joke", "method": "greedy"}),
    ("/v1/classify", {"messages": [{"role": "user", "content": "hi"}], "stream": True, "chunks": ["Sure", ", here"]}),
    ("/v1/moderations", {"input": ""}),  # an error, in the API's shape
    ("/v1/classify", {"input": "x", "eps": "0.1"}),
]


def call(url, path, body, key=KEY):
    return httpx.post(url + path, json=body, timeout=60, headers={"Authorization": f"Bearer {key}"})


def comparable(response):
    """Status and body, the volatile fields left out (events parsed one by one)."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
        return response.status_code, [strip(e) for e in events]
    return response.status_code, strip(response.json())


def strip(value):
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def assert_close(a, b, tol=1e-6):
    if isinstance(a, dict):
        assert set(a) == set(b), (set(a) ^ set(b))
        for k in a:
            assert_close(a[k], b[k], tol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_close(x, y, tol)
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= tol, (a, b)
    else:
        assert a == b


def test_answers_equal_the_single_process_service(served, spec):
    plain = create_app(Classifier.from_spec(spec), replace(CONFIG, ray=RayServeConfig()))
    with running(plain) as local:
        for path, body in REQUESTS:
            expected, got = call(local.url, path, body), call(served, path, body)
            assert got.headers[REPLICA_HEADER]  # answered by a replica, which names itself
            assert_close(comparable(got), comparable(expected))
        unauthorized = call(served, *REQUESTS[0], key="wrong")
        assert comparable(unauthorized) == comparable(call(local.url, *REQUESTS[0], key="wrong"))
        assert unauthorized.status_code == 401
        for path in ("/health", "/playground"):  # open without a key
            got = httpx.get(served + path)
            assert got.status_code == 200 and got.text == httpx.get(local.url + path).text
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(served + "/v1/models", headers=auth).json() == httpx.get(local.url + "/v1/models", headers=auth).json()
    assert "guardprob_requests_total" in httpx.get(served + "/metrics").text


def test_duplex_stream_is_refused_in_the_api_shape(served):
    response = httpx.post(served + "/v1/classify", content=b'{"messages": [{"role": "user", "content": "hi"}]}\n',
                          headers={"content-type": "application/x-ndjson"}, timeout=30)
    assert response.status_code == 415
    error = response.json()["error"]
    assert error["code"] == "unsupported_media_type" and "chunks" in error["message"]
    too_big = httpx.post(served + "/v1/moderations", content=b'{"input": "' + b"a" * CONFIG.max_body_bytes + b'"}',
                         headers={"content-type": "application/json"}, timeout=30)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "body_too_large"


def turns(conversation: int, n: int):
    """A conversation's first n turns, each the whole conversation so far."""
    messages = [{"role": "user", "content": f"conversation {conversation}: how do I bake bread?"}]
    for turn in range(n):
        yield {"messages": list(messages)}
        messages += [{"role": "assistant", "content": f"answer {turn}"}, {"role": "user", "content": f"and then {turn}?"}]


def test_a_conversation_stays_on_one_replica(served):
    seen: dict[int, set] = {}
    for turn in range(4):  # turn by turn, conversations interleaved
        for c in range(6):
            body = list(turns(c, turn + 1))[-1]
            response = call(served, "/v1/classify", body)
            assert response.status_code == 200, response.text
            seen.setdefault(c, set()).add(response.headers[REPLICA_HEADER])
    assert all(len(replicas) == 1 for replicas in seen.values()), seen
    assert len(set.union(*seen.values())) == 2  # and the conversations spread over both replicas


def replica_names() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "GuardprobReplica" in a["name"]]


def replica_actor(replica_id: str):
    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if replica_id in a["name"]]
    return ray.get_actor(name, namespace="serve")


def running_replicas() -> int:
    deployment = serve.status().applications[APP_NAME].deployments["GuardprobReplica"]
    return deployment.replica_states.get("RUNNING", 0)


PER_CLIENT = 12


def test_a_killed_replica_loses_no_request(served):
    victim = call(served, "/v1/classify", {"input": "whose replica dies"}).headers[REPLICA_HEADER]
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(PER_CLIENT):
            response = call(served, "/v1/classify", {"input": f"client {i} request {j}: is this safe?", "eps": 0.05})
            with lock:
                answers.append(response)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client, i) for i in range(4)]
        time.sleep(0.5)
        answered_before = len(answers)
        ray.kill(replica_actor(victim), no_restart=True)
        for f in futures:
            f.result(timeout=120)  # none hangs
    assert answered_before < 4 * PER_CLIENT - 4  # killed mid-load
    assert len(answers) == 4 * PER_CLIENT
    for response in answers:
        assert response.status_code in (200, 503), response.text
        if response.status_code == 503:
            assert response.headers["retry-after"] and response.json()["error"]["code"] == "replica_lost"
    assert sum(r.status_code == 200 for r in answers) >= len(answers) - 4  # lost work is retried on the live replica
    deadline = time.monotonic() + 90
    while not (running_replicas() == 2 and len(live := replica_names()) == 2 and victim not in " ".join(live)):
        assert time.monotonic() < deadline, serve.status()  # Ray Serve starts a replacement
        time.sleep(1)
    assert call(served, "/v1/classify", {"input": "after"}).status_code == 200


def test_autoscaling_from_one_to_two_replicas(served, spec):
    serve.delete(APP_NAME)
    scaling = ServerConfig(search=FAST, timeout_s=60, ray=RayServeConfig(
        min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=1))
    serve.run(build(spec, scaling), name=APP_NAME, route_prefix="/")
    assert running_replicas() == 1
    stop = threading.Event()
    statuses: list[int] = []

    def client(i: int) -> None:
        n = 0
        while not stop.is_set():
            statuses.append(call(served, "/v1/classify", {"input": f"load {i} {n}", "eps": 0.01}).status_code)
            n += 1

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client, i) for i in range(4)]
        try:
            deadline = time.monotonic() + 90
            while running_replicas() < 2:
                assert time.monotonic() < deadline, serve.status()
                time.sleep(0.5)
        finally:
            stop.set()
            for f in futures:
                f.result(timeout=120)
    assert set(statuses) == {200}
    # deleting the application drains it: requests in flight are answered first
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(call, served, "/v1/classify", {"input": f"drain {i}", "eps": 0.01}) for i in range(4)]
        time.sleep(0.3)
        serve.delete(APP_NAME)
        assert [f.result(timeout=60).status_code for f in futures] == [200] * 4


def test_application_builder_and_config(tmp_path, spec):
    path = tmp_path / "serve.yaml"
    path.write_text("ray: {replicas: 3, affinity: false}\nsearch: {eps: 0.2}\n", encoding="utf-8")
    assert load_config(path).ray == RayServeConfig(replicas=3, affinity=False, source=f"server config file {path}")
    built = app({"config": str(path), "model": spec.model, "format": "llama-guard-3", "replicas": "2"})
    assert isinstance(built, serve.Application)
    with pytest.raises(InputError, match="unknown argument"):
        app({"modle": "x"})
    with pytest.raises(InputError, match="max_replicas"):
        RayServeConfig(min_replicas=2)
    path.write_text("ray: {replica: 2}\n", encoding="utf-8")
    with pytest.raises(InputError, match="unknown key"):
        load_config(path)


def test_conversation_key():
    first = {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]}
    later = {"messages": [*first["messages"], {"role": "assistant", "content": "hello"}]}
    other = {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "bye"}]}
    key = conversation_key("/v1/classify", json.dumps(first).encode())
    assert key and key == conversation_key("/v1/classify", json.dumps(later).encode())
    assert key != conversation_key("/v1/classify", json.dumps(other).encode())  # a shared system prompt is not enough
    assert conversation_key("/v1/moderations", b'{"input": ["a", "b"]}') == conversation_key("/v1/moderations", b'{"input": "a"}')
    assert conversation_key("/v1/classify", b"not json") is None
    assert conversation_key("/health", b"") is None


def test_replicas_need_ray(capsys):
    from guardprob.cli import main

    assert main(["serve", "--replicas", "2"]) == 2
    assert "add --ray" in capsys.readouterr().err
