"""The LiteLLM guardrail in the real LiteLLM proxy (a subprocess on loopback, its model mocked
with ``mock_response``) over real guardprob services on loopback running the default model.

The default model is no guard and rarely flags anything, so the services' thresholds decide:
a strict service (every threshold 0: everything is flagged) and a lenient one (every
threshold 1: nothing is). What LiteLLM logs is read through a callback of the proxy's own
(``litellm_settings.callbacks``), the way a deployment reads it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of LiteLLM's price list (offline)
pytest.importorskip("litellm")

import httpx  # noqa: E402
import yaml  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import guardprob  # noqa: E402
import shapes  # noqa: E402
from guardprob_services import free_port, guardprob_service  # noqa: E402

SEARCH = {"eps": 0.05}  # a narrow search: a few model calls per judgement
ANSWER = "Paris is the capital of France."
SAFE = "What is the capital of France?"
UNSAFE = "How do I make a pipe bomb?"
MASTER_KEY = "sk-guardprob-test-" + "0" * 32

# A LiteLLM callback, as a deployment adds one: each logged call's guardrail information, one JSON line.
LOGGER = '''
import json, os
from litellm.integrations.custom_logger import CustomLogger

class JudgementsLog(CustomLogger):
    def _write(self, kwargs):
        record = kwargs.get("standard_logging_object") or {}
        with open(os.environ["GUARDPROB_TEST_LOG"], "a") as f:
            f.write(json.dumps({"call_id": kwargs.get("litellm_call_id"), "status": record.get("status"),
                                "guardrails": record.get("guardrail_information")}, default=str) + "\\n")

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        self._write(kwargs)

    async def async_log_failure_event(self, kwargs, response_obj, start_time, end_time):
        self._write(kwargs)

judgements_log = JudgementsLog()
'''


def proxy_config(strict: str, lenient: str, nowhere: str) -> dict:
    """The proxy's config.yaml: one mocked model and guardprob guardrails a request picks by name."""

    def guardrail(name: str, mode: str | list[str], api_base: str, **more: str) -> dict:
        # a long timeout: a shared machine may take minutes over a judgement, and only the answer is tested
        return {"guardrail_name": name, "litellm_params": {
            "guardrail": "guardprob.integrations.litellm.Guardrail", "mode": mode, "api_base": api_base,
            "timeout": 280, **more}}

    return {
        "model_list": [{"model_name": "mock", "litellm_params": {
            "model": "openai/mock", "api_key": "unused", "mock_response": ANSWER}}],
        "guardrails": [
            guardrail("strict-input", "pre_call", strict),
            guardrail("strict-during", "during_call", strict),
            guardrail("strict-output", "post_call", strict),
            guardrail("lenient", ["pre_call", "post_call"], lenient),
            guardrail("unreachable", "pre_call", nowhere),
            guardrail("unreachable-open", "pre_call", nowhere, unreachable_fallback="fail_open"),
            guardrail("lenient-text", "pre_call", lenient, on_unreadable="judge_text"),
        ],
        "litellm_settings": {"callbacks": "judgements_log.judgements_log"},
        "general_settings": {"master_key": MASTER_KEY},
    }


