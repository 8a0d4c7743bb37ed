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
from litellm.types.utils import Choices, GuardrailTracingDetail, ModelResponse, ModelResponseStream

from guardprob.errors import GuardprobError, InputError
from guardprob.integrations import chat
from guardprob.integrations.judges import ServiceError
from guardprob.integrations.settings import JudgeSettings

if TYPE_CHECKING:
    from guardprob.classifier import Classifier
    from guardprob.integrations.judgement import Judgement

_PROVIDER = "guardprob"


class SettingsError(GuardprobError, RuntimeError):
    """Settings the guardrail cannot run with. Not a ValueError on purpose: LiteLLM starts
    without a guardrail whose constructor raises ValueError, and a guard that was configured
    must not drop out silently, so the proxy does not start."""


class Guardrail(CustomGuardrail):
    """guardprob as a LiteLLM guardrail: over a guardprob service (``api_base``, ``api_key``)
    or a classifier in the proxy's process (``model``, ``guardprob_config``, ``calibration``,
    ``thresholds``, ``default_threshold``; see ``JudgeSettings``). ``unreachable_fallback``:
    ``fail_closed`` (default) answers 503 while the service cannot judge; ``fail_open`` lets
    such requests through unjudged and logs that it did. ``classifier``: a loaded classifier,
    when the guardrail is built in Python rather than from config.yaml."""

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
                                     thresholds=thresholds or {}, default_threshold=default_threshold, where=where)
            self.judge = settings.judge(classifier)  # an in-process model loads here, at the proxy's start-up
        except InputError as exc:
            raise SettingsError(str(exc)) from None

    # -- LiteLLM's hooks ----------------------------------------------------------------------
    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict, call_type: Any) -> dict:
        await self._check_request(data, GuardrailEventHooks.pre_call)
        return data

    async def async_moderation_hook(self, data: dict, user_api_key_dict: Any, call_type: Any) -> None:
        await self._check_request(data, GuardrailEventHooks.during_call)

    async def async_post_call_success_hook(self, data: dict, user_api_key_dict: Any, response: Any) -> Any:
        if isinstance(response, ModelResponse):
            for choice in response.choices:
                if isinstance(choice, Choices) and isinstance(choice.message.content, str):
                    await self._check_answer(data, choice.message.content)
        return response

    async def async_post_call_streaming_iterator_hook(
        self, user_api_key_dict: Any, response: Any, request_data: dict,
    ) -> AsyncGenerator[Any, None]:
        # The answer is judged whole: the stream is held until it has ended and been judged.
        chunks = [chunk async for chunk in response]
        answers: dict[int, str] = {}
        for chunk in chunks:
            if isinstance(chunk, ModelResponseStream):
                for choice in chunk.choices:
                    answers[choice.index] = answers.get(choice.index, "") + (choice.delta.content or "")
        for _, answer in sorted(answers.items()):
            await self._check_answer(request_data, answer)
        for chunk in chunks:
            yield chunk

    # -- judging ------------------------------------------------------------------------------
    async def _check_request(self, data: dict, event: GuardrailEventHooks) -> None:
        conversation = chat.prompt_turns(_request_messages(data))
        if conversation:  # an embedding or a request without user text: nothing to judge
            await self._check(data, conversation, "user", event)

    async def _check_answer(self, data: dict, answer: str) -> None:
        if answer.strip():
            await self._check(data, chat.with_answer(_request_messages(data), answer), "assistant",
                              GuardrailEventHooks.post_call)

    async def _check(self, data: dict, conversation: Sequence[chat.Turn], role: str, event: GuardrailEventHooks) -> None:
        started = time.time()
        whose = "request" if role == "user" else "response"
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


def _request_messages(data: Mapping[str, Any]) -> Sequence[Mapping[str, Any]] | None:
    """Chat completions' ``messages``; else the Responses API's (or a completion's) input:
    a text, judged as one user message, or a list of message items."""
    messages = data.get("messages")
    if messages is not None:
        return messages
    given = data.get("input", data.get("prompt"))
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    return given if isinstance(given, list) else None


def _tracing(judgement: Judgement) -> GuardrailTracingDetail:
    """The short, indexable fields of the record; the full judgement is its response."""
    return GuardrailTracingDetail(
        detection_method=f"guardprob {judgement.method}",
        confidence_score=judgement.p_unsafe,
        classification=judgement.scores,
        violation_categories=list(judgement.flagged_categories),
        guardrail_action="block" if judgement.flagged else "allow",
    )
