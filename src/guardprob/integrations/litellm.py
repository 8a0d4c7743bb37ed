"""A guardrail for LiteLLM's proxy (docs/integrations/litellm.md).

In the proxy's config.yaml::

    guardrails:
      - guardrail_name: guardprob
        litellm_params:
          guardrail: guardprob.integrations.litellm.Guardrail
          mode: [pre_call, post_call]
          default_on: true
          api_base: http://127.0.0.1:8000

The proxy builds ``Guardrail`` with every ``litellm_params`` entry but ``guardrail``,
``mode``, ``default_on`` and ``stream_scope`` as keyword arguments (together with the
defaults of LiteLLM's other guardrails, which are ignored here).

pre_call and during_call judge the user's messages; post_call judges the model's answer
after them, as the assistant's. A flagged judgement raises HTTP 400 naming the flagged
categories; every judgement, flagged or not, goes into the guardrail information LiteLLM
logs (``standard_logging_object["guardrail_information"]``): the per-category
probabilities with their bounds, the thresholds and the decision.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from fastapi import HTTPException
from litellm._logging import verbose_proxy_logger
from litellm.integrations.custom_guardrail import CustomGuardrail
from litellm.types.guardrails import GuardrailEventHooks
from litellm.types.utils import GuardrailTracingDetail, ModelResponseStream

from guardprob.errors import GuardprobError, InputError
from guardprob.inputs.reader import Message, Reading, Unread, judgements, read_answer, read_request, unreadable_error
from guardprob.integrations.judges import ServiceError
from guardprob.integrations.settings import JudgeSettings

if TYPE_CHECKING:
    from guardprob.classifier import Classifier
    from guardprob.integrations.judgement import Judgement

_PROVIDER = "guardprob"
# Calls that send a model text to answer: one of them without any text the guard can find is a
# shape it does not know, not a request without text (a file listing, a batch's status).
_TEXT_CALLS = frozenset(f"{prefix}{name}" for prefix in ("", "a", "_a") for name in (
    "completion", "text_completion", "responses", "anthropic_messages", "moderation", "embedding", "rerank",
    "generate_content", "generate_content_stream", "create_interaction", "realtime", "responses_websocket"))


class SettingsError(GuardprobError, RuntimeError):
    """Settings the guardrail cannot run with. Not a ValueError on purpose: LiteLLM starts
    without a guardrail whose constructor raises ValueError, and a guard that was configured
    must not drop out silently, so the proxy does not start."""


class Guardrail(CustomGuardrail):
    """guardprob as a LiteLLM guardrail: over a guardprob service (``api_base``, ``api_key``)
    or a classifier in the proxy's process (``model``, ``guardprob_config``, ``calibration``,
    ``thresholds``, ``default_threshold``; see ``JudgeSettings``). ``unreachable_fallback``:
    ``fail_closed`` (default) answers 503 while the service cannot judge; ``fail_open`` lets
    such requests through unjudged and logs that it did. ``on_unreadable``: ``block``
    (default) refuses a request or answer holding something a model reads that the guard
    cannot (an image, token ids; guardprob.inputs.reader); ``judge_text`` judges its text and lets
    the rest through, logged. ``classifier``: a loaded classifier, when the guardrail is built
    in Python rather than from config.yaml."""

    def __init__(
        self,
        api_base: str | None = None,
        api_key: str | None = None,
        model: str | None = None,
        guardprob_config: str | None = None,
        calibration: str | None = None,
        thresholds: Mapping[str, float] | None = None,
        default_threshold: float | None = None,
        timeout: float | None = None,
        unreachable_fallback: Literal["fail_closed", "fail_open"] = "fail_closed",
        on_unreadable: Literal["block", "judge_text"] = "block",
        classifier: Classifier | None = None,
        **kwargs: Any,
    ):
        kwargs.setdefault("supported_event_hooks", [GuardrailEventHooks.pre_call, GuardrailEventHooks.during_call,
                                                    GuardrailEventHooks.post_call])
        super().__init__(timeout=timeout, **kwargs)
        where = f"LiteLLM guardrail {self.guardrail_name!r} (litellm_params)"
        if unreachable_fallback not in ("fail_closed", "fail_open"):
            raise SettingsError(f"{where}: unreachable_fallback is {unreachable_fallback!r}; use fail_closed or "
                                "fail_open")
        self.unreachable_fallback = unreachable_fallback
        try:
            settings = JudgeSettings(api_base=api_base, api_key=api_key, timeout=60.0 if timeout is None else timeout,
                                     model=model, guardprob_config=guardprob_config, calibration=calibration,
                                     thresholds=thresholds or {}, default_threshold=default_threshold,
                                     on_unreadable=on_unreadable, where=where)
            self.on_unreadable = settings.on_unreadable
            self.judge = settings.judge(classifier)  # an in-process model loads here, at the proxy's start-up
        except InputError as exc:
            raise SettingsError(str(exc)) from None

    # -- LiteLLM's hooks ----------------------------------------------------------------------
    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict, call_type: Any) -> dict:
        await self._check_request(data, GuardrailEventHooks.pre_call, call_type)
        return data

    async def async_moderation_hook(self, data: dict, user_api_key_dict: Any, call_type: Any) -> None:
        await self._check_request(data, GuardrailEventHooks.during_call, call_type)

    async def async_post_call_success_hook(self, data: dict, user_api_key_dict: Any, response: Any) -> Any:
        await self._check_answers(data, read_answer(response))
        return response

    async def async_post_call_streaming_iterator_hook(
        self, user_api_key_dict: Any, response: Any, request_data: dict,
    ) -> AsyncGenerator[Any, None]:
        # The answer is judged whole: the stream is held until it has ended and been judged.
        chunks = [chunk async for chunk in response]
        await self._check_answers(request_data, _streamed_answer(chunks))
        for chunk in chunks:
            yield chunk

    # -- judging ------------------------------------------------------------------------------
    async def _check_request(self, data: dict, event: GuardrailEventHooks, call_type: Any = None) -> None:
        try:
            reading = read_request(data)
        except InputError as exc:  # a shape no model API takes: refused whatever on_unreadable says
            self._unreadable(data, str(exc), "request", event, setting="")
            return
        if _nothing_to_read(reading) and _call_name(call_type) not in _TEXT_CALLS:
            return  # a file listing, a batch's status: no text goes to a model
        self._left_unread(data, reading.unread, "request", event)
        for conversation in reading.conversations:
            for turns, role in judgements(conversation):
                await self._check(data, turns, role, event)

    async def _check_answers(self, data: dict, answers: Reading) -> None:
        """Each answer after the conversation it answers, judged as the assistant's."""
        event = GuardrailEventHooks.post_call
        self._left_unread(data, answers.unread, "response", event)
        try:
            asked = [turns for c in read_request(data).conversations for turns, role in judgements(c) if role == "user"]
        except InputError:  # refused before the call when pre_call runs; here the answer is judged alone
            asked = []
        for i, answer in enumerate(answers.conversations):
            prompt = asked[i] if len(asked) == len(answers.conversations) else asked[-1] if asked else ()
            await self._check(data, (*prompt, *answer), "assistant", event)

    def _left_unread(self, data: dict, unread: Sequence[Unread], whose: str, event: GuardrailEventHooks) -> None:
        if not unread:
            return
        if self.on_unreadable == "block":
            self._unreadable(data, str(unreadable_error(unread)), whose, event)
        verbose_proxy_logger.warning("guardrail %s judged only the text of a %s (on_unreadable: judge_text); not "
                                     "judged: %s", self.guardrail_name, whose, "; ".join(map(str, unread)))

    def _unreadable(self, data: dict, why: str, whose: str, event: GuardrailEventHooks,
                    setting: str = " (on_unreadable: block)") -> None:
        """Refuse what the guard cannot read: 400 naming it."""
        now = time.time()
        self._record(data, {"error": why, "unreadable": True}, "guardrail_intervened", now, event)
        raise HTTPException(status_code=400, detail={
            "error": f"guardrail {self.guardrail_name!r} cannot read the {whose}, so it is refused{setting}: {why}",
            "guardrail": self.guardrail_name,
        })

    async def _check(self, data: dict, conversation: Sequence[Message], role: str, event: GuardrailEventHooks) -> None:
        started = time.time()
        whose = "response" if event == GuardrailEventHooks.post_call else "request"
        try:
            judgement = await self.judge.judge(conversation, role)
        except ServiceError as exc:
            self._record(data, {"error": str(exc)}, "guardrail_failed_to_respond", started, event)
            if exc.unreachable and self.unreachable_fallback == "fail_open":
                verbose_proxy_logger.critical("guardrail %s let a request through unjudged (unreachable_fallback: "
                                              "fail_open): %s", self.guardrail_name, exc)
                return
            raise HTTPException(status_code=503 if exc.unreachable else 502, detail={
                "error": f"guardrail {self.guardrail_name!r}: {exc}", "guardrail": self.guardrail_name,
            }) from None
        except GuardprobError as exc:  # in process: a conversation the guard cannot read (too long for its context)
            self._record(data, {"error": str(exc)}, "guardrail_failed_to_respond", started, event)
            raise HTTPException(status_code=400, detail={
                "error": f"guardrail {self.guardrail_name!r} cannot judge the {whose}: {exc}",
                "guardrail": self.guardrail_name,
            }) from None
        status = "guardrail_intervened" if judgement.flagged else "success"
        self._record(data, judgement.as_dict(), status, started, event, _tracing(judgement))
        if judgement.flagged:
            raise HTTPException(status_code=400, detail={
                "error": f"guardrail {self.guardrail_name!r} flagged the {whose}: {'; '.join(judgement.reasons())}",
                "guardrail": self.guardrail_name,
                "role": role,
                "flagged_categories": {cid: judgement.categories[cid].name for cid in judgement.flagged_categories},
                "category_scores": judgement.scores,
                "p_unsafe": judgement.p_unsafe,
            })

    def _record(self, data: dict, response: dict, status: Any, started: float, event: GuardrailEventHooks,
                tracing: GuardrailTracingDetail | None = None) -> None:
        """Into the guardrail information LiteLLM logs with the request (spend logs, callbacks)."""
        ended = time.time()
        self.add_standard_logging_guardrail_information_to_request_data(
            guardrail_json_response=response, request_data=data, guardrail_status=status, start_time=started,
            end_time=ended, duration=ended - started, guardrail_provider=_PROVIDER, event_type=event,
            tracing_detail=tracing,
        )