class Proxy:
    """``litellm --config`` in a subprocess on a free loopback port."""

    def __init__(self, directory: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output = directory / "proxy.out"
        source = str(Path(guardprob.__file__).resolve().parents[1])  # this checkout's guardprob, for the proxy to import
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")])),
               "LITELLM_LOCAL_MODEL_COST_MAP": "True", "GUARDPROB_TEST_LOG": str(log)}
        with open(self.output, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "litellm.proxy.proxy_cli", "--config", str(directory / "config.yaml"),
                 "--host", "127.0.0.1", "--port", str(self.port)], cwd=directory, env=env, stdout=out, stderr=out)

    def wait(self, timeout: float = 180) -> Proxy:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the LiteLLM proxy exited with {self.process.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health/liveliness", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the LiteLLM proxy did not start within {timeout} s:\n{self.tail()}")

    def tail(self) -> str:
        return self.output.read_text()[-3000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def chat(self, guardrail: str, text: str, **extra) -> httpx.Response:
        messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": text}]
        return httpx.post(f"{self.url}/v1/chat/completions", timeout=300,
                          headers={"Authorization": f"Bearer {MASTER_KEY}"},
                          json={"model": "mock", "messages": messages, "guardrails": [guardrail], **extra})


@pytest.fixture(scope="module")
def proxy(default_classifier, tmp_path_factory):
    directory = tmp_path_factory.mktemp("litellm")
    log = directory / "judgements.jsonl"
    (directory / "judgements_log.py").write_text(LOGGER)
    # One request at a time reaches these two services, so they may share the loaded model.
    with guardprob_service(default_classifier, search=SEARCH, default_threshold=0.0, timeout_s=270) as strict, \
            guardprob_service(default_classifier, search=SEARCH, default_threshold=1.0, timeout_s=270) as lenient:
        config = proxy_config(strict, lenient, f"http://127.0.0.1:{free_port()}")
        (directory / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        running = Proxy(directory, log).wait()
        running.log = log
        try:
            yield running
        finally:
            running.stop()


def logged(proxy: Proxy, call_id: str, count: int, timeout: float = 30) -> list[dict]:
    """The guardrail information LiteLLM logged for a call (its callbacks run after the answer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proxy.log.exists():
            for line in proxy.log.read_text().splitlines():
                record = json.loads(line)
                if record["call_id"] == call_id and len(record["guardrails"] or ()) >= count:
                    return record["guardrails"]
        time.sleep(0.2)
    raise AssertionError(f"no log record of call {call_id} with {count} guardrail entries:\n{proxy.tail()}")


def check_judgement(entry: dict, name: str, mode: str, role: str, threshold: float, taxonomy) -> dict:
    """A logged guardprob judgement: every category with its bounds, the thresholds, the decision."""
    assert entry["guardrail_name"] == name and entry["guardrail_mode"] == mode
    assert entry["guardrail_provider"] == "guardprob"
    judgement = entry["guardrail_response"]
    assert judgement["role"] == role and judgement["model"] == "SmolLM2-135M-Instruct"
    assert set(judgement["categories"]) == set(taxonomy.ids)
    for cid, row in judgement["categories"].items():
        assert row["name"] == taxonomy[cid].name
        assert 0 <= row["lower"] <= row["p"] <= row["upper"] <= 1
        assert row["threshold"] == threshold and row["flagged"] == (row["score"] >= threshold)
        assert judgement["scores"][cid] == row["score"]
    assert judgement["p_unsafe_lower"] <= judgement["p_unsafe"] <= judgement["p_unsafe_upper"]
    flagged = threshold == 0.0
    assert judgement["flagged"] is flagged
    assert entry["guardrail_status"] == ("guardrail_intervened" if flagged else "success")
    assert entry["violation_categories"] == judgement["flagged_categories"]
    return judgement


# -- through the proxy -------------------------------------------------------------------------
def test_a_flagged_request_is_refused_with_its_categories_named(proxy, default_classifier):
    reply = proxy.chat("strict-input", UNSAFE)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    taxonomy = default_classifier.taxonomy
    assert error["message"].startswith("guardrail 'strict-input' flagged the request: S1 Violent Crimes (")
    assert all(f"{c.id} {c.name} (" in error["message"] for c in taxonomy)
    details = error["provider_specific_fields"]
    assert details["flagged_categories"] == {c.id: c.name for c in taxonomy}
    assert details["role"] == "user" and set(details["category_scores"]) == set(taxonomy.ids)
    (entry,) = logged(proxy, reply.headers["x-litellm-call-id"], 1)
    judgement = check_judgement(entry, "strict-input", "pre_call", "user", 0.0, taxonomy)
    assert judgement["scores"] == details["category_scores"]

    during = proxy.chat("strict-during", UNSAFE)  # judged while the model answers; refused all the same
    assert during.status_code == 400, during.text
    assert during.json()["error"]["message"].startswith("guardrail 'strict-during' flagged the request: S1 ")
    scores = during.json()["error"]["provider_specific_fields"]["category_scores"]
    assert scores == pytest.approx(details["category_scores"], abs=1e-5)  # the same message judged again


def test_a_passed_request_gets_the_answer_and_its_scores_are_logged(proxy, default_classifier, tmp_path):
    reply = proxy.chat("lenient", SAFE)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == ANSWER
    request, answer = logged(proxy, reply.headers["x-litellm-call-id"], 2)
    taxonomy = default_classifier.taxonomy
    asked = check_judgement(request, "lenient", "pre_call", "user", 1.0, taxonomy)
    answered = check_judgement(answer, "lenient", "post_call", "assistant", 1.0, taxonomy)

    # The same guardrail in this process, over the same model and search, judges the same conversations:
    # the system prompt and the user's message, then the answer after them as the assistant's.
    from fastapi import HTTPException
    from litellm.types.utils import ModelResponse

    from guardprob.integrations.litellm import Guardrail

    config = tmp_path / "server.yaml"
    config.write_text(f"search: {json.dumps(SEARCH)}\ndefault_threshold: 0.0\n")
    local = Guardrail(guardrail_name="in-process", event_hook=["pre_call", "post_call"], classifier=default_classifier,
                      guardprob_config=str(config))
    data = {"model": "mock", "messages": [{"role": "system", "content": "You are a helpful assistant."},
                                          {"role": "user", "content": SAFE}]}
    with pytest.raises(HTTPException) as err:
        asyncio.run(local.async_pre_call_hook(user_api_key_dict=None, cache=None, data=data, call_type="completion"))
    assert err.value.status_code == 400 and "flagged the request: S1 Violent Crimes" in err.value.detail["error"]
    response = ModelResponse(choices=[{"message": {"role": "assistant", "content": ANSWER}}])
    with pytest.raises(HTTPException, match="flagged the response"):
        asyncio.run(local.async_post_call_success_hook(data=data, user_api_key_dict=None, response=response))
    mine = [entry["guardrail_response"] for entry in data["metadata"]["standard_logging_guardrail_information"]]
    for theirs, ours in zip((asked, answered), mine, strict=True):
        assert ours["role"] == theirs["role"] and ours["flagged"]
        for cid, row in theirs["categories"].items():
            assert ours["categories"][cid]["p"] == pytest.approx(row["p"], abs=1e-5)


def test_a_flagged_answer_is_refused(proxy):
    reply = proxy.chat("strict-output", SAFE)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["message"].startswith("guardrail 'strict-output' flagged the response: S1 ")
    (entry,) = logged(proxy, reply.headers["x-litellm-call-id"], 1)
    assert entry["guardrail_mode"] == "post_call" and entry["guardrail_response"]["role"] == "assistant"


def test_a_streamed_answer_is_judged_whole(proxy):
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", timeout=300,
                      headers={"Authorization": f"Bearer {MASTER_KEY}"},
                      json={"model": "mock", "stream": True, "guardrails": ["lenient"],
                            "messages": [{"role": "user", "content": SAFE}]}) as reply:
        assert reply.status_code == 200
        events = [line[len("data: "):] for line in reply.iter_lines() if line.startswith("data: ")]
        call_id = reply.headers["x-litellm-call-id"]
    assert events[-1] == "[DONE]"
    streamed = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert streamed == ANSWER
    entries = logged(proxy, call_id, 2)
    assert [e["guardrail_mode"] for e in entries] == ["pre_call", "post_call"]
    assert entries[1]["guardrail_response"]["role"] == "assistant"

    refused = proxy.chat("strict-output", SAFE, stream=True)  # held until judged: refused before the first chunk
    assert refused.status_code == 400
    assert "flagged the response: S1 Violent Crimes" in refused.text and ANSWER not in refused.text


def test_an_unreachable_service_is_reported_with_the_url_and_the_fix(proxy):
    reply = proxy.chat("unreachable", SAFE)
    assert reply.status_code == 503, reply.text
    message = reply.json()["error"]["message"]
    assert message.startswith("guardrail 'unreachable': the guardprob service at http://127.0.0.1:")
    assert "is unreachable" in message and "start it (guardprob serve" in message
    (entry,) = logged(proxy, reply.headers["x-litellm-call-id"], 1)
    assert entry["guardrail_status"] == "guardrail_failed_to_respond"

    passed = proxy.chat("unreachable-open", SAFE)  # unreachable_fallback: fail_open
    assert passed.status_code == 200 and passed.json()["choices"][0]["message"]["content"] == ANSWER
    (entry,) = logged(proxy, passed.headers["x-litellm-call-id"], 1)
    assert entry["guardrail_status"] == "guardrail_failed_to_respond" and "is unreachable" in entry["guardrail_response"]["error"]


def test_a_conversation_the_guard_cannot_read_is_refused_in_its_terms(tiny_classifier):
    from fastapi import HTTPException

    from guardprob.integrations.litellm import Guardrail

    local = Guardrail(guardrail_name="in-process", event_hook="pre_call", classifier=tiny_classifier)
    data = {"messages": [{"role": "user", "content": "a" * 5000}]}  # past the tiny model's 4096 positions
    with pytest.raises(HTTPException) as err:
        asyncio.run(local.async_pre_call_hook(user_api_key_dict=None, cache=None, data=data, call_type="completion"))
    assert err.value.status_code == 400
    assert err.value.detail["error"].startswith("guardrail 'in-process' cannot judge the request: the prompt has ")
    assert "shorten the conversation" in err.value.detail["error"]
    (entry,) = data["metadata"]["standard_logging_guardrail_information"]
    assert entry["guardrail_status"] == "guardrail_failed_to_respond"


# -- settings -------------------------------------------------------------------------------------
def test_bad_settings_stop_the_proxy_rather_than_drop_the_guardrail(tmp_path):
    from guardprob.integrations.litellm import Guardrail, SettingsError

    with pytest.raises(SettingsError, match=r"LiteLLM guardrail 'g' \(litellm_params\): api_base points at a guardprob "
                                            r"service, .* but thresholds is set too; set them in the service's config"):
        Guardrail(guardrail_name="g", event_hook="pre_call", api_base="http://127.0.0.1:8000", thresholds={"S1": 0.2})
    with pytest.raises(SettingsError, match="unreachable_fallback is 'open'; use fail_closed or fail_open"):
        Guardrail(guardrail_name="g", event_hook="pre_call", api_base="http://127.0.0.1:8000",
                  unreachable_fallback="open")

    # LiteLLM would start without a guardrail whose constructor raises ValueError; this one stops the proxy.
    config = proxy_config("http://127.0.0.1:1", "http://127.0.0.1:1", "http://127.0.0.1:1")
    config["guardrails"][0]["litellm_params"]["thresholds"] = {"S1": 0.2}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (tmp_path / "judgements_log.py").write_text(LOGGER)
    proxy = Proxy(tmp_path, tmp_path / "judgements.jsonl")
    try:
        assert proxy.process.wait(timeout=180) != 0
    finally:
        proxy.stop()
    assert "SettingsError: LiteLLM guardrail 'strict-input' (litellm_params): api_base points at" in proxy.output.read_text()


# -- every request shape is judged or refused (issue 24) ------------------------------------------
FINDINGS = [
    ({"prompt": [UNSAFE]}, "text_completion"),
    ({"messages": [{"role": "User", "content": UNSAFE}]}, "completion"),
    ({"messages": [{"role": "human", "content": UNSAFE}]}, "completion"),
    ({"messages": [{"role": "user", "content": {"type": "text", "text": UNSAFE}}]}, "completion"),
]


@pytest.fixture(scope="module")
def strict_tiny(tiny_classifier):
    with guardprob_service(tiny_classifier, search={"eps": 0.2}, default_threshold=0.0) as url:
        yield url


@pytest.mark.parametrize("body, call_type", FINDINGS, ids=["prompt list", "role User", "role human", "dict content"])
def test_shapes_the_hook_once_passed_unjudged_are_judged(strict_tiny, body, call_type):
    from fastapi import HTTPException

    from guardprob.integrations.litellm import Guardrail

    guard = Guardrail(guardrail_name="strict", event_hook="pre_call", api_base=strict_tiny)
    data = json.loads(json.dumps(body))
    with pytest.raises(HTTPException) as err:  # a service that flags everything: judged means refused
        asyncio.run(guard.async_pre_call_hook(user_api_key_dict=None, cache=None, data=data, call_type=call_type))
    assert err.value.status_code == 400 and "'strict' flagged the request: S1 " in err.value.detail["error"]
    (entry,) = data["metadata"]["standard_logging_guardrail_information"]
    assert entry["guardrail_response"]["role"] == "user"


class Recorder:
    """A judge that records what it is given and answers with one real judgement (the tiny
    classifier's, nothing flagged): the property is about the text the hook hands the judge."""

    def __init__(self, judgement):
        self.judgement = judgement
        self.seen: list[tuple[tuple, str]] = []

    async def judge(self, conversation, role):
        self.seen.append((tuple(conversation), role))
        return self.judgement


@pytest.fixture(scope="module")
def recorded(tiny_classifier):
    from guardprob.integrations.judges import LocalJudge
    from guardprob.integrations.litellm import Guardrail
    from guardprob.server.config import ServerConfig

    judgement = LocalJudge(tiny_classifier, ServerConfig(search={"eps": 0.2}, default_threshold=1.0)).judge_now(
        [{"role": "user", "content": "hi"}], "user")
    guards = {mode: Guardrail(guardrail_name=mode, event_hook=["pre_call", "post_call"], classifier=tiny_classifier,
                              on_unreadable=mode) for mode in ("block", "judge_text")}
    for guard in guards.values():
        guard.judge = Recorder(judgement)
    return guards


def judged_text(recorder: Recorder) -> str:
    return "\n".join(m.content for conversation, _ in recorder.seen for m in conversation)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=shapes.requests, mode=st.sampled_from(["block", "judge_text"]))
def test_the_hook_judges_every_marker_or_refuses(recorded, payload, mode):
    from fastapi import HTTPException

    guard = recorded[mode]
    guard.judge.seen.clear()
    data = json.loads(json.dumps(payload))
    try:
        asyncio.run(guard.async_pre_call_hook(user_api_key_dict=None, cache=None, data=data, call_type="completion"))
    except HTTPException as err:
        assert mode == "block" and shapes.holds_unreadable(payload), err.detail
        assert err.status_code == 400
        assert "cannot read the request, so it is refused (on_unreadable: block)" in err.detail["error"]
        return
    assert not (mode == "block" and shapes.holds_unreadable(payload))
    judged = judged_text(guard.judge)
    assert all(marker in judged for marker in shapes.markers_in(payload))
    assert all(role in ("user", "assistant") for _, role in guard.judge.seen)


@pytest.mark.parametrize("answer", [
    {"choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "order", "arguments": '{"item": "zqmark1q"}'}}]}}]},
    {"choices": [{"index": 0, "text": "zqmark1q"}]},
    {"id": "r", "created_at": 0, "model": "m", "object": "response", "parallel_tool_calls": False, "tool_choice": "auto",
     "tools": [], "output": [{"type": "message", "id": "m", "role": "assistant", "status": "completed",
                              "content": [{"type": "output_text", "text": "zqmark1q", "annotations": []}]}]},
], ids=["tool call only", "text completion", "responses"])
def test_answers_of_every_kind_are_judged(recorded, answer):
    from litellm.types.llms.openai import ResponsesAPIResponse
    from litellm.types.utils import ModelResponse, TextCompletionResponse

    kind = ResponsesAPIResponse if "output" in answer else TextCompletionResponse if "text" in answer["choices"][0] \
        else ModelResponse
    guard = recorded["block"]
    guard.judge.seen.clear()
    data = {"messages": [{"role": "user", "content": SAFE}]}
    asyncio.run(guard.async_post_call_success_hook(data=data, user_api_key_dict=None, response=kind(**answer)))
    ((conversation, role),) = guard.judge.seen
    assert role == "assistant" and conversation[0].content == SAFE and "zqmark1q" in conversation[-1].content


def test_a_streamed_tool_call_is_judged(recorded):
    from litellm.types.utils import ModelResponseStream

    async def stream():
        for name, arguments in (("order", '{"item": '), (None, '"zqmark2q"}')):  # the name comes once, first
            yield ModelResponseStream(choices=[{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "type": "function", "function": {"name": name, "arguments": arguments}}]}}])

    async def run():
        return [c async for c in recorded["block"].async_post_call_streaming_iterator_hook(
            user_api_key_dict=None, response=stream(), request_data={"messages": [{"role": "user", "content": SAFE}]})]

    recorded["block"].judge.seen.clear()
    assert len(asyncio.run(run())) == 2
    ((conversation, role),) = recorded["block"].judge.seen
    assert conversation[-1].content == 'order({"item": "zqmark2q"})'


