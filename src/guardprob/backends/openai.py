"""OpenAI-compatible completion servers (vLLM, SGLang, llama.cpp's llama-server, llama-cpp-python).

A round of the search is one ``/v1/completions`` request for one token with the top-k
log-probabilities, its nodes' token-id prompts sent as a list (vLLM, SGLang and llama-server
take a list of prompts and answer one choice per prompt); where a server does not, each node is
a request of its own and a round's requests go out concurrently (``batch_prompts``, detected at
the first round of two or more nodes). A round stopped from outside (``OpenAISession.cancel``,
``stop_on``) cancels its HTTP requests and closes their connections. Servers report the top k only,
so candidates outside them come back NaN with a true upper bound on their total mass
(the search keeps that mass unexplored, and the scores say ``truncated``).

Prompts go as token ids where the server takes them, so the path is exactly the one the
search means; where it takes only text, the text is re-tokenized (by the server when it
can say how) and must give the same ids back, else that node is left unexplored.
Returned tokens carry their ids where the server names them (llama.cpp's ``llama-server``);
otherwise they are strings, mapped back to ids through the tokenizer's vocabulary, and a
string that several ids render to is never guessed (see ``TokenIndex``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from guardprob.backends.base import NextToken, Prompt, Query, Usage, check_prompts, control_ids
from guardprob.errors import BackendError, InputError, RoundCancelled
from guardprob.options.table import OPENAI, settings_class

log = logging.getLogger(__name__)

_TOKEN_ID = re.compile(r"token_id:(\d+)")
_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_POLL_S = 0.05  # how often a round in flight looks at its stop event and deadline
_CLOSE_WAIT_S = 5.0  # how long a stopped round may take to close its connections


# Fields, defaults and checks: guardprob.options.table (group openai).
_OpenAISettings = settings_class("_OpenAISettings", (OPENAI,), __name__, "The openai engine's options of the table.")


@dataclass(frozen=True)
class OpenAIOptions(_OpenAISettings):
    """top_logprobs: k per request (vLLM caps it with --max-logprobs, default 20).
    prompt_format: "ids", "text", or "auto" (ids, falling back to text if the server refuses).
    token_ids: ask vLLM for "token_id:N" strings (return_tokens_as_token_ids).
    verify: how text prompts are checked: "server" (its tokenize endpoint), "local", or "auto".
    text_mismatch: when a text-only server would tokenize a prompt differently: "error", or
      "allow" (score the server's tokenization; SessionStats.retokenized_prompts counts them).
    batch_prompts: "auto" (a round's token-id prompts in one request where the server takes a
      list of them, learned at the first round of two or more nodes, else one request per node),
      "on" (always one request per round; a server that refuses is an error) or "off"."""

    def __post_init__(self) -> None:
        super().__post_init__()  # each option's type and range: the table's
        if self.batch_prompts == "on" and self.prompt_format == "text":
            raise InputError("batch_prompts='on' sends token-id prompts: use prompt_format='ids' or 'auto' with it, "
                             "or batch_prompts='auto'")


# -- token strings -> ids ---------------------------------------------------------------


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenIndex:
    """Every way a server may spell a token, back to the ids that spell it that way.

    Spellings: the tokenizer's decode of the single id (vLLM, SGLang), the token's raw bytes
    decoded with errors ignored and special tokens empty (llama.cpp), and "token_id:N".
    A string more than one id spells is ambiguous and never attributed to one of them.
    """

    def __init__(self, tokenizer: Any):
        size = len(tokenizer)
        pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
        special = set(getattr(tokenizer, "all_special_ids", ()))
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special |= {i for i, t in added.items() if getattr(t, "special", False)}
        decoder = _byte_decoder()
        byte_level = sum(1 for p in pieces if p and all(ch in decoder for ch in p)) > 0.9 * size
        spellings: dict[str, set[int]] = {}
        for i, piece in enumerate(pieces):
            piece = piece or ""
            forms = {tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)}
            if i in special:
                forms.add("")
            else:
                forms.add(_raw_bytes(piece, decoder, byte_level).decode("utf-8", errors="ignore"))
            for form in forms:
                spellings.setdefault(form, set()).add(i)
        self.size = size
        self.ids = {s: next(iter(ids)) for s, ids in spellings.items() if len(ids) == 1}
        self.ambiguous = {s: frozenset(ids) for s, ids in spellings.items() if len(ids) > 1}

    def resolve(self, text: str | int) -> int | frozenset[int] | None:
        """An id, the ids a string may stand for (ambiguous), or None (no token spells it).
        An int is an id the server reported itself (llama.cpp's server does)."""
        if isinstance(text, int):
            return text if 0 <= text < self.size else None
        m = _TOKEN_ID.fullmatch(text)
        if m:
            i = int(m.group(1))
            return i if i < self.size else None
        if text in self.ids:
            return self.ids[text]
        return self.ambiguous.get(text)


def _raw_bytes(piece: str, decoder: dict[str, int], byte_level: bool) -> bytes:
    m = _BYTE_TOKEN.fullmatch(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    if byte_level and all(ch in decoder for ch in piece):
        return bytes(decoder[ch] for ch in piece)
    return piece.replace("▁", " ").encode("utf-8")


TopEntries = dict[str, float] | Sequence[tuple[str | int, float | None]]


def read_top_logprobs(top: TopEntries, candidates: np.ndarray, index: TokenIndex) -> NextToken:
    """A server's top-k answer -> the candidates' log-probabilities, NaN where unknown.

    ``top`` maps token strings to log-probabilities (the completions API), or lists
    (token, log-probability) pairs where a token is a string or an id the server named.

    The entries are the most likely tokens (the API's contract), so every listed value is at
    least the k-th largest probability and a token that is not listed holds at most the
    smallest listed value. A candidate whose string is listed but ambiguous (several ids
    spell it; llama-cpp-python even keeps one value per string) may hold up to the largest
    listed value. ``unreported`` is the smaller of the sum of these per-candidate bounds and
    1 - the mass of the entries that surely belong to other tokens or resolved candidates.
    """
    logprobs = np.full(len(candidates), np.nan)
    position = {int(c): j for j, c in enumerate(candidates)}
    owned = 0.0
    listed: set[int] = set()  # ids an ambiguous listed string may stand for
    values: list[float] = []
    unknown = -math.inf  # the largest value of a string no id spells the ways we know
    for text, lp in top.items() if isinstance(top, dict) else top:
        lp = float(lp) if lp is not None else -math.inf
        if math.isnan(lp) or lp > 1e-6:
            raise BackendError(f"the server reported log-probability {lp} for {text!r}; expected a value <= 0")
        lp = min(lp, 0.0)
        values.append(lp)
        who = index.resolve(text)
        if isinstance(who, int):
            owned += math.exp(lp)
            if who in position:
                logprobs[position[who]] = lp
        elif isinstance(who, frozenset):
            listed |= who
        else:  # it may be a NaN candidate's, so it claims nothing
            unknown = max(unknown, lp)
    if not values:
        raise BackendError("the server answered without top log-probabilities; is logprobs supported?")
    missing = [int(c) for c, lp in zip(candidates, logprobs) if math.isnan(lp)]
    if not missing:
        return NextToken(logprobs, max(values))
    floor, ceiling = math.exp(max(min(values), unknown)), math.exp(max(values))
    bound = sum(ceiling if i in listed else floor for i in missing)
    return NextToken(logprobs, max(values), unreported=min(max(0.0, 1.0 - owned), bound))


# -- the engine -------------------------------------------------------------------------


class _Loop:
    """An event loop in a daemon thread, so sync callers (also inside a running loop) can await."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="guardprob-openai")
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def submit(self, coro: Any) -> tuple[concurrent.futures.Future, threading.Event]:
        """Run ``coro`` as a task: its result's future (cancelling it cancels the task) and an
        event set once the task has ended, its clean-up (closing connections) included."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        ended = threading.Event()

        def settle(task: asyncio.Task) -> None:
            ended.set()
            try:
                if task.cancelled():
                    future.cancel()
                elif task.exception() is not None:
                    future.set_exception(task.exception())
                else:
                    future.set_result(task.result())
            except concurrent.futures.InvalidStateError:  # cancelled from the caller's side meanwhile
                pass

        def start() -> None:
            if future.cancelled():
                coro.close()
                ended.set()
                return
            task = self.loop.create_task(coro)
            task.add_done_callback(settle)
            future.add_done_callback(lambda f: self.loop.call_soon_threadsafe(task.cancel) if f.cancelled() else None)

        self.loop.call_soon_threadsafe(start)
        return future, ended

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


class OpenAIBackend:
    """base_url: the server's API root, e.g. http://127.0.0.1:8000/v1 (a missing /v1 is added)."""

    name = "openai"
    joinable = True  # sessions take prompts between rounds (Session.add)

    def __init__(self, base_url: str, model: str | None, tokenizer: Any, options: OpenAIOptions = OpenAIOptions()):
        try:
            import httpx
        except ImportError:
            raise BackendError("the openai backend needs httpx: pip install 'guardprob[openai]'") from None
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise InputError(f"base_url={base_url!r}: give the server's URL, e.g. --base-url http://127.0.0.1:8000/v1")
        self.httpx = httpx
        root = base_url.rstrip("/")
        self.api = root if root.endswith("/v1") else root + "/v1"
        self.root = self.api[: -len("/v1")]
        self.served_model = model
        self.tokenizer = tokenizer
        self.options = options
        self.max_context = options.max_context
        self.index = TokenIndex(tokenizer)
        self.vocab_size = self.index.size
        # whether the server refuses token-id prompts: None until the first request tells
        self.ids_refused: bool | None = {"ids": False, "text": True}.get(options.prompt_format)
        # whether a round's prompts go in one request: None until a round of two or more nodes tells
        self.batching: bool | None = {"on": True, "off": False}.get(options.batch_prompts)
        self.requests = 0  # /v1/completions requests sent by every session, retries included
        self.nodes = 0  # nodes answered by every session
        self._tokenize_url: str | None | bool = None  # unknown until first needed; False: none
        self._loop: _Loop | None = None
        self._lock = threading.Lock()

    def open(self, prompts: Sequence[Prompt]) -> OpenAISession:
        return OpenAISession(self, prompts)

    @property
    def request_mode(self) -> str:
        """How rounds reach the server: "per-round" (one request, its nodes' token-id prompts
        as a list), "per-node" (one request per node), or "undecided" until a round of two or
        more nodes has gone out under ``batch_prompts="auto"``."""
        if self.ids_refused or self.batching is False:
            return "per-node"
        return "per-round" if self.batching else "undecided"

    def describe(self) -> str:
        """One line for logs and reports: the server, how rounds reach it, and what it was sent."""
        prompts = {None: "token ids unless refused", False: "token ids", True: "text"}[self.ids_refused]
        return (f"openai engine at {self.api}: {self.request_mode} requests (batch_prompts={self.options.batch_prompts}), "
                f"prompts as {prompts}, {self.requests} requests for {self.nodes} nodes")

    def __repr__(self) -> str:
        return f"<{self.describe()}>"

    def request_stats(self) -> dict[str, Any]:
        """For metrics: the request mode, requests sent (retries included) and nodes answered."""
        return {"mode": self.request_mode, "requests": self.requests, "nodes": self.nodes}

    def settle_batching(self, batching: bool, why: str) -> None:
        """Record what the first round of two or more nodes learned, and say so once."""
        if self.batching is None:
            self.batching = batching
            if batching:
                log.info("%s takes a round's token-id prompts in one request: one request per round", self.api)
            else:
                log.info("%s does not take a list of token-id prompts (%s): one request per node", self.api, why)

    def run(self, coro: Any) -> Any:
        return self._get_loop().run(coro)

    def submit(self, coro: Any) -> tuple[concurrent.futures.Future, threading.Event]:
        return self._get_loop().submit(coro)

    def _get_loop(self) -> _Loop:
        with self._lock:
            if self._loop is None:
                self._loop = _Loop()
            return self._loop

    def close(self) -> None:
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def headers(self) -> dict[str, str]:
        key = self.options.api_key or os.environ.get("OPENAI_API_KEY")
        return {"Authorization": f"Bearer {key}"} if key else {}


@dataclass
class SessionStats:
    """What a session could not see exactly: answers cut to the top k, and nodes whose text
    prompt the server would tokenize differently (left unexplored)."""

    truncated_answers: int = 0
    unverified_nodes: int = 0
    retries: int = 0
    retokenized_prompts: int = 0
    requests: int = 0  # /v1/completions requests sent, retries included
    rounds: int = 0


class OpenAISession:
    """The prompts of one run and the rounds asked about them.

    A round in flight stops when ``cancel()`` is called (from any thread), when the event given
    to ``stop_on`` is set, or at its deadline: its requests are cancelled, their connections
    closed (a server that watches its connections, as vLLM and llama-server do, then drops the
    work), and ``next_tokens`` raises ``RoundCancelled``.
    """

    def __init__(self, backend: OpenAIBackend, prompts: Sequence[Prompt]):
        check_prompts(prompts, backend.vocab_size)
        self.backend = backend
        self.prompts = [p.ids for p in prompts]
        self.usage = Usage()
        self.stats = SessionStats()
        self.bases: dict[int, tuple[int, ...]] = {}  # text mode: the ids the server reads per prompt
        self._stopped = threading.Event()
        self._stop_event: threading.Event | None = None
        self._deadline: float | None = None
        self._inflight: concurrent.futures.Future | None = None

    def add(self, prompts: Sequence[Prompt]) -> int:
        """More prompts between rounds (continuous batching); the index of the first."""
        check_prompts(prompts, self.backend.vocab_size)
        base = len(self.prompts)
        self.prompts += [p.ids for p in prompts]
        return base

    @property
    def truncated(self) -> bool:
        return self.stats.truncated_answers > 0 or self.stats.unverified_nodes > 0

    def stop_on(self, event: threading.Event | None = None, deadline: float | None = None) -> None:
        """Stop any round once ``event`` is set or at ``deadline`` (a ``time.monotonic()`` time)."""
        self._stop_event, self._deadline = event, deadline

    def cancel(self) -> None:
        """Stop the round in flight, if any, and every later one (thread-safe)."""
        self._stopped.set()
        inflight = self._inflight
        if inflight is not None:
            inflight.cancel()

    def _should_stop(self) -> bool:
        if self._stopped.is_set() or (self._stop_event is not None and self._stop_event.is_set()):
            return True
        return self._deadline is not None and time.monotonic() >= self._deadline

    def next_tokens(self, queries: Sequence[Query]) -> list[NextToken]:
        limit = self.backend.max_context
        for q in queries:
            if limit is not None and len(self.prompts[q.prompt]) + len(q.path) + 1 > limit:
                raise InputError(f"prompt + path of {len(self.prompts[q.prompt]) + len(q.path)} tokens is past the context of {limit}")
        answers = self._wait(self._round(queries))
        self.usage.model_calls += len(queries)
        self.usage.tokens += sum(len(q.path) for q in queries)
        self.stats.rounds += 1
        self.backend.nodes += len(queries)
        return answers

    def _wait(self, coro: Any) -> Any:
        """Run a round on the engine's loop until it ends or is stopped."""
        if self._should_stop():
            coro.close()
            raise RoundCancelled("this search was stopped; its session takes no more rounds")
        future, ended = self.backend.submit(coro)
        self._inflight = future
        try:
            while True:
                try:  # polled, so that a cancel() just before _inflight was set is seen too
                    return future.result(timeout=_POLL_S)
                except concurrent.futures.TimeoutError:
                    if self._should_stop():
                        break
                except concurrent.futures.CancelledError:
                    break
        finally:
            self._inflight = None
        self._stopped.set()
        future.cancel()
        ended.wait(_CLOSE_WAIT_S)  # the task's clean-up closes its connections
        raise RoundCancelled(f"a round of {self.backend.api} requests was stopped; its requests were cancelled")

    async def _round(self, queries: Sequence[Query]) -> list[NextToken]:
        b = self.backend
        semaphore = asyncio.Semaphore(b.options.concurrency)
        timeout = b.httpx.Timeout(b.options.timeout, connect=min(10.0, b.options.timeout))
        limits = b.httpx.Limits(max_connections=b.options.concurrency)
        async with b.httpx.AsyncClient(timeout=timeout, limits=limits, headers=b.headers()) as client:

            async def one(q: Query) -> NextToken:
                async with semaphore:
                    return await self._query(client, q)

            first = [await one(queries[0])] if b.ids_refused is None and queries else []  # learns the prompt form
            rest = queries[len(first):]
            if b.ids_refused:
                if b.options.batch_prompts == "on":
                    raise BackendError(f"{b.api} takes no token-id prompts, so a round cannot be one request; "
                                       "use batch_prompts='auto' or 'off' with this server")
                for p in sorted({q.prompt for q in rest}):
                    await self._base(client, p)
            elif len(rest) >= 2 and b.batching is not False:
                answers, why = await self._batched(client, rest)
                if answers is not None:
                    return first + answers
                per_node = list(await asyncio.gather(*(one(q) for q in rest)))
                b.settle_batching(False, why)  # only once the nodes alone answered: the list was the trouble
                return first + per_node
            return first + list(await asyncio.gather(*(one(q) for q in rest)))

    def _body(self) -> dict[str, Any]:
        b = self.backend
        body: dict[str, Any] = {"max_tokens": 1, "temperature": 0.0, "logprobs": b.options.top_logprobs, "echo": False}
        if b.served_model:
            body["model"] = b.served_model
        if b.options.token_ids:
            body["return_tokens_as_token_ids"] = True
        return body

    async def _batched(self, client: Any, queries: Sequence[Query]) -> tuple[list[NextToken] | None, str]:
        """The round as one request whose prompt is the list of its nodes' token ids. While the
        server's answer to that is unknown, a refusal or an answer of another shape returns
        (None, why) and the caller asks node by node."""
        b = self.backend
        body = self._body()
        body["prompt"] = [list(self.prompts[q.prompt] + q.path) for q in queries]
        probing = b.batching is None
        # the server works through the list as it would through `concurrency` requests at a time
        waves = -(-len(queries) // b.options.concurrency)
        timeout = b.httpx.Timeout(b.options.timeout * waves, connect=min(10.0, b.options.timeout))
        status, reply = await self._post(client, "/completions", body, allow_refusal=True, timeout=timeout, many=True)
        try:
            if status is None:
                raise BackendError(f"{b.api}/completions refused a list of token-id prompts ({reply['refused']})")
            tops = [_choice_top(c, b.api) for c in _choices(reply, len(queries), b.api)]
        except BackendError as exc:
            if probing:
                return None, str(exc)
            if b.options.batch_prompts != "on":
                raise
            raise BackendError(f"{exc}; with batch_prompts='on' every round is one request with a list of prompts: "
                               "use batch_prompts='auto' (one request per node where the server takes no list)") from None
        answers = []
        for q, top in zip(queries, tops):
            answer = read_top_logprobs(top, q.candidates, b.index)
            if answer.unreported > 0:
                self.stats.truncated_answers += 1
            answers.append(answer)
        b.settle_batching(True, "")
        return answers, ""

    async def _query(self, client: Any, q: Query) -> NextToken:
        b = self.backend
        body = self._body()
        reply = None
        if not b.ids_refused:
            body["prompt"] = list(self.prompts[q.prompt] + q.path)
            status, reply = await self._post(client, "/completions", body, allow_refusal=b.ids_refused is None)
            if status is None and await self._takes_ids(client, q.prompt):
                # the server takes token ids: it refused this request (past its context, say), not the form
                b.ids_refused = False
                raise BackendError(f"{b.api} refused the request: {reply['refused']}")
            b.ids_refused = status is None  # a refusal: the server wants text, from now on every request sends it
        if b.ids_refused:
            ids = list(await self._base(client, q.prompt) + q.path)
            text = b.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if q.path and not await self._same_tokens(client, text, ids):  # the bare prompt was checked in _base
                self.stats.unverified_nodes += 1  # the server would read another path: leave this node unexplored
                return NextToken(np.full(len(q.candidates), np.nan), math.nan, unreported=1.0)
            body["prompt"] = text
            _, reply = await self._post(client, "/completions", body)
        answer = read_top_logprobs(_top(reply, b.api), q.candidates, b.index)
        if answer.unreported > 0:
            self.stats.truncated_answers += 1
        return answer

    async def _takes_ids(self, client: Any, prompt: int) -> bool:
        """Whether the server takes a prompt of token ids at all: the first token of ``prompt``
        alone, asked once a request of ids was refused, tells a server that wants text from one
        that refused that request for another reason."""
        body = {**self._body(), "prompt": list(self.prompts[prompt][:1])}
        status, _ = await self._post(client, "/completions", body, allow_refusal=True)
        return status is not None

    async def _base(self, client: Any, prompt: int) -> tuple[int, ...]:
        """The ids the server reads for prompt ``prompt`` when it gets text (checked once)."""
        if prompt in self.bases:
            return self.bases[prompt]
        b = self.backend
        ids = list(self.prompts[prompt])
        text = b.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        got = await self._server_tokens(client, text) if b.options.verify != "local" else None
        if got is None:
            if b.options.verify == "server":
                raise BackendError(f"{b.root} has no tokenize endpoint (/tokenize or /extras/tokenize); use verify='local'")
            got = list(b.tokenizer(text, add_special_tokens=False)["input_ids"])
        if got != ids:
            at = next((i for i, (x, y) in enumerate(zip(ids, got)) if x != y), min(len(ids), len(got)))
            controls = control_ids(b.tokenizer)
            if Counter(t for t in got if t in controls) - Counter(t for t in ids if t in controls):
                # text_mismatch='allow' never lets the conversation's text become control tokens
                raise BackendError(
                    f"{b.api} takes prompts as text only and would read part of the conversation's text as control "
                    f"tokens (from token {at} on: {b.tokenizer.convert_ids_to_tokens(got[at:at + 3])}), which could "
                    "talk past the guard; use a server that takes token ids (llama-server, vLLM, SGLang)"
                )
            if b.options.text_mismatch != "allow":
                raise BackendError(
                    f"{b.api} takes prompts as text only, and its tokenizer reads this prompt differently from token "
                    f"{at} on ({b.tokenizer.convert_ids_to_tokens(ids[at:at + 3])} vs "
                    f"{b.tokenizer.convert_ids_to_tokens(got[at:at + 3])}), so it would score another prompt. Use a "
                    f"server that takes token ids (vLLM, SGLang), or the option text_mismatch='allow' to score the "
                    f"server's own tokenization"
                )
            self.stats.retokenized_prompts += 1
        self.bases[prompt] = tuple(got)
        return self.bases[prompt]

    async def _same_tokens(self, client: Any, text: str, ids: list[int]) -> bool:
        """Whether the server (or else the local tokenizer) turns ``text`` back into ``ids``."""
        b = self.backend
        if b.options.verify != "local":
            got = await self._server_tokens(client, text)
            if got is not None:
                return bool(got == ids)
            if b.options.verify == "server":
                raise BackendError(f"{b.root} has no tokenize endpoint (/tokenize or /extras/tokenize); use verify='local'")
        return list(b.tokenizer(text, add_special_tokens=False)["input_ids"]) == ids

    async def _server_tokens(self, client: Any, text: str) -> list[int] | None:
        b = self.backend
        candidates = [b._tokenize_url] if isinstance(b._tokenize_url, str) else [] if b._tokenize_url is False else [
            b.root + "/extras/tokenize", b.root + "/tokenize"]
        for url in candidates:
            body = {"input": text} if url.endswith("/extras/tokenize") else {"prompt": text, "add_special_tokens": True}
            if b.served_model:
                body["model"] = b.served_model
            status, reply = await self._post(client, url, body, allow_refusal=True, absolute=True)
            if status is None:
                continue
            b._tokenize_url = url
            tokens = reply.get("tokens")
            if not isinstance(tokens, list):
                raise BackendError(f"{url} answered without a token list")
            return [int(t) for t in tokens]
        b._tokenize_url = False
        return None

    async def _post(self, client: Any, path: str, body: dict, allow_refusal: bool = False,
                    absolute: bool = False, timeout: Any = None, many: bool = False) -> tuple[int | None, Any]:
        """POST with retries on 429/5xx, timeouts and dropped connections (exponential backoff).

        With allow_refusal, a 400/404/405/422 answer returns (None, {"refused": what it said})
        instead of raising.
        ``many``: a JSON array is an answer too (llama-server's to a list of prompts).
        """
        b = self.backend
        url = path if absolute else b.api + path
        httpx = b.httpx
        last = ""
        for attempt in range(b.options.retries + 1):
            if attempt:
                self.stats.retries += 1
                await asyncio.sleep(b.options.backoff * 2 ** (attempt - 1))
            if path == "/completions":
                self.stats.requests += 1
                b.requests += 1
            try:
                if timeout is None:
                    response = await client.post(url, json=body)
                else:
                    response = await client.post(url, json=body, timeout=timeout)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            if allow_refusal and _refused(response):
                return None, {"refused": f"HTTP {response.status_code}: {response.text[:300]}"}
            if response.status_code in _RETRY_STATUS:
                last = f"HTTP {response.status_code}: {response.text[:200]}"
                continue
            if response.status_code >= 400:
                raise BackendError(
                    f"{url} answered HTTP {response.status_code}: {response.text[:300]}. Check --base-url, "
                    f"--served-model and that the server serves completions with logprobs"
                )
            try:
                reply = response.json()
            except ValueError:
                last = f"a reply that is not JSON: {response.text[:120]!r}"
                continue
            if not (isinstance(reply, dict) or many and isinstance(reply, list)):
                last = f"a reply that is not a JSON object: {str(reply)[:120]}"
                continue
            return response.status_code, reply
        raise BackendError(
            f"{url} failed after {b.options.retries + 1} attempts ({last}). Is the server running and reachable? "
            f"Start it (e.g. `vllm serve MODEL --enable-prefix-caching`) or raise the timeout/retries options"
        )

    def close(self) -> None:
        """Drop the prompts; a round still in flight (closed from another thread) is cancelled."""
        if self._inflight is not None:
            self.cancel()
        self.prompts = []


def _refused(response: Any) -> bool:
    """A server that does not take this request's form (ids as prompt, or no such endpoint).
    llama-cpp-python answers a request that fails validation with HTTP 500, so look inside."""
    if response.status_code in (400, 404, 405, 422):
        return True
    return response.status_code == 500 and "validation error" in response.text and "prompt" in response.text


def _top(reply: dict, url: str) -> TopEntries:
    """The first generated token's top log-probabilities of a one-prompt reply (see ``_choice_top``)."""
    try:
        choice = reply["choices"][0]
    except (KeyError, IndexError, TypeError):
        choice = None
    return _choice_top(choice, url)


def _choice_top(choice: Any, url: str) -> TopEntries:
    """A choice's first generated token's top log-probabilities, in either form a completions
    reply may use: ``logprobs.top_logprobs[0]`` (a string -> log-probability object: the OpenAI
    completions API, vLLM, SGLang, llama-cpp-python) or ``logprobs.content[0].top_logprobs``
    (a list of objects with ``token``, ``logprob`` and, from llama.cpp's own server, the
    token's ``id``, which is taken over its string)."""
    try:
        logprobs = choice["logprobs"]
        if isinstance(logprobs, dict) and "content" in logprobs:
            return [(_entry_key(e), e.get("logprob")) for e in logprobs["content"][0]["top_logprobs"]]
        top = logprobs["top_logprobs"][0]
    except (KeyError, IndexError, TypeError, AttributeError):
        raise BackendError(
            f"{url}/completions answered without choices[0].logprobs.top_logprobs; the server must support "
            f"'logprobs' on completions (llama-cpp-python: logits_all, the default in its server)"
        ) from None
    if not isinstance(top, dict):
        raise BackendError(f"{url}/completions answered top_logprobs of type {type(top).__name__}, expected an object")
    return top


def _choices(reply: Any, n: int, url: str) -> list[Any]:
    """The choices of a reply to ``n`` prompts sent as a list, in the order of the prompts.

    vLLM, SGLang and today's llama-server answer one object whose ``choices`` hold one choice
    per prompt; llama-server's earlier versions answered a JSON array of completion objects, one
    per prompt. Each choice's
    ``index`` is its prompt's place in the list (with one completion per prompt); choices
    without indices are taken in the order given. Any other count or set of indices is an error.
    """
    parts = reply if isinstance(reply, list) else [reply]
    try:
        choices = [c for part in parts for c in part["choices"]]
    except (KeyError, TypeError):
        raise BackendError(f"{url}/completions answered a list of prompts without choices: {str(reply)[:200]}") from None
    if len(choices) != n:
        raise BackendError(f"{url}/completions answered {len(choices)} choices for {n} prompts")
    indices = [c.get("index") if isinstance(c, dict) else None for c in choices]
    if all(i is None for i in indices):
        return choices
    if sorted(i for i in indices if isinstance(i, int) and not isinstance(i, bool)) != list(range(n)):
        raise BackendError(f"{url}/completions answered choices with indices {indices[:10]} for {n} prompts")
    ordered: list[Any] = [None] * n
    for i, c in zip(indices, choices):
        ordered[i] = c
    return ordered


def _entry_key(entry: dict) -> str | int:
    token_id = entry.get("id")
    if isinstance(token_id, int) and not isinstance(token_id, bool):
        return token_id
    token = entry["token"]
    if not isinstance(token, str):
        raise TypeError(token)
    return token