def _call_name(call_type: Any) -> str:
    return str(getattr(call_type, "value", call_type))


def _nothing_to_read(reading: Reading) -> bool:
    """A request with none of the fields that carry text to a model."""
    return not reading.conversations and [u.where for u in reading.unread] == ["the request"]


def _streamed_answer(chunks: Sequence[Any]) -> Reading:
    """A held stream's answers: chat chunks' text and tool calls assembled per choice, or the
    Responses API's completed answer. A stream of neither holds an answer the guard cannot read."""
    texts: dict[int, str] = {}
    calls: dict[tuple[int, int], list[str]] = {}
    completed = []
    for chunk in chunks:
        if isinstance(chunk, ModelResponseStream):
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
                for j, call in enumerate(getattr(choice.delta, "tool_calls", None) or ()):
                    name, arguments = call.function.name or "", call.function.arguments or ""
                    at = calls.setdefault((choice.index, call.index if call.index is not None else j), ["", ""])
                    at[0] += name
                    at[1] += arguments
        elif getattr(chunk, "type", None) == "response.completed" and getattr(chunk, "response", None) is not None:
            completed.append(read_answer(chunk.response))
    if completed:
        return Reading(tuple(c for r in completed for c in r.conversations), tuple(u for r in completed for u in r.unread))
    if chunks and not texts:
        return Reading((), (Unread("the streamed response", f"{type(chunks[0]).__name__} chunks"),))
    answers = []
    for index in sorted(texts):
        said = [texts[index], *(f"{n}({a})" for (i, _), (n, a) in sorted(calls.items()) if i == index)]
        text = "\n\n".join(t for t in said if t.strip())
        if text:
            answers.append((Message("assistant", text),))
    return Reading(tuple(answers))


def _tracing(judgement: Judgement) -> GuardrailTracingDetail:
    """The short, indexable fields of the record; the full judgement is its response."""
    return GuardrailTracingDetail(
        detection_method=f"guardprob {judgement.method}",
        confidence_score=judgement.p_unsafe,
        classification=judgement.scores,
        violation_categories=list(judgement.flagged_categories),
        guardrail_action="block" if judgement.flagged else "allow",
    )
