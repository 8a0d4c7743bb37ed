"""The FastAPI app: ``create_app(classifier_or_factory, config)``.

Request flow: parse and validate the body, render each prompt (length checks included) on a
thread, queue the prompts on the micro-batcher, await them with the request's timeout, and
answer. Every failure is answered in OpenAI's error shape (schemas.ApiError).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from guardprob.backends.base import Prompt
from guardprob.core.decision import DecisionRule, calibrated, flags
from guardprob.core.estimators import METHODS
from guardprob.core.tree import SearchConfig
from guardprob.errors import ContextLengthError, InputError, RoleError, RoundCancelled, UnreadableError
from guardprob.inputs.reader import Message, read_messages, read_texts
from guardprob.options import deadline as deadlines
from guardprob.options.score import ScoreOptions
from guardprob.options.table import SEARCH, TRACE
from guardprob.options.table import check as check_option
from guardprob.options.table import group as options_group
from guardprob.result import Scores
from guardprob.server import openai_categories
from guardprob.server.batcher import BatcherClosed, Done, MicroBatcher, QueueFull
from guardprob.server.config import ServerConfig, Thresholds, category_keys, resolve_thresholds
from guardprob.server.continuous import ContinuousBatcher
from guardprob.server.duplex import NDJSON, DuplexEvents, NdjsonBody, chunk_line_limit
from guardprob.server.limits import BoundedBody
from guardprob.server.metrics import ServerMetrics
from guardprob.server.scheduler import Pool, Scheduler, StartFn
from guardprob.server.schemas import (
    ApiError,
    ClassifyRequest,
    ModerationRequest,
    validation_error,
)

access_log = logging.getLogger("guardprob.server.access")
log = logging.getLogger("guardprob.server")

# the options a request may set (ClassifyRequest's fields, from the table in guardprob.options)
_REQUEST_SEARCH_KEYS = tuple(o.name for o in options_group(SEARCH) if o.request)
_REQUEST_TRACE_KEYS = tuple(o.name for o in options_group(TRACE) if o.request)  # reasoning.TraceConfig's settings
_KNOWN_PATHS = ("/v1/moderations", "/v1/classify", "/v1/models", "/health", "/metrics", "/playground")
# Search knobs that only widen the search; the greedy-path methods keep their own narrow search.
_WIDENING = ("eps", "top_p", "max_nodes")
# Knobs a certified decision sets itself (it searches until decided); a request may still set them.
_DECIDING = ("eps", "top_p", "tolerance", "prior")


@dataclass(frozen=True)
class _Loaded:
    """Everything that needs the model: built once it is loaded."""

    classifier: Any
    keys: dict[str, str]  # category id -> response key
    calibrated: Thresholds  # for config.method (config > calibration > default)
    plain: Thresholds  # for other methods (config > default): the calibration does not apply
    batcher: MicroBatcher | ContinuousBatcher
    openai: dict[str, tuple[str, ...]] | None = None  # /v1/moderations: OpenAI name -> the ids it unites
    # the thresholds a certified decision takes: "moderations", "calibrated" and "plain" (as above)
    rules: dict[str, DecisionRule] | None = None


@dataclass(frozen=True)
class _Plan:
    """How one /v1/classify request is scored: its batcher key (_Service.search_key) and
    whether the calibration applies."""

    key: tuple
    calibrated: bool


class _Service:
    """The app's state: the config, the model once loaded, metrics, and the batcher."""

    def __init__(self, config: ServerConfig, metrics: ServerMetrics):
        self.config = config
        self.metrics = metrics
        self.loaded: _Loaded | None = None
        self.status = "loading"
        self.error: str | None = None
        # A tokenizer is not safe to enter from several threads at once (special-token splitting is
        # a setting of the shared tokenizer): one conversation renders at a time.
        self._render_lock = threading.Lock()

    # -- loading ------------------------------------------------------------------------
    def load(self, classifier: Any) -> None:
        config = self.config
        try:
            classifier.search_config(config.method, **config.search)
        except InputError as exc:
            raise InputError(f"{config.source}: field 'search': {exc}") from None
        taxonomy = classifier.taxonomy
        # Thresholds first: a config error must not leave a worker thread behind.
        # auto: the shipped mapping, unless a calibration is loaded (its calibrated per-category scores)
        setting = "none" if config.openai_categories == "auto" and config.calibration is not None else config.openai_categories
        openai = openai_categories.resolve(setting, taxonomy, classifier.per_category, config.source)
        calibrated = resolve_thresholds(config, taxonomy, config.calibration, openai or ())
        plain = resolve_thresholds(config, taxonomy, None, openai or ())
        rules = {
            "calibrated": DecisionRule(calibrated.values, calibration=config.calibration),
            "plain": DecisionRule(plain.values),
            # with OpenAI's names, /v1/moderations flags the unions alone
            "moderations": DecisionRule({}, groups={name: config.thresholds.get(name, config.default_threshold)
                                                    for name in openai}) if openai else
            DecisionRule(calibrated.values, calibration=config.calibration),
        }
        batcher = make_scheduler(  # interleaved runs, or continuous batching (config.continuous)
            config, start=lambda key, prompts: _MethodRun(
                classifier.start(prompts, round_nodes=config.round_nodes, **_start_kwargs(key, rules)), key[0]),
            new_pool=lambda: _ServicePool(classifier, rules, config.round_nodes),
            joinable=getattr(classifier, "joinable", False),
            on_batch=self.metrics.batch_size.observe, on_fallback=self.metrics.fallbacks.inc)
        self.metrics.queue_depth.set_function(lambda: batcher.depth)
        cache_stats = getattr(getattr(classifier, "backend", None), "cache_stats", None)
        if callable(cache_stats):  # an engine with a prefix cache (transformers)
            self.metrics.watch_cache(cache_stats)
        self.loaded = _Loaded(classifier, category_keys(taxonomy), calibrated, plain, batcher, openai, rules)
        self.status = "ready"
        self.metrics.ready.set(1)

    def load_from(self, factory: Callable[[], Any], on_error: Callable[[BaseException], None] | None) -> None:
        try:
            self.load(factory())
        except BaseException as exc:  # report on /health instead of dying silently in a thread
            self.status, self.error = "failed", str(exc)
            log.error(json.dumps({"event": "model_load_failed", "error": str(exc)}))
            if on_error is not None:
                on_error(exc)
            return
        clf = self.loaded.classifier
        log.info(json.dumps({"event": "model_loaded", "model": clf.name, "format": clf.format.name,
                             "format_from": clf.format_reason}))

    def close(self) -> None:
        if self.loaded is not None:
            self.loaded.batcher.close(timeout=self.config.timeout_s)

    def ready(self) -> _Loaded:
        if self.loaded is None:
            detail = f"the model failed to load: {self.error}" if self.status == "failed" else "the model is loading"
            raise ApiError(503, f"{detail}; retry later", type="server_error", code="model_not_ready",
                           headers={"Retry-After": "5"})
        return self.loaded

    # -- requests -----------------------------------------------------------------------
    def search_key(self, loaded: _Loaded, method: str, overrides: dict[str, Any],
                   decide: str | None = None) -> tuple[str, ScoreOptions, tuple, str | None]:
        """(method, options, groups, decide): requests with equal keys share a batched search;
        ``options`` is the one ScoreOptions its fields become (each checked here, its error naming
        the field); ``decide`` names the rule (``_Loaded.rules``) a certified decision takes, if any."""
        defaults = dict(self.config.search)
        if method != "marginal":
            defaults = {k: v for k, v in defaults.items() if k not in _WIDENING}
        if decide is not None:
            defaults = {k: v for k, v in defaults.items() if k not in _DECIDING}
        params = {**defaults, **{k: v for k, v in overrides.items() if v is not None}}
        # The server's max_nodes caps the work one request may ask for (eps=0 alone would
        # expand the whole tree); a request may lower it, not raise it.
        ceiling = self.config.search.get("max_nodes", SearchConfig.max_nodes)
        asked = overrides.get("max_nodes")
        if ceiling is not None and isinstance(asked, int) and asked > ceiling:
            raise ApiError(400, f"max_nodes={asked} is above this server's limit of {ceiling}; ask for at most "
                           f"{ceiling} (the operator sets it with search.max_nodes)", param="max_nodes",
                           code="invalid_value")
        for name, value in overrides.items():
            if value is None:
                continue
            try:
                if name in _REQUEST_TRACE_KEYS:
                    _check_trace_setting(loaded.classifier, name, value)
                else:
                    loaded.classifier.search_config(method, **{name: value})
            except InputError as exc:
                raise ApiError(400, str(exc), param=name, code="invalid_value") from None
        try:
            options = loaded.classifier.options(method, decide=False if decide is None else loaded.rules[decide], **params)
        except InputError as exc:
            raise ApiError(400, str(exc), param="decide" if decide is not None else None, code="invalid_value") from None
        groups = tuple(loaded.openai.items()) if loaded.openai and decide == "moderations" else ()
        return method, options, groups, decide

    async def render(self, loaded: _Loaded, conversations: Sequence[tuple[str, Any]], role: str | None) -> list[Prompt]:
        """Render every conversation (param name, conversation) on a thread; InputError names its param."""

        budget = self.config.max_request_tokens
        chars = sum(_characters(c) for _, c in conversations)
        if chars > self.config.max_request_chars:
            raise ApiError(413, f"the request holds {chars} characters of text, over this server's limit of "
                           f"{self.config.max_request_chars}; split it into smaller requests", code="request_too_large")

        def work() -> list[Prompt]:
            prompts: list[Prompt] = []
            tokens = 0
            for param, conversation in conversations:
                try:
                    with self._render_lock:  # one conversation at a time: other requests' renders interleave
                        prompt = loaded.classifier.prompt(conversation, role)
                except InputError as exc:
                    too_long = isinstance(exc, ContextLengthError)
                    raise ApiError(413 if too_long else 400, f"{param}: {exc}", param="role" if isinstance(exc, RoleError) else param,
                                   code="context_length_exceeded" if too_long else "invalid_input") from None
                tokens += len(prompt.ids)
                if tokens > budget:  # stop at once: the rest would only be thrown away
                    raise ApiError(413, f"{param}: the request's prompts reach {tokens} tokens, over this server's "
                                   f"limit of {budget} per request (max_request_tokens); split it into smaller requests",
                                   param=param, code="request_too_large")
                prompts.append(prompt)
            return prompts

        return await run_in_threadpool(work)

    async def score(self, loaded: _Loaded, key: tuple, prompts: list[Prompt], timeout_at: float,
                    answer_by: float | None = None, gone: asyncio.Event | None = None) -> list[Done]:
        """Score on the worker; past ``timeout_at`` (the config's timeout_s) the request gets 504 and
        its work stops at the next model call; past ``answer_by`` (its deadline_ms) it is answered with
        the bounds reached (incomplete); both are instants on ``deadlines.now``'s clock; once
        ``gone`` is set (the client left), or when the awaiting task is cancelled (a response
        whose client left), its work stops the same way and the answer is 499."""
        if gone is not None and gone.is_set():
            raise _client_closed()
        try:
            futures = loaded.batcher.submit(key, prompts, answer_by)
        except (QueueFull, BatcherClosed) as exc:
            why = "the server is shutting down" if isinstance(exc, BatcherClosed) else "the scoring queue is full"
            raise ApiError(503, f"{why}; retry later", type="server_error",
                           code="shutting_down" if isinstance(exc, BatcherClosed) else "queue_full",
                           headers={"Retry-After": "1"}) from None
        gathered = asyncio.ensure_future(asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        left = asyncio.ensure_future(gone.wait()) if gone is not None else None
        try:
            finished, _ = await asyncio.wait({gathered, *([left] if left else [])},
                                             timeout=deadlines.left(timeout_at),
                                             return_when=asyncio.FIRST_COMPLETED)
            if gathered not in finished:
                loaded.batcher.abandon(futures)  # queued: never scored; running: stopped at the next model call
                gathered.cancel()
                gathered.add_done_callback(_forget)  # its outcome, whatever it is, has no reader now
                if left is not None and left in finished:  # nobody reads the answer
                    raise _client_closed()
                raise ApiError(504, f"scoring took longer than the request timeout of {self.config.timeout_s:g} s; "
                               "retry, or send fewer inputs", type="server_error", code="timeout")
            done = gathered.result()
        except asyncio.CancelledError:  # the response is being torn down: its client has gone
            loaded.batcher.abandon(futures)
            gathered.cancel()
            gathered.add_done_callback(_forget)
            raise
        except InputError as exc:
            raise ApiError(400, str(exc), code="invalid_input") from None
        except ApiError:
            raise
        except Exception as exc:
            loaded.batcher.abandon(futures)
            log.error(json.dumps({"event": "scoring_failed", "error": f"{type(exc).__name__}: {exc}"}))
            raise ApiError(500, f"scoring failed ({type(exc).__name__}); the request can be retried",
                           type="server_error", code="scoring_failed") from None
        finally:
            if left is not None:
                left.cancel()
        self.metrics.inputs.inc(len(done))
        return list(done)


def _forget(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _client_closed() -> ApiError:
    return ApiError(499, "the client closed the connection", code="client_closed")


@asynccontextmanager
async def _watching(receive: Receive) -> AsyncIterator[asyncio.Event]:
    """An event set once the client hangs up, heard on ``receive`` (call it only once the body
    is read: what comes then can only be the disconnect)."""
    gone = asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            await asyncio.sleep(0.05)  # a server that repeats empty messages: do not spin
        gone.set()

    task = asyncio.ensure_future(watch())
    try:
        yield gone
    finally:
        task.cancel()


def _check_trace_setting(classifier: Any, name: str, value: Any) -> None:
    """A request's reasoning setting: only for a format that reasons first, and no longer a
    reasoning than the format's own budget (one request must not hold the engine for long)."""
    reasoning = classifier.reasoning
    if reasoning is None:
        raise InputError(f"{name}: format {classifier.format.name!r} answers without reasoning first; leave {name} out")
    check_option(name, value)  # the table's range check
    if name == "reasoning_tokens" and value > reasoning.max_tokens:
        raise InputError(f"reasoning_tokens={value} is above this format's budget of {reasoning.max_tokens}; "
                         f"ask for at most {reasoning.max_tokens}")


def _start_kwargs(key: Hashable, rules: dict[str, DecisionRule]) -> dict[str, Any]:
    """``Classifier.start``'s arguments for a batcher key (requests alike share a key: _Service.search_key)."""
    method, options, groups, _ = key
    return {"methods": (method,), "groups": dict(groups) or None, "options": options}


class _MethodRun:
    """A scoring run for a batcher: one method's Scores per prompt."""

    def __init__(self, run: Any, method: str):
        self._run, self.method = run, method

    @property
    def done(self) -> bool:
        return self._run.done

    def step(self) -> bool:
        try:
            return self._run.step()
        except RoundCancelled:  # stopped in flight (stop_on): every search ends with the bounds reached
            self._run.stop_all()
            return False

    def stop_on(self, event: threading.Event, deadline: float | None) -> None:
        """Let the engine stop a call in flight once ``event`` is set or at ``deadline``."""
        self._run.stop_on(event, deadline)

    def stop(self, item: int) -> None:
        self._run.stop(item)

    def close(self) -> None:
        self._run.close()

    def results(self) -> list[Scores]:
        return [r[self.method] for r in self._run.results()]


class _ServicePool:
    """The continuous batcher's pool: requests join the classifier's ScoringPool with their key's settings."""

    def __init__(self, classifier: Any, rules: dict[str, DecisionRule], round_nodes: int):
        self._classifier, self._rules = classifier, rules
        self._pool = classifier.pool(round_nodes)

    def join(self, key: Hashable, prompts: Sequence[Prompt]) -> _MethodRun:
        run = self._classifier.start(prompts, pool=self._pool, **_start_kwargs(key, self._rules))
        return _MethodRun(run, key[0])

    def step(self) -> bool:
        return self._pool.step()

    def close(self) -> None:
        self._pool.close()


# -- answers ------------------------------------------------------------------------------
def _category_rows(loaded: _Loaded, scores: Scores, calibration: Any, thresholds: Thresholds) -> dict[str, dict]:
    rows = {}
    flagged = flags({cid: c.p for cid, c in scores.categories.items()}, thresholds.values, calibration)
    for cid, c in scores.categories.items():
        value = calibrated(cid, c.p, calibration)
        rows[cid] = {
            "id": cid, "name": c.name, "key": loaded.keys[cid], "p": c.p, "lower": c.lower, "upper": c.upper,
            "calibrated": value if calibration is not None else None, "score": value,
            "threshold": thresholds.values[cid], "threshold_source": thresholds.sources[cid], "flagged": flagged[cid],
        }
        if scores.decision is not None:  # certified: the flag the exhaustive search would give
            rows[cid]["decided"] = scores.decision.categories.get(cid) is not None
    return rows


def _moderation_result(rows: dict[str, dict]) -> dict:
    by_key = {row["key"]: row for row in rows.values()}
    return {
        "flagged": any(row["flagged"] for row in rows.values()),
        "categories": {k: row["flagged"] for k, row in by_key.items()},
        "category_scores": {k: row["score"] for k, row in by_key.items()},
        "category_applied_input_types": {k: ["text"] for k in by_key},
    }


def _openai_result(scores: Scores, config: ServerConfig) -> dict:
    """OpenAI's category names, each the exact P(the verdict names any mapped category); its
    threshold the config's for that name, else the default (calibration is per category)."""
    flagged = flags({name: g.p for name, g in scores.groups.items()}, config.thresholds, None, config.default_threshold)
    return {
        "flagged": any(flagged.values()),
        "categories": flagged,
        "category_scores": {name: g.p for name, g in scores.groups.items()},
        "category_applied_input_types": {name: ["text"] for name in scores.groups},
    }


def _classify_answer(loaded: _Loaded, done: Done, rows: dict[str, dict], calibrated: bool, started: float) -> dict:
    s: Scores = done.value
    flagged = [cid for cid, row in rows.items() if row["flagged"]]
    return {
        "id": f"clf-{uuid.uuid4().hex}",
        "object": "classification",
        "model": loaded.classifier.name,
        "taxonomy": s.taxonomy,
        "method": s.method,
        "params": dict(s.params),
        "p_unsafe": s.p_unsafe,
        "p_unsafe_lower": s.p_unsafe_lower,
        "p_unsafe_upper": s.p_unsafe_upper,
        "format": loaded.classifier.format.name,
        "verdict": s.verdict,
        "verdict_categories": list(s.verdict_categories),
        "verdict_unsafe": s.verdict_unsafe,
        "fields": {k: {"p": f.p, "lower": f.lower, "upper": f.upper} for k, f in s.fields.items()},
        "flagged": bool(flagged),
        "flagged_categories": flagged,
        "calibrated": calibrated,
        "categories": rows,
        "thresholds": {cid: row["threshold"] for cid, row in rows.items()},
        "unexplored_mass": s.unexplored_mass,
        "invalid_mass": s.invalid_mass,
        "expanded_nodes": s.expanded_nodes,
        "model_calls": s.model_calls,
        "truncated": s.truncated,
        "complete": s.complete,
        "decided": None if s.decision is None else s.decision.decided,  # asked decide: every flag certified?
        "reasoning": s.as_dict()["reasoning"],  # the reasoning before the verdict (formats that reason first)
        "timing": {
            "total_ms": (deadlines.now() - started) * 1000,
            "queue_ms": done.queued_s * 1000,
            "batch_ms": done.run_s * 1000,
            "model_seconds_per_prompt": s.seconds,
            "batch_size": done.batch_size,
        },
    }


async def _body(request: Request, model: type[BaseModel], limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body has {declared} bytes, over the limit of {limit}", code="body_too_large")
    raw = await request.body()
    if len(raw) > limit:
        raise ApiError(413, f"the request body has {len(raw)} bytes, over the limit of {limit}", code="body_too_large")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_error(exc) from None


def _check_text(text: str, param: str, max_chars: int) -> None:
    if not text.strip():
        raise ApiError(422, f"{param} is empty; give a non-empty text to moderate", param=param, code="empty_input")
    if len(text) > max_chars:
        raise ApiError(413, f"{param} has {len(text)} characters, over the limit of {max_chars}",
                       param=param, code="input_too_long")


def _characters(conversation: Any) -> int:
    if isinstance(conversation, str):
        return len(conversation)
    return sum(len(m.content if isinstance(m, Message) else m.get("content") or "") for m in conversation)


def _moderation_texts(body: ModerationRequest, config: ServerConfig) -> list[str]:
    """The texts to moderate, one per item, read by guardprob's one reader: a string, a list of
    strings, or of text parts ({'type': 'text' or 'input_text', 'text': ...}); an image is refused."""
    if isinstance(body.input, list) and not body.input:
        raise ApiError(422, "input is an empty list; give at least one text", param="input", code="empty_input")
    if isinstance(body.input, list) and len(body.input) > config.max_inputs:
        raise ApiError(413, f"input holds {len(body.input)} texts, over the limit of {config.max_inputs}; split the "
                       "request", param="input", code="too_many_inputs")
    try:
        texts = read_texts(body.input, "input")
    except UnreadableError as exc:
        raise ApiError(400, str(exc), param=_where(str(exc), "input"), code="unsupported_input") from None
    except InputError as exc:
        message = f"'input' must be a string or a list of strings (or of {{'type': 'text', 'text': ...}} parts); {exc}"
        raise ApiError(422, message, param=_where(str(exc), "input"), code="invalid_type") from None
    for i, text in enumerate(texts):
        _check_text(text, "input" if isinstance(body.input, str) else f"input[{i}]", config.max_chars)
    return texts


def _event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


async def _listed(chunks: Sequence[str]) -> AsyncIterator[str]:
    for chunk in chunks:
        yield chunk


def _answer_start(body: ClassifyRequest, config: ServerConfig) -> tuple[list[Message], str]:
    """A stream's conversation before the answer, and the answer begun (its last message, if the
    assistant's), checked before the first event so that a bad request gets its status code."""
    if body.role not in (None, "assistant"):
        raise ApiError(400, "a stream judges the assistant's answer; leave role out", param="role", code="invalid_value")
    _, conversation = _classify_conversation(body, config)
    messages = [Message("user", conversation)] if isinstance(conversation, str) else list(conversation)
    answer = messages.pop().content if messages[-1].role == "assistant" else ""
    if not messages:
        raise ApiError(422, "a stream judges an answer to a user's message; begin 'messages' with it", param="messages",
                       code="missing_field")
    return messages, answer


def _classify_conversation(body: ClassifyRequest, config: ServerConfig) -> tuple[str, str | tuple[Message, ...]]:
    """The text or the messages to judge, read by guardprob's one reader (guardprob.inputs.reader: chat
    messages in any shape, Responses API items); what it cannot read is refused, naming it."""
    if (body.messages is None) == (body.input is None):
        raise ApiError(422, "give exactly one of 'messages' (a list of {role, content}) or 'input' (a text)",
                       param="messages", code="missing_field")
    if body.input is not None:
        _check_text(body.input, "input", config.max_chars)
        return "input", body.input
    if not body.messages:
        raise ApiError(422, "messages is an empty list; give at least one message", param="messages",
                       code="empty_input")
    try:
        messages = read_messages(body.messages, "messages")
    except UnreadableError as exc:
        raise ApiError(400, str(exc), param=_where(str(exc)), code="unsupported_input") from None
    except InputError as exc:
        message = str(exc)
        raise ApiError(422, message, param=_where(message),
                       code="empty_input" if "is empty or whitespace only" in message else "invalid_type") from None
    for i, m in enumerate(messages):
        if len(m.content) > config.max_chars:
            raise ApiError(413, f"messages[{i}] has {len(m.content)} characters, over the limit of {config.max_chars}",
                           param=f"messages[{i}].content", code="input_too_long")
    return "messages", messages


def _where(message: str, field: str = "messages") -> str:
    """The request field an error of the reader names first ('messages[0].content[1] ...')."""
    found = re.search(rf"\b({field}(?:\[\d+\]|\.\w+)*)", message)
    return found.group(1) if found else field


# -- the app ------------------------------------------------------------------------------
def make_scheduler(config: Any, *, start: StartFn, new_pool: Callable[[], Pool], joinable: bool,
                   on_batch: Callable[[int], None] | None = None,
                   on_fallback: Callable[[], None] | None = None) -> Scheduler:
    """The service's scheduler from its config: ``continuous: true`` joins requests to one
    running search where the engine can (``joinable``); otherwise runs are interleaved."""
    common = {"max_batch": config.max_batch, "wait_s": config.batch_wait_ms / 1000, "queue_size": config.queue_size,
              "on_batch": on_batch, "on_fallback": on_fallback, "clock": deadlines.now}  # answer_by's clock
    if config.continuous and joinable:
        return ContinuousBatcher(new_pool, max_running=config.max_running, **common)
    # an engine whose sessions take no prompts mid-run: runs of their own, interleaved
    return MicroBatcher(start, max_running=max(config.max_running, config.max_batch), **common)


def create_app(
    classifier_or_factory: Any,
    config: ServerConfig | None = None,
    *,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """An app over a loaded Classifier, or over a zero-argument factory that loads one on a
    thread at startup (/health answers 503 until it is ready)."""
    config = config or ServerConfig()
    metrics = ServerMetrics()
    service = _Service(config, metrics)
    factory = None
    if callable(classifier_or_factory) and not hasattr(classifier_or_factory, "score_prompts"):
        factory = classifier_or_factory
    else:
        service.load(classifier_or_factory)  # config errors surface here, before serving

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if factory is not None:
            threading.Thread(target=service.load_from, args=(factory, on_load_error), name="guardprob-load",
                             daemon=True).start()
        yield
        # uvicorn has already let in-flight requests finish; score what is queued and stop.
        await run_in_threadpool(service.close)

    # The API's own documentation pages tell a stranger every endpoint and field: off unless asked for.
    docs = {} if config.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="guardprob moderation service", lifespan=lifespan, **docs)
    app.state.service = service
    app.state.metrics = metrics
    _add_middleware(app, service)
    _add_error_handlers(app, metrics)
    _add_routes(app, service)
    if config.playground:
        from guardprob.server.playground import playground_router

        app.include_router(playground_router())
    return app


def _add_middleware(app: FastAPI, service: _Service) -> None:
    config = service.config
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    # innermost: a body over the limit is refused as it arrives (answered, logged and counted as any error)
    app.add_middleware(BoundedBody, limit=config.max_body_bytes, answer=lambda error: _error_response(service.metrics, error))
    # outermost: every answer, CORS preflights included, is logged, counted and tagged
    app.add_middleware(_Observe, service=service)


class _Observe:
    """Access log, metrics, request ids and API keys, as plain ASGI: a wrapper that passes the
    client's messages through untouched, so an endpoint sees a client that disconnects. A
    request whose client left before its answer was complete is logged and counted as 499."""

    def __init__(self, app: Any, service: _Service):
        self.app, self.metrics = app, service.metrics
        self.keys = tuple(k.encode() for k in service.config.api_keys)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request = Request(scope)
        path = scope["path"] if scope["path"] in _KNOWN_PATHS else "other"
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        status = {"code": 500, "sent": False, "done": False, "gone": False}

        async def tagged(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                status["done"] = True
            await send(message)

        async def heard() -> dict:
            message = await receive()
            if message["type"] == "http.disconnect" and not status["done"]:
                status["gone"] = True
            return message

        try:
            if self.keys and scope["path"].startswith("/v1/") and not _authorized(request, self.keys):
                await _error_response(self.metrics, ApiError(
                    401, "Incorrect or missing API key; send 'Authorization: Bearer <key>'", code="invalid_api_key",
                ))(scope, receive, tagged)
            else:
                await self.app(scope, heard, tagged)
        except Exception as exc:  # answered here, so the request is still logged, counted and tagged
            if status["sent"]:
                raise
            await _internal_error(self.metrics, exc)(scope, receive, tagged)
        finally:
            if status["gone"]:
                status["code"] = 499
                self.metrics.disconnects.inc()
            seconds = time.perf_counter() - started
            self.metrics.requests.labels(path, str(status["code"])).inc()
            self.metrics.latency.labels(path).observe(seconds)
            # Headers (and so API keys) are never logged.
            access_log.info(json.dumps({
                "event": "access", "request_id": request_id, "method": scope["method"], "path": scope["path"],
                "status": status["code"], "ms": round(seconds * 1000, 2),
                "client": request.client.host if request.client else None,
            }))


def _authorized(request: Request, keys: tuple[bytes, ...]) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    given = token.strip().encode()
    # Constant-time comparison against every key, so timing does not reveal a key's prefix.
    return any([hmac.compare_digest(given, key) for key in keys])


def _add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error_response(metrics, exc)

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, exc: ClientDisconnect):  # while its body was read: no traceback
        return _error_response(metrics, _client_closed())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        metrics.errors.labels(code).inc()
        body = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code).body()
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        return _internal_error(metrics, exc)


def _error_response(metrics: ServerMetrics, error: ApiError) -> JSONResponse:
    metrics.errors.labels(error.code or error.type).inc()
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _internal_error(metrics: ServerMetrics, exc: Exception) -> JSONResponse:
    log.error("unexpected error", exc_info=exc)
    return _error_response(metrics, ApiError(500, f"internal error ({type(exc).__name__})", type="server_error",
                                             code="internal_error"))


def _add_routes(app: FastAPI, service: _Service) -> None:
    config = service.config

    @app.get("/health")
    async def health():
        loaded = service.loaded
        if loaded is None:
            body = {"status": service.status, **({"error": service.error} if service.error else {})}
            return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
        return {"status": "ready", "model": loaded.classifier.name, "taxonomy": loaded.classifier.taxonomy.name,
                "method": config.method, "queue_depth": loaded.batcher.depth, "running": loaded.batcher.running}

    @app.get("/metrics")
    async def metrics_endpoint():
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.get("/v1/models")
    async def models():
        loaded = service.ready()
        return {"object": "list", "data": [{"id": loaded.classifier.name, "object": "model", "created": 0,
                                            "owned_by": "guardprob"}]}

    @app.post("/v1/moderations")
    async def moderations(request: Request):
        started = deadlines.now()
        loaded = service.ready()
        body = await _body(request, ModerationRequest, config.max_body_bytes)
        texts = _moderation_texts(body, config)
        params = [("input" if isinstance(body.input, str) else f"input[{i}]", t) for i, t in enumerate(texts)]
        decide = "moderations" if config.decide and config.method == "marginal" else None
        key = service.search_key(loaded, config.method, {k: getattr(body, k) for k in _REQUEST_SEARCH_KEYS}, decide)
        if loaded.openai and decide is None:
            key = (*key[:2], tuple(loaded.openai.items()), None)
        async with _watching(request.receive) as gone:
            prompts = await service.render(loaded, params, "user")
            done = await service.score(loaded, key, prompts, started + config.timeout_s, gone=gone)
        if loaded.openai:
            results = [_openai_result(d.value, config) for d in done]
        else:
            results = [_moderation_result(_category_rows(loaded, d.value, config.calibration, loaded.calibrated))
                       for d in done]
        for result, d in zip(results, done):
            if d.value.decision is not None:  # the flags are those the exhaustive search would give
                result["decided"] = d.value.decision.decided
        return {"id": f"modr-{uuid.uuid4().hex}", "model": loaded.classifier.name, "results": results}

    def plan(loaded: _Loaded, body: ClassifyRequest) -> _Plan:
        """How a classify request is scored, every parameter checked (before a stream's first byte)."""
        method = body.method or config.method
        if method not in METHODS:
            raise ApiError(400, f"unknown method {method!r}; use one of {', '.join(METHODS)}", param="method",
                           code="invalid_value")
        calibrated = config.calibration is not None and method == config.method
        decide = ("calibrated" if calibrated else "plain") if body.decide else None
        key = service.search_key(loaded, method, {k: getattr(body, k) for k in (*_REQUEST_SEARCH_KEYS, *_REQUEST_TRACE_KEYS)},
                                 decide)
        return _Plan(key, calibrated)

    async def classify_one(loaded: _Loaded, body: ClassifyRequest, planned: _Plan, param: str, conversation: Any,
                           role: str | None, gone: asyncio.Event) -> dict:
        started = deadlines.now()
        prompts = await service.render(loaded, [(param, conversation)], role)
        answer_by = None if body.deadline_ms is None else started + body.deadline_ms / 1000  # on deadlines.now's clock
        (done,) = await service.score(loaded, planned.key, prompts, started + config.timeout_s, answer_by, gone)
        thresholds = loaded.calibrated if planned.calibrated else loaded.plain
        rows = _category_rows(loaded, done.value, config.calibration if planned.calibrated else None, thresholds)
        return _classify_answer(loaded, done, rows, planned.calibrated, started)

    @app.post("/v1/classify")
    async def classify(request: Request):
        loaded = service.ready()
        if request.headers.get("content-type", "").split(";")[0].strip() == NDJSON:
            reader = NdjsonBody(request.receive, config.max_body_bytes, chunk_line_limit(config.max_chars))
            try:
                header = await reader.header()
                planned, start = plan(loaded, header), _answer_start(header, config)
            except BaseException:
                reader.close()
                raise
            return DuplexEvents(answer_events(loaded, header, planned, *start, reader.chunks(), reader.gone), reader)
        body = await _body(request, ClassifyRequest, config.max_body_bytes)
        if body.stream:
            if body.chunks is None:
                raise ApiError(422, "a stream needs the answer's chunks: give 'chunks' (a list of strings), or send "
                               f"the request as {NDJSON} (the request, then one {{\"chunk\": ...}} per line)",
                               param="chunks", code="missing_field")
            planned, start = plan(loaded, body), _answer_start(body, config)
            return StreamingResponse(listed_events(request.receive, loaded, body, planned, *start),
                                     media_type="text/event-stream")
        if body.chunks is not None:
            raise ApiError(400, "chunks are the pieces of a streamed answer; add \"stream\": true", param="chunks",
                           code="invalid_value")
        param, conversation = _classify_conversation(body, config)
        planned = plan(loaded, body)
        async with _watching(request.receive) as gone:
            return await classify_one(loaded, body, planned, param, conversation, body.role, gone)

    async def listed_events(receive: Receive, loaded: _Loaded, body: ClassifyRequest, planned: _Plan,
                            messages: list[dict], answer: str) -> AsyncIterator[bytes]:
        async with _watching(receive) as gone:
            async for event in answer_events(loaded, body, planned, messages, answer, _listed(body.chunks), gone):
                yield event

    async def answer_events(loaded: _Loaded, body: ClassifyRequest, planned: _Plan, messages: list[dict], answer: str,
                            chunks: AsyncIterator[str], gone: asyncio.Event) -> AsyncIterator[bytes]:
        """Server-sent events: after each chunk of the answer, the classification of the
        conversation with the answer so far (the assistant's turn judged); then ``done``. A
        failure mid-stream ends it with an ``error`` event in the API's error shape; a client
        that has gone gets nothing more, and no further chunk is scored."""
        try:
            index = 0
            async for chunk in chunks:
                if gone.is_set():
                    return
                answer += chunk
                if len(answer) > config.max_chars:
                    raise ApiError(413, f"the answer has {len(answer)} characters, over the limit of {config.max_chars}",
                                   param="chunks", code="input_too_long")
                scored = None
                if answer.strip():  # an answer may begin with whitespace: nothing to judge yet
                    whole = [*messages, {"role": "assistant", "content": answer}]
                    scored = await classify_one(loaded, body, planned, f"chunks[{index}]", whole, "assistant", gone)
                yield _event("classification", {"chunk": index, "answer_chars": len(answer), "classification": scored})
                index += 1
            if not gone.is_set():
                yield _event("done", {"chunks": index})
        except ApiError as exc:
            if exc.status != 499:
                yield _event("error", exc.body())
        except Exception as exc:  # never a dropped connection: the stream ends with an error event
            log.error(json.dumps({"event": "stream_failed", "error": f"{type(exc).__name__}: {exc}"}))
            yield _event("error", ApiError(500, f"internal error ({type(exc).__name__})", type="server_error",
                                           code="internal_error").body())
