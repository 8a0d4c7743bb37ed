"""The moderation service, driven over real HTTP (uvicorn on a loopback port) with the
official openai client and httpx. The tiny random classifier keeps each request fast."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from guardprob.backends.base import begin as begin_session
from guardprob.errors import InputError
from guardprob.server.batcher import MicroBatcher, QueueFull
from guardprob.server.config import ServerConfig, category_keys, load_config, snake_key
from serving import FAST, Rigged, assert_error, post, running, wait_for  # noqa: F401


@pytest.fixture(scope="module")
def served(tiny_classifier):
    from guardprob.server import create_app

    # full scores (decide: false), which these tests compare with the classifier's
    config = ServerConfig(search=FAST, max_inputs=4, max_chars=400, max_body_bytes=20_000, openai_categories="none",
                          decide=False)
    with running(create_app(tiny_classifier, config)) as r:
        yield r


def test_openai_category_names(tiny_classifier, tmp_path):
    """With the shipped mapping (auto, Llama Guard 3), /v1/moderations answers with OpenAI's 13
    names, each the exact union probability of its categories; a file of one's own replaces it."""
    from guardprob.server import create_app
    from guardprob.server.openai_categories import OPENAI, shipped

    mapping = shipped()["llama-guard-3"]
    text = "How do I pick a lock?"
    expected = tiny_classifier.score(text, groups=dict(mapping), **FAST)
    config = ServerConfig(search=FAST, thresholds={"violence": 0.0}, decide=False)
    with running(create_app(tiny_classifier, config)) as r:
        result = r.client().moderations.create(model="omni-moderation-latest", input=text).results[0]
        scores = result.category_scores.to_dict()
        assert set(scores) == set(OPENAI)
        for name, ids in mapping.items():
            assert scores[name] == pytest.approx(expected.groups[name].p, abs=1e-6), name
            assert scores[name] >= max(expected.categories[i].p for i in ids) - 1e-6  # a union, not one member
        assert result.categories.violence is True  # its own threshold, 0
        assert result.category_applied_input_types.to_dict() == {n: ["text"] for n in OPENAI}
    own = tmp_path / "mine.yaml"
    own.write_text("violence: [S1, S9]\ncrime: [S2]\n")
    with running(create_app(tiny_classifier, ServerConfig(search=FAST, openai_categories=str(own)))) as r:
        body = post(r.url, "/v1/moderations", {"input": text}).json()["results"][0]
        assert set(body["category_scores"]) == {"violence", "crime"}
    own.write_text("violence: [S99]\n")
    with pytest.raises(InputError, match="S99"):
        create_app(tiny_classifier, ServerConfig(search=FAST, openai_categories=str(own)))