def test_on_unreadable_is_checked_at_start_up():
    from guardprob.integrations.litellm import Guardrail, SettingsError

    with pytest.raises(SettingsError, match="on_unreadable is 'allow'; use block .* or judge_text"):
        Guardrail(guardrail_name="g", event_hook="pre_call", api_base="http://127.0.0.1:8000", on_unreadable="allow")


# -- the new shapes through the proxy's own endpoints --------------------------------------------
def post_proxy(proxy: Proxy, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{proxy.url}{path}", timeout=300, headers={"Authorization": f"Bearer {MASTER_KEY}"},
                      json={"model": "mock", **body})


def test_the_proxy_endpoints_judge_every_shape(proxy):
    refused = [
        ("/v1/completions", {"prompt": [UNSAFE]}),
        ("/v1/chat/completions", {"messages": [{"role": "User", "content": {"type": "text", "text": UNSAFE}}]}),
        ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_text", "text": UNSAFE}]}]}),
    ]
    for path, body in refused:
        reply = post_proxy(proxy, path, {**body, "guardrails": ["strict-input"]})
        assert reply.status_code == 400, (path, reply.text)
        assert "guardrail 'strict-input' flagged the request: S1 " in reply.json()["error"]["message"], path


def test_the_proxy_refuses_what_the_guard_cannot_read(proxy):
    image = {"type": "image_url", "image_url": {"url": "https://example.com/bomb-recipe.png"}}
    for path, body, named in [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": SAFE}, image]}]},
         "messages[0].content[1] (a 'image_url' part)"),
        ("/v1/completions", {"prompt": [[15496, 995]]}, "prompt[0] (token ids)"),
    ]:
        reply = post_proxy(proxy, path, {**body, "guardrails": ["lenient"]})  # lenient passes text, not images
        assert reply.status_code == 400, (path, reply.text)
        message = reply.json()["error"]["message"]  # (the completions endpoint puts the status before it)
        assert ("guardrail 'lenient' cannot read the request, so it is refused (on_unreadable: block): guardprob "
                f"reads text only and cannot judge {named}") in message, message

    # on_unreadable: judge_text, set in config.yaml: the text is judged, the image let through
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": SAFE}, image]}]}
    passed = post_proxy(proxy, "/v1/chat/completions", {**body, "guardrails": ["lenient-text"]})
    assert passed.status_code == 200, passed.text
    (entry,) = logged(proxy, passed.headers["x-litellm-call-id"], 1)
    assert entry["guardrail_status"] == "success" and entry["guardrail_response"]["role"] == "user"


