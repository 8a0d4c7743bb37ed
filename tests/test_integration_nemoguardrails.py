"""The NeMo Guardrails action in real rails (Colang 1.0 flows, config.py's ``init``), driven
end to end with NeMo's own fake LLM, over a guardprob service on loopback and in process.

The tiny random classifier keeps each judgement fast; the services' thresholds decide what is
flagged: a strict service (every threshold 0) and a lenient one (every threshold 1)."""

from __future__ import annotations

import asyncio
import json
import logging
import textwrap

import pytest

pytest.importorskip("nemoguardrails")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from nemoguardrails import LLMRails, RailsConfig  # noqa: E402
from nemoguardrails.testing.fake_model import FakeLLMModel  # noqa: E402

import shapes  # noqa: E402
from guardprob.errors import InputError, UnreadableError  # noqa: E402
from guardprob.integrations.judges import LocalJudge  # noqa: E402
from guardprob.integrations.nemoguardrails import guardprob_check, register  # noqa: E402
from guardprob.server.config import ServerConfig  # noqa: E402
from guardprob_services import free_port, guardprob_service  # noqa: E402

SEARCH = {"eps": 0.2}
QUESTION = "What is the capital of France?"
ANSWER = "Paris is the capital of France."
REFUSAL = "I'm sorry, I can't respond to that."

# The flows a user writes (docs/integrations/nemoguardrails.md): the input rail refuses on one flagged category
# or one score, the output rail on any flagged category.
FLOWS = {
    "input": """
define flow guardprob check input
  $guardprob_input = execute guardprob_check(role="user")
  if "S9" in $guardprob_input.flagged_categories or $guardprob_input.scores.S1 > 0.2
    bot refuse to respond
    stop
""",
    "output": """
define flow guardprob check output
  $guardprob_output = execute guardprob_check(role="assistant")
  if $guardprob_output.flagged
    bot refuse to respond
    stop
""",
}
REFUSE = f"""
define bot refuse to respond
  "{REFUSAL}"
"""


@pytest.fixture(scope="module")
def services(tiny_classifier):
    # One request at a time reaches these two services, so they may share the loaded model.
    with guardprob_service(tiny_classifier, search=SEARCH, default_threshold=0.0) as strict, \
            guardprob_service(tiny_classifier, search=SEARCH, default_threshold=1.0) as lenient:
        yield {"strict": strict, "lenient": lenient}


def rails_config(directory, settings: dict, rails=("input", "output"), with_init: bool = True) -> RailsConfig:
    """A rails config directory as a user writes it: config.yml, the flows, and config.py."""
    directory.mkdir(exist_ok=True)
    chosen = "".join(f"\n  {rail}:\n    flows: [guardprob check {rail}]" for rail in rails)
    (directory / "config.yml").write_text(f"models: []\ncustom_data:\n  guardprob: {json.dumps(settings)}\n"
                                          f"rails:{chosen}\n")
    (directory / "rails.co").write_text(REFUSE + "".join(FLOWS[rail] for rail in rails))
    if with_init:
        (directory / "config.py").write_text("from guardprob.integrations.nemoguardrails import init  # noqa: F401\n")
    return RailsConfig.from_path(str(directory))


def ask(app: LLMRails, question: str = QUESTION):
    return app.generate(messages=[{"role": "user", "content": question}],
                        options={"output_vars": ["guardprob_input", "guardprob_output"]})


def check_judgement(result: dict, role: str, threshold: float, taxonomy) -> None:
    assert result["role"] == role and result["model"] == "tiny" and result["method"] == "marginal"
    assert set(result["scores"]) == set(taxonomy.ids)
    for cid, row in result["categories"].items():
        assert 0 <= row["lower"] <= row["p"] <= row["upper"] <= 1 and row["score"] == result["scores"][cid]
        assert row["threshold"] == threshold and row["flagged"] == (row["score"] >= threshold)
    assert result["flagged_categories"] == [cid for cid in taxonomy.ids if result["categories"][cid]["flagged"]]
    assert result["p_unsafe_lower"] <= result["p_unsafe"] <= result["p_unsafe_upper"]


