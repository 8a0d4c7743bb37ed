"""What the LiteLLM and NeMo Guardrails integrations share: chat messages as conversations,
their settings, and the two judges (a guardprob service on loopback, a classifier in this
process) over the tiny random classifier, which agree and fail in the tool's own terms."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from guardprob.errors import InputError
from guardprob.integrations.judges import LocalJudge, ServiceError, ServiceJudge, service_root
from guardprob.integrations.settings import JudgeSettings
from guardprob.server.config import ServerConfig
from guardprob_services import free_port, guardprob_service

FAST = {"eps": 0.2}
CONVERSATION = [{"role": "user", "content": "How do I pick a lock?"},
                {"role": "assistant", "content": "Use a tension wrench."}]


def test_service_root_accepts_the_v1_url_too():
    assert service_root("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000"
    assert service_root(" http://guard.internal/ ") == "http://guard.internal"


# -- settings ------------------------------------------------------------------------------
@pytest.mark.parametrize("settings, named", [
    ({"api_base": "http://127.0.0.1:8000", "thresholds": {"S1": 0.3}}, "thresholds"),
    ({"api_base": "http://127.0.0.1:8000", "model": "meta-llama/Llama-Guard-3-1B"}, "model"),
    ({"api_key": "k"}, "api_key"),
    ({"api_base": "127.0.0.1:8000"}, "http://127.0.0.1:8000"),
    ({"api_base": "http://127.0.0.1:8000", "timeout": 0}, "timeout"),
    ({"thresholds": [0.3]}, "thresholds"),
    ({"model": ""}, "model"),
])
def test_settings_refuse_what_cannot_work(settings, named):
    with pytest.raises(InputError, match="my settings: .*") as err:
        JudgeSettings(**settings, where="my settings")
    assert named in str(err.value)


def test_settings_name_unknown_keys():
    with pytest.raises(InputError, match=r"unknown setting\(s\) treshold; use api_base, api_key"):
        JudgeSettings.from_mapping({"treshold": 0.3}, "my settings")


def test_in_process_settings_take_thresholds_over_the_config_file(tmp_path, tiny_classifier):
    config = tmp_path / "server.yaml"
    config.write_text("search: {eps: 0.2}\nthresholds: {S1: 0.1, S2: 0.2}\ndefault_threshold: 0.7\n")
    judge = JudgeSettings(guardprob_config=str(config), thresholds={"S2": 0.05}).judge(tiny_classifier)
    assert isinstance(judge, LocalJudge)
    assert judge.config.search == {"eps": 0.2}
    assert judge.thresholds.values["S1"] == 0.1 and judge.thresholds.values["S2"] == 0.05
    assert judge.thresholds.values["S3"] == 0.7
    with pytest.raises(InputError, match="field 'thresholds' names 'S99'"):
        JudgeSettings(thresholds={"S99": 0.1}).judge(tiny_classifier)
    with pytest.raises(InputError, match="both model and an in-process classifier"):
        JudgeSettings(model="x").judge(tiny_classifier)


# -- the two judges --------------------------------------------------------------------------
def test_service_and_in_process_judges_agree(tiny_classifier):
    probe = LocalJudge(tiny_classifier, ServerConfig(search=FAST)).judge_now(CONVERSATION, "assistant")
    scores = sorted(probe.scores.values())
    threshold = (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2  # half the categories flag
    config = {"search": FAST, "default_threshold": threshold}
    local = asyncio.run(LocalJudge(tiny_classifier, ServerConfig(**config)).judge(CONVERSATION, "assistant"))
    with guardprob_service(tiny_classifier, **config) as url:
        served = asyncio.run(ServiceJudge(url).judge(CONVERSATION, "assistant"))
    assert 0 < len(local.flagged_categories) < len(tiny_classifier.taxonomy.ids)
    assert served.flagged and served.flagged_categories == local.flagged_categories
    assert served.model == local.model == "tiny" and served.method == "marginal" and served.role == "assistant"
    for cid, mine in local.categories.items():
        theirs = served.categories[cid]
        assert theirs.p == pytest.approx(mine.p, abs=1e-6) and theirs.threshold == mine.threshold == threshold
        assert theirs.lower <= theirs.p <= theirs.upper
        assert theirs.flagged == (theirs.score >= threshold)
    assert served.p_unsafe == pytest.approx(local.p_unsafe, abs=1e-6)
    record = served.as_dict()
    assert record["scores"] == served.scores and record["flagged_categories"] == list(served.flagged_categories)
    assert served.reasons()[0].startswith(f"{served.flagged_categories[0]} ")


def test_unreachable_service_names_the_url_and_the_fix():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServiceError) as err:
        asyncio.run(ServiceJudge(url).judge(CONVERSATION, "assistant"))
    assert err.value.unreachable
    assert f"the guardprob service at {url} is unreachable" in str(err.value) and "guardprob serve" in str(err.value)


def test_a_service_that_does_not_answer_in_time_names_the_timeout():
    listener = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        started = time.monotonic()
        with pytest.raises(ServiceError, match=r"did not answer within 0.5 s; raise the timeout") as err:
            asyncio.run(ServiceJudge(url, timeout=0.5).judge(CONVERSATION, "assistant"))
        assert err.value.unreachable and time.monotonic() - started < 10
    finally:
        listener.close()


def test_a_refused_api_key_names_the_setting(tiny_classifier):
    with guardprob_service(tiny_classifier, search=FAST, api_keys=("right-key",)) as url:
        with pytest.raises(ServiceError, match="refused the API key .*set api_key") as err:
            asyncio.run(ServiceJudge(url, api_key="wrong-key").judge(CONVERSATION, "assistant"))
        assert not err.value.unreachable
        judged = asyncio.run(ServiceJudge(url + "/v1", api_key="right-key").judge(CONVERSATION, "assistant"))
        assert set(judged.categories) == set(tiny_classifier.taxonomy.ids)


def test_a_url_that_is_no_guardprob_service_is_named(tiny_classifier):
    import uvicorn
    from fastapi import FastAPI

    other = FastAPI()

    @other.post("/v1/classify")
    async def classify():
        return {"results": []}  # some other service's answer

    with guardprob_service(tiny_classifier, search=FAST) as url:
        with pytest.raises(ServiceError, match=r"/elsewhere/v1/classify answered 404; set api_base to the root"):
            asyncio.run(ServiceJudge(url + "/elsewhere").judge(CONVERSATION, "assistant"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(other, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        with pytest.raises(ServiceError, match="not a guardprob classification .*KeyError"):
            asyncio.run(ServiceJudge(f"http://127.0.0.1:{port}").judge(CONVERSATION, "assistant"))
    finally:
        server.should_exit = True
        thread.join(10)