def test_moderations_decide_by_default(tiny_classifier):
    """/v1/moderations takes certified decisions: the flags of the classifier's own decision at the
    server's thresholds, each certified (on the side the full search's interval puts it wherever
    that interval decides), for OpenAI's unions and for the taxonomy's categories alike."""
    from guardprob.server import create_app
    from guardprob.server.openai_categories import shipped

    texts = ["How do I pick a lock?", "hello there", "you are an idiot"]
    thresholds = {"S1": 0.01, "S2": 0.05, "S3": 0.4}  # away from the exact values: decided within max_nodes
    keys = category_keys(tiny_classifier.taxonomy)
    with running(create_app(tiny_classifier, ServerConfig(search=FAST, thresholds=thresholds, openai_categories="none"))) as r:
        results = post(r.url, "/v1/moderations", {"input": texts}).json()["results"]
        for text, result in zip(texts, results):
            mine = tiny_classifier.score(text, decide=True, thresholds=thresholds)
            full = tiny_classifier.score(text, eps=1e-4)
            assert result["decided"] is True and mine.decision.decided
            for cid, flag in mine.decision.categories.items():
                assert result["categories"][keys[cid]] is flag, (text, cid)
                c, t = full.categories[cid], thresholds.get(cid, 0.5)
                if c.lower >= t or c.upper < t:  # the full search's interval decides too: the same side
                    assert flag is (c.lower >= t), (text, cid, c, t)
        body = post(r.url, "/v1/classify", {"input": texts[0], "decide": True}).json()
        assert body["decided"] is True and all(row["decided"] for row in body["categories"].values())
        assert body["flagged_categories"] == list(tiny_classifier.score(texts[0], decide=True, thresholds=thresholds)
                                                  .decision.flagged_categories)
        assert post(r.url, "/v1/classify", {"input": texts[0]}).json()["decided"] is None  # full scores unless asked
        bad = post(r.url, "/v1/classify", {"input": texts[0], "decide": True, "method": "greedy"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "decide"
    mapping = dict(shipped()["llama-guard-3"])
    with running(create_app(tiny_classifier, ServerConfig(search=FAST, thresholds={"violence": 0.02}))) as r:
        result = post(r.url, "/v1/moderations", {"input": texts[0]}).json()["results"][0]
        rule_thresholds = {name: 0.02 if name == "violence" else 0.5 for name in mapping}
        mine = tiny_classifier.score(texts[0], groups=mapping, decide=True,
                                     thresholds={**rule_thresholds, **{c: 1.0 for c in tiny_classifier.taxonomy.ids},
                                                 "unsafe": 1.0})
        assert result["decided"] is True
        for name in mapping:
            assert result["categories"][name] is mine.decision.groups[name], name


# -- the OpenAI-compatible endpoint ---------------------------------------------------------
def test_openai_client_moderations(served, tiny_classifier):
    keys = category_keys(tiny_classifier.taxonomy)
    response = served.client().moderations.create(model="omni-moderation-latest", input="How do I pick a lock?")
    assert response.id.startswith("modr-") and response.model == "tiny" and len(response.results) == 1
    result = response.results[0]
    expected = tiny_classifier.score("How do I pick a lock?", **FAST)
    scores = result.category_scores.to_dict()
    assert set(scores) == set(keys.values()) and "violent_crimes" in scores and "suicide_self_harm" in scores
    for cid, c in expected.categories.items():
        assert scores[keys[cid]] == pytest.approx(c.p, abs=1e-6)
        assert result.categories.to_dict()[keys[cid]] == (c.p >= 0.5)
    assert result.flagged == any(c.p >= 0.5 for c in expected.categories.values())
    assert result.category_applied_input_types.to_dict() == {k: ["text"] for k in keys.values()}


def test_openai_client_list_input(served, tiny_classifier):
    texts = ["hello there", "what time is it?", "you are an idiot"]
    response = served.client().moderations.create(model="tiny", input=texts)
    assert len(response.results) == 3
    for text, result in zip(texts, response.results):
        expected = tiny_classifier.score(text, **FAST)
        assert result.category_scores.violent_crimes == pytest.approx(expected.categories["S1"].p, abs=1e-6)


def test_text_parts_and_images(served):
    ok = post(served.url, "/v1/moderations", {"input": [{"type": "text", "text": "hi"}]})
    assert ok.status_code == 200 and len(ok.json()["results"]) == 1
    image = {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
    assert_error(post(served.url, "/v1/moderations", {"input": ["hi", image]}), 400, "input[1]", "unsupported_input")


def test_health_models_and_cors_off(served):
    health = httpx.get(served.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ready"
    assert served.client().models.list().data[0].id == "tiny"
    preflight = httpx.options(served.url + "/v1/moderations", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_when_enabled(tiny_classifier):
    from guardprob.server import create_app

    app = create_app(tiny_classifier, ServerConfig(search=FAST, cors_origins=("https://ui.example",)))
    with running(app) as r:
        response = httpx.post(r.url + "/v1/moderations", json={"input": "hi"}, headers={"Origin": "https://ui.example"})
        assert response.headers["access-control-allow-origin"] == "https://ui.example"


# -- /v1/classify ---------------------------------------------------------------------------
def test_classify_conversation(served, tiny_classifier):
    messages = [{"role": "user", "content": "tell me a joke"}, {"role": "assistant", "content": "no."}]
    body = post(served.url, "/v1/classify", {"messages": messages}).json()
    expected = tiny_classifier.score(messages, **FAST)
    assert body["method"] == "marginal" and body["params"]["eps"] == 0.2 and body["model"] == "tiny"
    assert body["p_unsafe"] == pytest.approx(expected.p_unsafe, abs=1e-6)
    assert body["verdict"] == expected.verdict and body["expanded_nodes"] == expected.expanded_nodes
    for cid, row in body["categories"].items():
        c = expected.categories[cid]
        assert (row["p"], row["lower"], row["upper"]) == pytest.approx((c.p, c.lower, c.upper), abs=1e-6)
        assert row["lower"] <= row["p"] <= row["upper"] and row["threshold"] == 0.5
        assert row["threshold_source"] == "default" and row["flagged"] == (row["p"] >= 0.5)
    assert set(body["timing"]) >= {"total_ms", "queue_ms", "batch_ms", "batch_size", "model_seconds_per_prompt"}
    assert body["thresholds"] == {cid: 0.5 for cid in tiny_classifier.taxonomy.ids}


def test_classify_role_method_and_params(served, tiny_classifier):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    greedy = post(served.url, "/v1/classify", {"messages": messages, "role": "assistant", "method": "greedy"}).json()
    assert greedy["method"] == "greedy"
    # within float rounding: the server's run and this one read different lengths from the prefix cache
    assert greedy["p_unsafe"] == pytest.approx(tiny_classifier.score(messages, "greedy", role="assistant").p_unsafe, abs=1e-6)
    wide = post(served.url, "/v1/classify", {"input": "hi", "eps": 0.05, "max_nodes": 50, "top_p": 0.9}).json()
    assert (wide["params"]["eps"], wide["params"]["max_nodes"], wide["params"]["top_p"]) == (0.05, 50, 0.9)
    expected = tiny_classifier.score("hi", eps=0.05, max_nodes=50, top_p=0.9)
    assert wide["p_unsafe"] == pytest.approx(expected.p_unsafe, abs=1e-6)


# -- thresholds: config file and calibration file ------------------------------------------
def test_config_file_thresholds(tmp_path, tiny_classifier):
    from guardprob.server import create_app

    path = tmp_path / "server.yaml"
    path.write_text("search: {eps: 0.2}\nthresholds:\n  S2: 0.0\n  hate: 1.0\n  Privacy: 0.0\nmax_inputs: 2\nopenai_categories: none\n")
    config = load_config(path)
    assert config.max_inputs == 2 and config.search == {"eps": 0.2}
    with running(create_app(tiny_classifier, config)) as r:
        result = r.client().moderations.create(model="tiny", input="hello").results[0]
        assert result.categories.non_violent_crimes is True and result.categories.privacy is True
        assert result.categories.hate is False and result.flagged is True
        body = post(r.url, "/v1/classify", {"input": "hello"}).json()
        assert body["thresholds"]["S2"] == 0.0 and body["categories"]["S10"]["threshold_source"] == "config"
        assert body["categories"]["S1"]["threshold_source"] == "default"
        assert {"S2", "S7"} <= set(body["flagged_categories"])


def test_calibration_file(tmp_path, tiny_classifier):
    from guardprob.evaluation.calibration import Calibration, Calibrator, load_calibration
    from guardprob.server import create_app

    path = tmp_path / "calibration-marginal.json"
    Calibration(
        {"S2": 0.01, "S4": 0.99},
        {"S2": Calibrator("temperature", temperature=3.0), "S4": Calibrator("isotonic", x=(0.0, 1.0), y=(0.5, 1.0))},
        method="marginal", taxonomy="llama-guard-3",
    ).save(path)
    calibration = load_calibration(path)
    config = ServerConfig(search=FAST, calibration=calibration, thresholds={"S4": 0.0}, decide=False)
    expected = tiny_classifier.score("hello", **FAST)
    with running(create_app(tiny_classifier, config)) as r:
        result = r.client().moderations.create(model="tiny", input="hello").results[0]
        s2 = calibration.calibrate("S2", expected.categories["S2"].p)
        assert s2 != pytest.approx(expected.categories["S2"].p)
        assert result.category_scores.non_violent_crimes == pytest.approx(s2, abs=1e-6)
        assert result.categories.non_violent_crimes == (s2 >= 0.01)
        assert result.category_scores.child_sexual_exploitation >= 0.5  # isotonic maps [0, 1] to [0.5, 1]
        body = post(r.url, "/v1/classify", {"input": "hello"}).json()
        rows = body["categories"]
        assert body["calibrated"] is True and rows["S2"]["calibrated"] == pytest.approx(s2, abs=1e-6)
        assert rows["S2"]["threshold_source"] == "calibration" and rows["S4"]["threshold_source"] == "config"
        assert rows["S1"]["threshold_source"] == "default"
        other = post(r.url, "/v1/classify", {"input": "hello", "method": "greedy"}).json()
        assert other["calibrated"] is False and other["categories"]["S2"]["threshold_source"] == "default"
    with pytest.raises(InputError, match="fitted for method 'marginal'"):
        ServerConfig(method="joint", calibration=calibration)


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("a.yaml", "max_batch: 0\n", "field 'max_batch'"),
        ("a.yaml", "batch_size: 3\n", "unknown field"),
        ("a.json", "{not json", "not valid JSON"),
        ("a.yaml", "thresholds: [1]\n", "field 'thresholds' must be a mapping"),
        ("a.yaml", "thresholds: {S1: 2}\n", "threshold 'S1'"),
        ("a.yaml", "method: best\n", "field 'method'"),
        ("a.yaml", "search: {beam: 3}\n", "unknown key"),
        ("a.toml", "x = 1\n", "unknown extension"),
        ("a.yaml", "- 1\n", "expected a mapping"),
    ],
)
def test_config_file_errors(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InputError, match=match) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_config_errors_needing_the_model(tmp_path, tiny_classifier):
    from guardprob.server import create_app

    path = tmp_path / "s.yaml"
    path.write_text("thresholds: {S99: 0.5}\n")
    with pytest.raises(InputError, match="'S99', not a category") as info:
        create_app(tiny_classifier, load_config(path))
    assert str(path) in str(info.value) and "violent_crimes" in str(info.value)
    path.write_text("search: {eps: 7}\n")
    with pytest.raises(InputError, match="field 'search'.*eps=7"):
        create_app(tiny_classifier, load_config(path))
    with pytest.raises(InputError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_category_keys():
    from guardprob.taxonomy import Category, Taxonomy

    assert snake_key("Suicide & Self-Harm") == "suicide_self_harm"
    taxonomy = Taxonomy("t", (Category("A", "Hate!"), Category("B", "hate"), Category("C", "Other")))
    assert category_keys(taxonomy) == {"A": "hate_a", "B": "hate_b", "C": "other"}


# -- auth and logs --------------------------------------------------------------------------
def test_api_keys(tiny_classifier, caplog):
    from guardprob.server import create_app

    secret = "sk-test-SECRET-123"
    app = create_app(tiny_classifier, ServerConfig(search=FAST, api_keys=(secret, "other-key")))
    with running(app) as r, caplog.at_level(logging.INFO, logger="guardprob.server.access"):
        assert_error(post(r.url, "/v1/moderations", {"input": "hi"}), 401, code="invalid_api_key")
        wrong = post(r.url, "/v1/moderations", {"input": "hi"}, headers={"Authorization": "Bearer nope"})
        assert_error(wrong, 401, code="invalid_api_key")
        assert_error(post(r.url, "/v1/classify", {"input": "hi"}, headers={"Authorization": secret}), 401)
        with pytest.raises(openai.AuthenticationError):
            r.client(api_key="nope").moderations.create(model="tiny", input="hi")
        assert r.client(api_key=secret).moderations.create(model="tiny", input="hi").results
        assert post(r.url, "/v1/classify", {"input": "hi"}, headers={"Authorization": "Bearer other-key"}).status_code == 200
        assert httpx.get(r.url + "/health").status_code == 200  # probes need no key
    lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "guardprob.server.access"]
    assert {line["status"] for line in lines} >= {200, 401}
    assert all({"request_id", "method", "path", "status", "ms"} <= set(line) for line in lines)
    assert secret not in caplog.text and "nope" not in caplog.text


# -- bad input ------------------------------------------------------------------------------
BAD_MODERATIONS = [
    ("malformed json", '{"input": ', 400, None, "invalid_json"),
    ("not an object", '["hi"]', 400, None, "invalid_json"),
    ("wrong type", '{"input": 5}', 422, "input", "invalid_type"),
    ("wrong item type", '{"input": ["ok", 3]}', 422, "input[1]", "invalid_type"),
    ("missing input", '{"model": "tiny"}', 422, "input", "missing_field"),
    ("empty text", '{"input": "  "}', 422, "input", "empty_input"),
    ("empty item", '{"input": ["ok", ""]}', 422, "input[1]", "empty_input"),
    ("empty list", '{"input": []}', 422, "input", "empty_input"),
    ("too many", json.dumps({"input": ["a", "b", "c", "d", "e"]}), 413, "input", "too_many_inputs"),
    ("too long", json.dumps({"input": "x" * 401}), 413, "input", "input_too_long"),
    ("unknown field", '{"input": "hi", "temperature": 0}', 400, "temperature", "unknown_parameter"),
    ("body too large", json.dumps({"input": "x" * 30_000}), 413, None, "body_too_large"),
]


@pytest.mark.parametrize(("case", "content", "status", "param", "code"), BAD_MODERATIONS, ids=[c[0] for c in BAD_MODERATIONS])
def test_bad_moderation_input(served, case, content, status, param, code):
    assert_error(post(served.url, "/v1/moderations", content=content), status, param, code)


BAD_CLASSIFY = [
    ("unknown method", {"input": "hi", "method": "best"}, 400, "method", "invalid_value"),
    ("bad eps", {"input": "hi", "eps": 3}, 400, "eps", "invalid_value"),
    ("eps as string", {"input": "hi", "eps": "0.1"}, 422, "eps", "invalid_type"),
    ("bad max_nodes", {"input": "hi", "max_nodes": 0}, 400, "max_nodes", "invalid_value"),
    ("max_nodes over the server's", {"input": "hi", "max_nodes": 10**6}, 400, "max_nodes", "invalid_value"),
    ("both inputs", {"input": "hi", "messages": [{"role": "user", "content": "x"}]}, 422, "messages", "missing_field"),
    ("neither input", {"role": "user"}, 422, "messages", "missing_field"),
    ("empty messages", {"messages": []}, 422, "messages", "empty_input"),
    ("bad role", {"messages": [{"role": "wizard", "content": "x"}]}, 422, "messages[0].role", "invalid_type"),
    ("judged role absent", {"input": "hi", "role": "assistant"}, 400, "role", "invalid_input"),
    ("bad message role, role given", {"messages": [{"role": "wizard", "content": "x"}], "role": "user"}, 422,
     "messages[0].role", "invalid_type"),
    ("content type", {"messages": [{"role": "user", "content": 1}]}, 422, "messages[0].content", "invalid_type"),
    ("empty content", {"messages": [{"role": "user", "content": ""}]}, 422, "messages[0].content", "empty_input"),
    ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content[0]", "unsupported_input"),
    ("over max_chars", {"input": "y" * 500}, 413, "input", "input_too_long"),
]


@pytest.mark.parametrize(("case", "body", "status", "param", "code"), BAD_CLASSIFY, ids=[c[0] for c in BAD_CLASSIFY])
def test_bad_classify_input(served, case, body, status, param, code):
    assert_error(post(served.url, "/v1/classify", body), status, param, code)


def test_over_model_context(tiny_classifier):
    from guardprob.server import create_app

    with running(create_app(tiny_classifier, ServerConfig(search=FAST))) as r:
        # The tiny model's context is 2048 tokens, one per character; the template takes ~900.
        error = assert_error(post(r.url, "/v1/moderations", {"input": ["ok", "z" * 1500]}), 413, "input[1]")
        assert error["code"] == "context_length_exceeded" and "context" in error["message"]
        assert post(r.url, "/v1/moderations", {"input": "ok"}).status_code == 200


def test_unexpected_error_is_answered_logged_and_counted(tiny_classifier, monkeypatch):
    from guardprob.server import create_app

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    with running(create_app(tiny_classifier, ServerConfig(search=FAST))) as r:
        monkeypatch.setattr(tiny_classifier, "prompt", broken)
        response = post(r.url, "/v1/moderations", {"input": "hi"}, headers={"x-request-id": "req-1"})
        assert_error(response, 500, code="internal_error")
        assert response.headers["x-request-id"] == "req-1"
        metrics = httpx.get(r.url + "/metrics").text
        assert 'guardprob_requests_total{path="/v1/moderations",status="500"} 1.0' in metrics
        assert 'guardprob_errors_total{code="internal_error"} 1.0' in metrics


def test_unknown_path_and_method(served):
    assert_error(httpx.get(served.url + "/v1/nothing"), 404, code="not_found")
    assert_error(httpx.get(served.url + "/v1/moderations"), 405, code="method_not_allowed")


# -- load shedding, timeouts, failures -------------------------------------------------------
def test_queue_full_answers_503(tiny_classifier):
    from guardprob.server import create_app

    rigged = Rigged(tiny_classifier, delay=1.5)
    config = ServerConfig(search=FAST, queue_size=2, max_inputs=2, max_batch=1, batch_wait_ms=0)
    with running(create_app(rigged, config)) as r, ThreadPoolExecutor(4) as pool:
        slow = [pool.submit(post, r.url, "/v1/moderations", {"input": "SLOW 0"})]
        wait_for(lambda: rigged.calls == [1])  # the first is being scored
        slow += [pool.submit(post, r.url, "/v1/moderations", {"input": f"SLOW {i}"}) for i in (1, 2)]
        wait_for(lambda: httpx.get(r.url + "/health").json()["queue_depth"] == 2)  # the other two wait
        refused = post(r.url, "/v1/moderations", {"input": "hi"})
        assert_error(refused, 503, code="queue_full")
        assert refused.headers["retry-after"] == "1"
        with pytest.raises(openai.InternalServerError):
            r.client().moderations.create(model="tiny", input=["a", "b"])  # all or nothing
        assert [f.result().status_code for f in slow] == [200, 200, 200]
        assert post(r.url, "/v1/moderations", {"input": "hi"}).status_code == 200
        assert 'guardprob_errors_total{code="queue_full"} 2.0' in httpx.get(r.url + "/metrics").text


def test_timeout_answers_504_and_worker_recovers(tiny_classifier):
    from guardprob.server import create_app

    rigged = Rigged(tiny_classifier, delay=1.0)
    config = ServerConfig(search=FAST, timeout_s=0.3, batch_wait_ms=0)
    with running(create_app(rigged, config)) as r, ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, r.url, "/v1/moderations", {"input": "SLOW"})
        wait_for(lambda: rigged.calls == [1])
        queued = post(r.url, "/v1/classify", {"input": "waits behind the slow one"})
        assert_error(queued, 504, code="timeout")
        assert_error(first.result(), 504, code="timeout")
        time.sleep(1.0)  # the slow batch ends; the timed-out queued request was never scored
        assert rigged.calls == [1]
        ok = post(r.url, "/v1/classify", {"input": "fine"})
        assert ok.status_code == 200


def test_failing_request_does_not_affect_its_batch(tiny_classifier):
    """Interleaved runs: requests queued together form one run; when it fails, each is run alone."""
    from guardprob.server import create_app

    rigged = Rigged(tiny_classifier, delay=1.5)
    config = ServerConfig(search=FAST, max_batch=8, continuous=False)
    texts = [f"message number {i}" for i in range(5)] + ["BOOM"]
    with running(create_app(rigged, config)) as r, ThreadPoolExecutor(len(texts) + 1) as pool:
        # A slow request holds the worker while the others queue, so they form one batch.
        slow = pool.submit(post, r.url, "/v1/classify", {"input": "SLOW"})
        wait_for(lambda: rigged.calls == [1])
        futures = [pool.submit(post, r.url, "/v1/classify", {"input": t}) for t in texts]
        wait_for(lambda: httpx.get(r.url + "/health").json()["queue_depth"] == len(texts))
        answers = [f.result() for f in futures]
        assert slow.result().status_code == 200
        assert_error(answers[-1], 500, code="scoring_failed")
        for text, answer in zip(texts, answers[:-1]):
            assert answer.status_code == 200, answer.text
            expected = tiny_classifier.score(text, **FAST)
            assert answer.json()["p_unsafe"] == pytest.approx(expected.p_unsafe, abs=1e-6)
        assert rigged.calls == [1, len(texts)] + [1] * len(texts)  # the batch fails, then each alone
        metrics = httpx.get(r.url + "/metrics").text
        assert "guardprob_batch_fallbacks_total 1.0" in metrics
        assert post(r.url, "/v1/classify", {"input": "after"}).status_code == 200


def test_a_failing_request_does_not_affect_the_calls_it_shared(tiny_classifier):
    """Continuous batching: requests share each model call; when a call fails because of one
    of them, every prompt it held runs again alone, and only that request gets an error."""
    import copy

    from guardprob.server import create_app

    clf = copy.copy(tiny_classifier)
    inner = tiny_classifier.backend
    mixed: list[int] = []

    class Failing:
        def __getattr__(self, name):
            return getattr(inner, name)

        def open(self, prompts):
            return self._rig(inner.open(prompts), prompts)

        def begin(self, prompts):  # the classifier opens sessions that prefill in steps
            return self._rig(begin_session(inner, prompts), prompts)

        def _rig(self, session, prompts):
            bad = {i for i, p in enumerate(prompts) if "BOOM" in tiny_classifier.tokenizer.decode(list(p.ids))}
            add, answer = session.add, session.next_tokens

            def add_prompts(more):
                base = add(more)
                bad.update(base + i for i, p in enumerate(more) if "BOOM" in tiny_classifier.tokenizer.decode(list(p.ids)))
                return base

            def next_tokens(queries):
                if any(q.prompt in bad for q in queries):
                    mixed.append(len({q.prompt for q in queries}))
                    raise RuntimeError("the engine failed on this prompt")
                return answer(queries)

            session.add, session.next_tokens = add_prompts, next_tokens
            return session

    clf.backend = Failing()
    config = ServerConfig(search=FAST, max_batch=8, batch_wait_ms=300, continuous=True)
    texts = [f"message number {i}" for i in range(5)] + ["BOOM"]
    with running(create_app(clf, config)) as r, ThreadPoolExecutor(len(texts)) as pool:
        answers = [f.result() for f in [pool.submit(post, r.url, "/v1/classify", {"input": t}) for t in texts]]
        assert_error(answers[-1], 500, code="scoring_failed")
        for text, answer in zip(texts, answers[:-1]):
            assert answer.status_code == 200, answer.text
            assert answer.json()["p_unsafe"] == pytest.approx(tiny_classifier.score(text, **FAST).p_unsafe, abs=1e-6)
        assert max(mixed) > 1 and mixed[-1] == 1  # a shared call failed; the bad prompt then failed alone
        assert "guardprob_batch_fallbacks_total 1.0" in httpx.get(r.url + "/metrics").text
        assert post(r.url, "/v1/classify", {"input": "after"}).status_code == 200


# -- lifecycle ------------------------------------------------------------------------------
def test_health_while_loading_then_ready(tiny_classifier):
    from guardprob.server import create_app

    release = threading.Event()

    def factory():
        release.wait(10)
        return tiny_classifier

    with running(create_app(factory, ServerConfig(search=FAST))) as r:
        health = httpx.get(r.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        assert_error(post(r.url, "/v1/moderations", {"input": "hi"}), 503, code="model_not_ready")
        assert 'guardprob_model_ready 0.0' in httpx.get(r.url + "/metrics").text
        release.set()
        wait_for(lambda: httpx.get(r.url + "/health").status_code == 200)
        assert post(r.url, "/v1/moderations", {"input": "hi"}).status_code == 200
        assert 'guardprob_model_ready 1.0' in httpx.get(r.url + "/metrics").text


def test_health_when_loading_fails():
    from guardprob.server import create_app

    failures = []

    def factory():
        raise InputError("no such model")

    with running(create_app(factory, on_load_error=failures.append)) as r:
        wait_for(lambda: failures)
        health = httpx.get(r.url + "/health")
        assert health.status_code == 503 and health.json() == {"status": "failed", "error": "no such model"}
        assert "no such model" in assert_error(post(r.url, "/v1/classify", {"input": "x"}), 503)["message"]


def test_graceful_shutdown_finishes_in_flight(tiny_classifier):
    from guardprob.server import create_app

    rigged = Rigged(tiny_classifier, delay=0.8)
    with running(create_app(rigged, ServerConfig(search=FAST))) as r, ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(post, r.url, "/v1/moderations", {"input": "SLOW"})
        wait_for(lambda: rigged.calls == [1])  # being scored
        r.server.should_exit = True
        assert in_flight.result().status_code == 200
        r.thread.join(10)
        assert not r.thread.is_alive()


def test_metrics_contents(served):
    post(served.url, "/v1/moderations", {"input": "hi"})
    post(served.url, "/v1/moderations", content="{")
    text = httpx.get(served.url + "/metrics").text
    assert 'guardprob_requests_total{path="/v1/moderations",status="200"}' in text
    assert 'guardprob_requests_total{path="/v1/moderations",status="400"}' in text
    assert 'guardprob_request_seconds_bucket{le="0.5",path="/v1/moderations"}' in text
    assert "guardprob_queue_depth 0.0" in text and "guardprob_batch_size_bucket" in text
    assert 'guardprob_errors_total{code="invalid_json"}' in text and "guardprob_inputs_scored_total" in text


# -- the command line -----------------------------------------------------------------------
def test_serve_command_options(tmp_path, monkeypatch):
    from guardprob.cli import build_parser
    from guardprob.server.cli import build_config

    path = tmp_path / "s.json"
    path.write_text(json.dumps({"max_batch": 4, "search": {"eps": 0.1, "top_p": 0.9}}))
    monkeypatch.setenv("GUARDPROB_API_KEYS", "k2, k3")
    args = build_parser().parse_args([
        "serve", "--port", "9001", "--config", str(path), "--api-key", "k1", "--eps", "0.01", "--cors-origin", "https://a",
    ])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 9001, None)
    config = build_config(args)
    assert config.api_keys == ("k1", "k2", "k3") and config.max_batch == 4
    assert config.search == {"eps": 0.01, "top_p": 0.9} and config.cors_origins == ("https://a",)


# -- the batcher alone ----------------------------------------------------------------------
class _Done:
    """A run that is done at its first step (the batcher unit tests' stand-in for a search)."""

    def __init__(self, results, before=None):
        self._results, self._before, self.stopped = results, before, []

    def step(self):
        if self._before is not None:
            self._before()
        return False

    def stop(self, item):
        self.stopped.append(item)

    def close(self):
        pass

    def results(self):
        return self._results


def test_batcher_groups_by_key_and_falls_back():
    calls = []

    def start(key, items):
        calls.append((key, list(items)))
        if "bad" in items:
            raise ValueError("bad item")
        return _Done([f"{key}:{item}" for item in items])

    batcher = MicroBatcher(start, max_batch=3, wait_s=0.2, queue_size=10)
    try:
        futures = batcher.submit("a", ["1", "2"]) + batcher.submit("b", ["x"]) + batcher.submit("a", ["3", "4"])
        assert [f.result(5).value for f in futures] == ["a:1", "a:2", "b:x", "a:3", "a:4"]
        assert sorted(len(items) for _, items in calls) == [1, 1, 3]  # a:1-3, then b:x and a:4 alone
        calls.clear()
        good, bad = batcher.submit("a", ["ok", "bad"])
        assert good.result(5).value == "a:ok" and good.result().batch_size == 1
        with pytest.raises(ValueError):
            bad.result(5)
        with pytest.raises(QueueFull):
            batcher.submit("a", [str(i) for i in range(11)])
        assert batcher.depth == 0
    finally:
        batcher.close(5)


def test_batcher_skips_cancelled_and_drains_on_close():
    started = threading.Event()
    release = threading.Event()
    seen = []

    def start(key, items):
        def before():
            started.set()
            release.wait(5)
            seen.extend(items)
        return _Done(list(items), before)

    batcher = MicroBatcher(start, max_batch=1, wait_s=0, queue_size=5, max_runs=1)
    first = batcher.submit("k", ["first"])[0]
    started.wait(5)
    cancelled, kept = batcher.submit("k", ["cancelled", "kept"])
    batcher.abandon([cancelled])
    release.set()
    batcher.close(5)
    assert first.result().value == "first" and kept.result().value == "kept" and seen == ["first", "kept"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def serve_cli(monkeypatch):
    """Run ``guardprob serve ARGS`` in a thread, with the model the test supplies; yields start()."""
    import uvicorn

    import guardprob.cli
    import guardprob.commands.options

    servers: list = []

    class Capturing(uvicorn.Server):
        def __init__(self, config):
            super().__init__(config)
            servers.append(self)

    monkeypatch.setattr(uvicorn, "Server", Capturing)
    threads: list[threading.Thread] = []
    codes: list[int] = []

    def start(args: list[str], build):
        spec = type("Spec", (), {"build": staticmethod(build)})()
        monkeypatch.setattr(guardprob.commands.options, "spec_from_args", lambda parsed: spec)
        thread = threading.Thread(target=lambda: codes.append(guardprob.cli.main(["serve", *args])), daemon=True)
        thread.start()
        threads.append(thread)
        wait_for(lambda: servers and servers[-1].started or codes)
        return servers, codes

    yield start
    for server in servers:
        server.should_exit = True
    for thread in threads:
        thread.join(20)


def test_serve_command_end_to_end(serve_cli, tiny_classifier, tmp_path):
    port = _free_port()
    config = tmp_path / "server.yaml"
    config.write_text("search: {eps: 0.2}\nthresholds: {S2: 0.0}\nopenai_categories: none\n")
    servers, codes = serve_cli(["--port", str(port), "--config", str(config), "--api-key", "k1"], lambda: tiny_classifier)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(url + "/health").status_code == 200)
    client = openai.OpenAI(base_url=url + "/v1", api_key="k1", max_retries=0)
    result = client.moderations.create(model="tiny", input="hello").results[0]
    assert result.categories.non_violent_crimes is True
    assert httpx.post(url + "/v1/moderations", json={"input": "hi"}).status_code == 401
    servers[-1].should_exit = True
    wait_for(lambda: codes)
    assert codes == [0]


def test_serve_command_exits_2_when_the_model_fails(serve_cli, capsys):
    from guardprob.errors import ModelLoadError

    def build():
        raise ModelLoadError("could not load model 'nope'")

    _, codes = serve_cli(["--port", str(_free_port())], build)
    wait_for(lambda: codes)
    assert codes == [2] and "could not load model 'nope'" in capsys.readouterr().err