# -- over a guardprob service ---------------------------------------------------------------------
def test_a_flagged_category_refuses_the_question(services, tmp_path, tiny_classifier):
    llm = FakeLLMModel(responses=[ANSWER])
    app = LLMRails(rails_config(tmp_path / "rails", {"api_base": services["strict"]}), llm=llm)
    result = ask(app)
    assert result.response[-1]["content"] == REFUSAL
    assert llm.inference_count == 0  # refused before the model was asked
    check_judgement(result.output_data["guardprob_input"], "user", 0.0, tiny_classifier.taxonomy)
    assert "S9" in result.output_data["guardprob_input"]["flagged_categories"]
    assert result.output_data["guardprob_output"] is None


def test_a_passed_answer_is_judged_after_the_question(services, tmp_path, tiny_classifier):
    llm = FakeLLMModel(responses=[ANSWER])
    app = LLMRails(rails_config(tmp_path / "rails", {"api_base": services["lenient"]}), llm=llm)
    result = ask(app)
    assert result.response[-1]["content"] == ANSWER and llm.inference_count == 1
    asked, answered = result.output_data["guardprob_input"], result.output_data["guardprob_output"]
    check_judgement(asked, "user", 1.0, tiny_classifier.taxonomy)
    check_judgement(answered, "assistant", 1.0, tiny_classifier.taxonomy)
    assert not asked["flagged"] and not answered["flagged"]
    # the output rail judged the answer after the question, as the assistant's
    local = LocalJudge(tiny_classifier, ServerConfig(search=SEARCH, default_threshold=1.0)).judge_now(
        [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}], "assistant")
    for cid, score in local.scores.items():
        assert answered["scores"][cid] == pytest.approx(score, abs=1e-6)


def test_a_flagged_answer_is_refused(services, tmp_path):
    llm = FakeLLMModel(responses=[ANSWER])
    app = LLMRails(rails_config(tmp_path / "rails", {"api_base": services["strict"]}, rails=("output",)), llm=llm)
    result = ask(app)
    assert llm.inference_count == 1 and result.response[-1]["content"] == REFUSAL
    assert result.output_data["guardprob_output"]["flagged"]


def test_an_unreachable_service_fails_the_action_naming_the_url_and_the_fix(tmp_path, caplog):
    url = f"http://127.0.0.1:{free_port()}"
    llm = FakeLLMModel(responses=[ANSWER])
    app = LLMRails(rails_config(tmp_path / "rails", {"api_base": url}), llm=llm)
    with caplog.at_level(logging.WARNING, logger="nemoguardrails.actions.action_dispatcher"):
        result = ask(app)
    assert result.response[-1]["content"] == "I'm sorry, an internal error has occurred."  # the rail fails closed
    assert llm.inference_count == 0
    failures = [r.getMessage() for r in caplog.records if "guardprob_check" in r.getMessage()]
    assert failures and f"the guardprob service at {url} is unreachable" in failures[0]
    assert "start it (guardprob serve" in failures[0]


# -- in process -------------------------------------------------------------------------------------
def test_in_process_the_thresholds_come_from_config_yml(tmp_path, tiny_classifier):
    server = tmp_path / "server.yaml"
    server.write_text(f"search: {json.dumps(SEARCH)}\ndefault_threshold: 1.0\n")
    settings = {"guardprob_config": str(server), "thresholds": {"Indiscriminate Weapons": 0.0}}  # S9 by its name
    llm = FakeLLMModel(responses=[ANSWER])
    app = LLMRails(rails_config(tmp_path / "rails", settings, rails=("input",), with_init=False), llm=llm)
    register(app, classifier=tiny_classifier)
    result = ask(app)
    assert result.response[-1]["content"] == REFUSAL and llm.inference_count == 0
    judged = result.output_data["guardprob_input"]
    assert judged["flagged_categories"] == ["S9"] and judged["categories"]["S9"]["threshold"] == 0.0
    assert judged["categories"]["S1"]["threshold"] == 1.0