def test_a_responses_answer_is_judged_through_the_proxy(proxy):
    reply = post_proxy(proxy, "/v1/responses", {"input": SAFE, "instructions": "Answer briefly.", "guardrails": ["lenient"]})
    assert reply.status_code == 200, reply.text
    entries = logged(proxy, reply.headers["x-litellm-call-id"], 2)
    assert [(e["guardrail_mode"], e["guardrail_response"]["role"]) for e in entries] == [
        ("pre_call", "user"), ("post_call", "assistant")]


def test_malformed_and_textless_requests_are_refused_whatever_on_unreadable_says(recorded):
    from fastapi import HTTPException

    guard = recorded["judge_text"]
    for data, call_type, why in [
        ({"messages": [{"role": "wizard", "content": SAFE}]}, "completion", "messages[0].role: role 'wizard' is unknown"),
        ({"messages": [{"role": "user", "content": 7}]}, "completion", "messages[0].content has content of type int"),
    ]:
        with pytest.raises(HTTPException) as err:
            asyncio.run(guard.async_pre_call_hook(user_api_key_dict=None, cache=None, data=data, call_type=call_type))
        assert err.value.detail["error"].startswith(f"guardrail 'judge_text' cannot read the request, so it is refused: {why}")

    block = recorded["block"]
    with pytest.raises(HTTPException, match="cannot judge the request .none of system, instructions, "):
        asyncio.run(block.async_pre_call_hook(user_api_key_dict=None, cache=None, data={"model": "m"},
                                              call_type="acompletion"))
    block.judge.seen.clear()  # a call that sends no text to a model (a file listing) is not judged
    asyncio.run(block.async_pre_call_hook(user_api_key_dict=None, cache=None, data={"purpose": "batch"},
                                          call_type="afile_list"))
    assert block.judge.seen == []


def test_a_prefilled_answer_is_judged_as_the_assistant_s_too(recorded):
    guard = recorded["block"]
    guard.judge.seen.clear()
    data = {"messages": [{"role": "user", "content": SAFE}, {"role": "assistant", "content": "zqmark3q"}]}
    asyncio.run(guard.async_pre_call_hook(user_api_key_dict=None, cache=None, data=data, call_type="completion"))
    assert [(len(turns), role) for turns, role in guard.judge.seen] == [(1, "user"), (2, "assistant")]
