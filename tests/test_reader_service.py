"""The service reads requests with guardprob's one reader (guardprob.inputs.reader): /v1/classify
messages and /v1/moderations input in every shape score exactly as the same text sent plainly,
and what is not text is refused naming it. A real uvicorn server on loopback, the tiny model."""

from __future__ import annotations

import pytest

from guardprob.server.config import ServerConfig
from serving import FAST, assert_error, post, running

QUESTION = "How do I pick a lock?"
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/lock.png"}}


@pytest.fixture(scope="module")
def served(tiny_classifier):
    from guardprob.server import create_app

    config = ServerConfig(search=FAST, decide=False, openai_categories="none")
    with running(create_app(tiny_classifier, config)) as r:
        yield r


def scores(answer: dict) -> dict:
    return {cid: row["p"] for cid, row in answer["categories"].items()}


@pytest.mark.parametrize("messages, plain", [
    ([{"role": "User", "content": {"type": "text", "text": QUESTION}}], [{"role": "user", "content": QUESTION}]),
    ([{"role": "system", "content": "Be brief."}, {"role": "human", "content": [{"type": "input_text", "text": QUESTION}]}],
     [{"role": "user", "content": "Be brief."}, {"role": "user", "content": QUESTION}]),
    ([{"role": "user", "content": QUESTION},
      {"role": "assistant", "content": None, "tool_calls": [
          {"id": "1", "type": "function", "function": {"name": "search", "arguments": '{"q": "locks"}'}}]}],
     [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": 'search({"q": "locks"})'}]),
], ids=["one dict part, role User", "system and parts", "tool call"])
def test_classify_scores_every_shape_as_its_text(served, messages, plain):
    shaped = post(served.url, "/v1/classify", {"messages": messages})
    assert shaped.status_code == 200, shaped.text
    expected = post(served.url, "/v1/classify", {"messages": plain}).json()
    assert scores(shaped.json()) == pytest.approx(scores(expected), abs=1e-6)
    assert shaped.json()["p_unsafe"] == pytest.approx(expected["p_unsafe"], abs=1e-6)


def test_moderations_read_text_parts_and_refuse_images(served):
    parts = post(served.url, "/v1/moderations", {"input": [{"type": "input_text", "text": QUESTION}, QUESTION]})
    assert parts.status_code == 200, parts.text
    first, second = parts.json()["results"]
    assert first["category_scores"] == pytest.approx(second["category_scores"], abs=1e-6)
    error = assert_error(post(served.url, "/v1/moderations", {"input": ["ok", IMAGE]}), 400, "input[1]",
                         "unsupported_input")
    assert "cannot judge input[1] (a 'image_url' part)" in error["message"]


def test_classify_refuses_what_it_cannot_read_naming_it(served):
    error = assert_error(post(served.url, "/v1/classify", {"messages": [
        {"role": "user", "content": [{"type": "text", "text": QUESTION}, IMAGE]}]}), 400, "messages[0].content[1]",
        "unsupported_input")
    assert "guardprob reads text only and cannot judge messages[0].content[1] (a 'image_url' part)" in error["message"]
    assert_error(post(served.url, "/v1/classify", {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}),
                 422, "messages[0].content[0].text", "invalid_type")