def test_settings_errors_stop_the_rails_at_start_up(tmp_path, services):
    with pytest.raises(RuntimeError, match="Failed to initialize configuration module") as err:
        LLMRails(rails_config(tmp_path / "a", {"api_base": services["strict"], "thresholds": {"S1": 0.2}}),
                 llm=FakeLLMModel(responses=[]))
    assert isinstance(err.value.__cause__, InputError)
    assert "custom_data.guardprob: api_base points at a guardprob service" in str(err.value.__cause__)

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.yml").write_text(textwrap.dedent("""\
        models: []
        rails:
          input:
            flows: [guardprob check input]
        """))
    (tmp_path / "b" / "rails.co").write_text(REFUSE + FLOWS["input"])
    (tmp_path / "b" / "config.py").write_text("from guardprob.integrations.nemoguardrails import init  # noqa: F401\n")
    with pytest.raises(RuntimeError) as err:
        LLMRails(RailsConfig.from_path(str(tmp_path / "b")), llm=FakeLLMModel(responses=[]))
    assert "custom_data.guardprob is missing; add to config.yml" in str(err.value.__cause__)


# -- every message shape is judged or refused (issue 24) ------------------------------------------
class Recorder:
    """A judge that records what it is given and answers with one real judgement (the tiny
    classifier's, nothing flagged): the property is about the text the action hands the judge."""

    def __init__(self, judgement):
        self.judgement = judgement
        self.seen: list[tuple[tuple, str]] = []

    async def judge(self, conversation, role):
        self.seen.append((tuple(conversation), role))
        return self.judgement


@pytest.fixture(scope="module")
def recorder(tiny_classifier):
    return Recorder(LocalJudge(tiny_classifier, ServerConfig(search=SEARCH, default_threshold=1.0)).judge_now(
        [{"role": "user", "content": "hi"}], "user"))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=shapes.contents, bot=st.one_of(st.none(), shapes.contents), mode=st.sampled_from(["block", "judge_text"]))
def test_the_action_judges_every_marker_or_flags_what_it_cannot_read(recorder, user, bot, mode):
    recorder.seen.clear()
    role = "user" if bot is None else "assistant"
    context = {"user_message": user, **({"bot_message": bot} if bot is not None else {})}
    unreadable = shapes.holds_unreadable({"messages": [user, bot]})
    try:
        asyncio.run(guardprob_check(role=role, context=context, guardprob_judge=recorder, guardprob_on_unreadable=mode))
    except InputError as exc:  # the action fails, naming why, and the rail fails closed
        assert not recorder.seen
        if isinstance(exc, UnreadableError):
            assert unreadable and mode == "block" and "refuses the message (on_unreadable: block)" in str(exc)
        else:
            assert "found no text to judge" in str(exc) and not shapes.markers_in(user if role == "user" else bot)
        return
    assert not (unreadable and mode == "block")
    ((conversation, judged_role),) = recorder.seen
    assert judged_role == role and conversation[-1].role == role
    judged = "\n".join(m.content for m in conversation)
    assert all(marker in judged for marker in shapes.markers_in([user, bot] if role == "assistant" else user))


def test_a_multimodal_message_is_judged_by_its_text_or_refused_in_real_rails(services, tmp_path, caplog):
    llm = FakeLLMModel(responses=[ANSWER])
    app = LLMRails(rails_config(tmp_path / "rails", {"api_base": services["lenient"]}, rails=("input",)), llm=llm)
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    with caplog.at_level(logging.WARNING, logger="nemoguardrails.actions.action_dispatcher"):
        result = app.generate(messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}, image]}])
    assert result["content"] == "I'm sorry, an internal error has occurred."  # the image cannot be read: fails closed
    assert llm.inference_count == 0
    failures = [r.getMessage() for r in caplog.records if "guardprob_check" in r.getMessage()]
    assert failures and "cannot judge user_message[1] (a 'image_url' part)" in failures[0]

    strict = LLMRails(rails_config(tmp_path / "strict", {"api_base": services["strict"]}, rails=("input",)),
                      llm=FakeLLMModel(responses=[ANSWER]))
    result = strict.generate(messages=[{"role": "user", "content": {"type": "text", "text": QUESTION}}],
                             options={"output_vars": ["guardprob_input"]})
    assert result.response[-1]["content"] == REFUSAL  # one dict part: read, judged, flagged
    assert result.output_data["guardprob_input"]["flagged"]
