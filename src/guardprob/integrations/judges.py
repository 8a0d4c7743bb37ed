"""The two ways an integration gets a judgement: from a guardprob service over HTTP
(``POST /v1/classify``), or from a classifier in this process."""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any, Protocol

from guardprob.errors import GuardprobError
from guardprob.inputs.conversation import ConversationLike, to_messages
from guardprob.integrations.judgement import Judgement, from_scores, from_service
from guardprob.server.config import ServerConfig, resolve_thresholds

if TYPE_CHECKING:
    from guardprob.classifier import Classifier

# Answers that mean the service cannot judge now (a proxy without it, loading, queue full, timed
# out), as against answers that refuse the request itself.
_UNAVAILABLE = (502, 503, 504)


class ServiceError(GuardprobError, RuntimeError):
    """The guardprob service gave no judgement. ``unreachable``: it did not answer, or
    answered that it cannot judge now (a fail-open setting may let the request through)."""

    def __init__(self, message: str, *, unreachable: bool):
        super().__init__(message)
        self.unreachable = unreachable


class Judge(Protocol):
    async def judge(self, conversation: ConversationLike, role: str) -> Judgement: ...


def service_root(api_base: str) -> str:
    """'http://host:8000/v1/' -> 'http://host:8000': the routes are added here."""
    root = api_base.strip().rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


class ServiceJudge:
    """Judgements from ``guardprob serve``: the service's thresholds (its config file or
    calibration) decide what is flagged."""

    def __init__(self, api_base: str, api_key: str | None = None, timeout: float = 60.0):
        self.root = service_root(api_base)
        self.url = f"{self.root}/v1/classify"
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def judge(self, conversation: ConversationLike, role: str) -> Judgement:
        import httpx

        body = {"messages": [{"role": m.role, "content": m.content} for m in to_messages(conversation)], "role": role}
        try:
            # A client per call: hooks run on whichever event loop the framework has at the time.
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                reply = await client.post(self.url, json=body, headers=self.headers)
        except httpx.TimeoutException:
            raise ServiceError(
                f"the guardprob service at {self.root} did not answer within {self.timeout:g} s; raise the "
                "timeout setting, or give the service more compute (a smaller model, a GPU)", unreachable=True,
            ) from None
        except httpx.TransportError as exc:
            raise ServiceError(
                f"the guardprob service at {self.root} is unreachable ({type(exc).__name__}: {exc}); start it "
                "(guardprob serve --host HOST --port PORT) or set api_base to where it runs", unreachable=True,
            ) from None
        return self._read(reply, role)

    def _read(self, reply: Any, role: str) -> Judgement:
        message = _error_message(reply)
        if reply.status_code == 401:
            raise ServiceError(
                f"the guardprob service at {self.root} refused the API key ({message}); set api_key to a key the "
                "service was started with (guardprob serve --api-key, or GUARDPROB_API_KEYS)", unreachable=False,
            )
        if reply.status_code == 404:
            raise ServiceError(
                f"{self.url} answered 404; set api_base to the root of a guardprob service, e.g. "
                "http://127.0.0.1:8000", unreachable=False,
            )
        if reply.status_code != 200:
            raise ServiceError(f"the guardprob service at {self.root} answered {reply.status_code}: {message}",
                               unreachable=reply.status_code in _UNAVAILABLE)
        try:
            return from_service(reply.json(), role)
        except (ValueError, KeyError, TypeError) as exc:
            raise ServiceError(
                f"{self.url} answered with something that is not a guardprob classification ({type(exc).__name__}: "
                f"{exc}); set api_base to the root of a guardprob service", unreachable=False,
            ) from None


def _error_message(reply: Any) -> str:
    """The service's own error message (OpenAI's error shape), else the start of the body."""
    try:
        return str(reply.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return reply.text[:200] or "(empty body)"


class LocalJudge:
    """Judgements from a classifier in this process, flagged by ``config``'s thresholds, method
    and search settings (a server config: the same file ``guardprob serve --config`` reads)."""

    def __init__(self, classifier: Classifier, config: ServerConfig | None = None):
        self.classifier = classifier
        self.config = config or ServerConfig()
        try:
            classifier.search_config(self.config.method, **self.config.search)
        except GuardprobError as exc:
            raise type(exc)(f"{self.config.source}: field 'search': {exc}") from None
        self.thresholds = resolve_thresholds(self.config, classifier.taxonomy, self.config.calibration)
        # The model and tokenizer are not safe to enter from several threads at once.
        self._lock = threading.Lock()

    def judge_now(self, conversation: ConversationLike, role: str) -> Judgement:
        with self._lock:
            scores = self.classifier.score(list(conversation), self.config.method, role=role, **self.config.search)
        return from_scores(scores, role, self.classifier.name, self.thresholds, self.config.calibration)

    async def judge(self, conversation: ConversationLike, role: str) -> Judgement:
        # Scoring takes seconds of CPU: off the event loop, so the framework keeps serving.
        return await asyncio.to_thread(self.judge_now, conversation, role)
