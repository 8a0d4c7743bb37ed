"""Reasoning before the verdict: free text the model writes first, then a verdict it can be scored on.

Some guards think before they answer (Granite Guardian 3.3's ``<think>...</think>`` then
``<score> yes </score>``; any chat model asked to reason first). The reasoning cannot be
enumerated; the verdict after it can. guardprob writes the reasoning through the engine's own
session, one model call per token for every trace at once, over the same key/value cache the
verdict search then reads (no second prefill, no ``generate()``), and searches the verdict's
tree after each trace exactly:

- by default, one greedy trace: the scores are exact *given the greedy reasoning*;
- with ``traces=N``, N traces sampled from the model (temperature 1 by default, so each trace is
  as likely as the model makes it): the scores are the mean over traces of the exact scores
  given each one, an unbiased estimate of the model's probability with its reasoning
  marginalised, reported with its standard error. The bounds are the means of the bounds, so
  they hold for the mean over these traces.

End-of-sequence tokens are not written inside the reasoning (the verdict must follow it). A
trace that reaches ``max_tokens`` without writing the closing text gets it appended and is
counted as cut. Where the token that completes the closing text runs past it (``</think>\\n``),
that token is spelled again up to the closing text, so every tree starts right after it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from guardprob.backends.base import NextToken, Query, Session
from guardprob.errors import InputError
from guardprob.options.table import TRACE, group
from guardprob.result import CategoryScore, ReasoningSummary, Scores


@dataclass(frozen=True)
class Reasoning:
    """How a format's model reasons before its verdict: the text that closes the reasoning
    (``</think>``) and the most tokens a trace may take before it is closed for the model."""

    close: str
    max_tokens: int = 512


TRACE_OPTIONS = group(TRACE)
_DEFAULT = {o.attr: o.default for o in TRACE_OPTIONS}


@dataclass(frozen=True)
class TraceConfig:
    """How to write the reasoning: ``traces`` 0 (the greedy trace) or N sampled traces at
    ``temperature``, drawn with ``seed``; ``max_tokens`` overrides the format's budget."""

    # defaults and ranges: guardprob.options.table
    traces: int = _DEFAULT["traces"]
    temperature: float = _DEFAULT["temperature"]
    seed: int | None = _DEFAULT["seed"]
    max_tokens: int | None = _DEFAULT["max_tokens"]

    def __post_init__(self) -> None:
        for option in TRACE_OPTIONS:  # the table's range checks (guardprob.options.table)
            option.check(getattr(self, option.attr))

    @property
    def sampled(self) -> bool:
        return self.traces > 0

    @classmethod
    def pop(cls, params: dict) -> TraceConfig:
        """The trace settings among scoring keyword arguments (removed from ``params``); one not
        given, or given as None, takes the table's default."""
        given = {o.attr: params.pop(o.name) for o in TRACE_OPTIONS if o.name in params}
        return cls(**{k: v for k, v in given.items() if v is not None})


GREEDY_TRACE = TraceConfig()


@dataclass(frozen=True)
class Trace:
    """One written reasoning: the tokens after its start, the closing text included; how many of
    them the model chose; whether it was cut at the budget; its text."""

    tokens: tuple[int, ...]
    written: int
    cut: bool
    text: str


@dataclass
class _Writing:
    start: int  # which start (prompt, suffix) it follows
    tokens: list[int]
    text: str = ""


class TraceWriter:
    """Writes the reasoning after each start (a prompt and the tokens after it), a token per
    model call for every trace at once: the greedy trace, or ``config.traces`` sampled ones.
    A driver asks ``queries()``, runs them (alone, or in a call shared with verdict searches)
    and hands the answers to ``feed``; ``stop()`` ends every unfinished trace where it is (a
    deadline), closed as if its budget ran out. ``traces``: each start's, once ``done``.

    piece: a token's text; spell: text as tokens (the closing text, a token spelled again)."""

    def __init__(
        self, starts: Sequence[tuple[int, tuple[int, ...]]], reasoning: Reasoning, config: TraceConfig,
        piece: Callable[[int], str], spell: Callable[[str], tuple[int, ...]], end_ids: Sequence[int], vocab_size: int,
    ):
        self._starts, self._reasoning, self._config = list(starts), reasoning, config
        self._piece, self._spell = piece, spell
        self._rng = np.random.default_rng(config.seed)
        self._budget = config.max_tokens or reasoning.max_tokens
        self._candidates = np.arange(vocab_size, dtype=np.int64)
        self._allowed = np.ones(vocab_size, dtype=bool)
        self._allowed[[i for i in end_ids if 0 <= i < vocab_size]] = False
        per_start = max(config.traces, 1)
        self.traces: list[list[Trace]] = [[] for _ in self._starts]
        self._active = [_Writing(s, []) for s in range(len(self._starts)) for _ in range(per_start)]
        self.calls = 0

    @property
    def done(self) -> bool:
        return not self._active

    def queries(self) -> list[Query]:
        """The next token of every unfinished trace."""
        starts = self._starts
        return [Query(starts[w.start][0], starts[w.start][1] + tuple(w.tokens), self._candidates) for w in self._active]

    def feed(self, answers: Sequence[NextToken]) -> None:
        """The answers to ``queries()``, in order."""
        self.calls += 1
        close = self._reasoning.close
        still = []
        for w, answer in zip(self._active, answers):
            token = _choose(np.asarray(answer.logprobs, dtype=np.float64), self._allowed, self._config, self._rng)
            before = w.text
            w.text += self._piece(token)
            end = _closed(w.text, before, close)
            if end is not None:
                spelled = self._spell(w.text[len(before):end]) if end < len(w.text) else (token,)
                self.traces[w.start].append(Trace((*w.tokens, *spelled), len(w.tokens) + 1, False, w.text[:end]))
            elif len(w.tokens) + 1 >= self._budget:
                w.tokens.append(token)
                self._cut(w)
            else:
                w.tokens.append(token)
                still.append(w)
        self._active = still

    def stop(self, starts: Collection[int] | None = None) -> None:
        """End the unfinished traces of ``starts`` (default: all) now, closed where they are
        (cut, like a spent budget)."""
        ending = [w for w in self._active if starts is None or w.start in starts]
        for w in ending:
            self._cut(w)
        self._active = [w for w in self._active if w not in ending]

    def _cut(self, w: _Writing) -> None:
        close = self._reasoning.close
        self.traces[w.start].append(Trace((*w.tokens, *self._spell(close)), len(w.tokens), True, w.text + close))


def write_traces(
    session: Session, starts: Sequence[tuple[int, tuple[int, ...]]], reasoning: Reasoning, config: TraceConfig,
    piece: Callable[[int], str], spell: Callable[[str], tuple[int, ...]], end_ids: Sequence[int], vocab_size: int,
) -> tuple[list[list[Trace]], int]:
    """Write the reasoning after each start on ``session`` alone (see TraceWriter); each
    start's traces and the model calls taken."""
    writer = TraceWriter(starts, reasoning, config, piece, spell, end_ids, vocab_size)
    while not writer.done:
        writer.feed(session.next_tokens(writer.queries()))
    return writer.traces, writer.calls


def _choose(logprobs: np.ndarray, allowed: np.ndarray, config: TraceConfig, rng: np.random.Generator) -> int:
    """The greedy token, or one drawn at the temperature, among the allowed tokens the engine reported."""
    usable = allowed & ~np.isnan(logprobs)
    if not usable.any():
        raise InputError("the engine reported no token the reasoning may continue with; use an engine that reports "
                         "the whole distribution (transformers, llamacpp) or more top log-probabilities")
    scores = np.where(usable, logprobs, -np.inf)
    if not config.sampled:
        return int(np.argmax(scores))
    scaled = scores / config.temperature
    top = scaled.max()
    if not math.isfinite(top):  # every usable token underflowed: the limit of equal log-probabilities
        weights = usable.astype(np.float64)
    else:
        weights = np.exp(scaled - top)
    return int(rng.choice(len(weights), p=weights / weights.sum()))


def _closed(text: str, before: str, close: str) -> int | None:
    """Where the closing text ends, if the newest token completed it."""
    at = text.find(close, max(0, len(before) - len(close) + 1))
    return None if at < 0 else at + len(close)


def mean_scores(per_trace: Sequence[Scores], traces: Sequence[Trace], config: TraceConfig, calls: int) -> Scores:
    """One conversation's Scores from the exact Scores given each trace: their mean, the bounds'
    means (so they bound the mean over these traces), and what the reasoning was."""
    first = per_trace[0]
    n = len(per_trace)

    def mean(values: Sequence[float]) -> float:
        return float(sum(values) / n)

    def scores(get: Callable[[Scores], Mapping[str, CategoryScore]]) -> dict[str, CategoryScore]:
        return {k: CategoryScore(c.id, c.name, mean([get(s)[k].p for s in per_trace]),
                                 mean([get(s)[k].lower for s in per_trace]), mean([get(s)[k].upper for s in per_trace]))
                for k, c in get(first).items()}

    stderr: dict[str, float] = {}
    if n > 1:
        series = {"p_unsafe": [s.p_unsafe for s in per_trace]}
        for key in ("categories", "fields", "groups"):
            for k in getattr(first, key):
                series[k] = [getattr(s, key)[k].p for s in per_trace]
        stderr = {k: float(np.std(v, ddof=1) / math.sqrt(n)) for k, v in series.items()}
    verdicts = [s.verdict for s in per_trace]
    typical = per_trace[verdicts.index(Counter(verdicts).most_common(1)[0][0])]  # the most common verdict
    summary = ReasoningSummary(
        "sampled" if config.sampled else "greedy", n, config.temperature if config.sampled else None,
        mean([t.written for t in traces]), sum(t.cut for t in traces), stderr, tuple(t.text for t in traces))
    return replace(
        first,
        p_unsafe=mean([s.p_unsafe for s in per_trace]),
        p_unsafe_lower=mean([s.p_unsafe_lower for s in per_trace]),
        p_unsafe_upper=mean([s.p_unsafe_upper for s in per_trace]),
        categories=scores(lambda s: s.categories),
        fields=scores(lambda s: s.fields),
        groups=scores(lambda s: s.groups),
        verdict=typical.verdict,
        verdict_categories=typical.verdict_categories,
        verdict_unsafe=typical.verdict_unsafe,
        unexplored_mass=mean([s.unexplored_mass for s in per_trace]),
        invalid_mass=mean([s.invalid_mass for s in per_trace]),
        expanded_nodes=sum(s.expanded_nodes for s in per_trace),
        model_calls=max(s.model_calls for s in per_trace) + calls,
        truncated=any(s.truncated for s in per_trace),
        complete=all(s.complete for s in per_trace),
        reasoning=summary,
    )


def merge_questions(asked: Mapping[str, Scores], combined: Scores) -> Scores:
    """A per-category format's combined Scores, with what the reasoning of every question was
    (each question reasons on its own): P(unsafe)'s standard error is its largest category's."""
    summaries = [s.reasoning for s in asked.values() if s.reasoning is not None]
    if not summaries:
        return combined
    first = summaries[0]
    stderr = {c: s.reasoning.stderr[c] for c, s in asked.items() if s.reasoning is not None and c in s.reasoning.stderr}
    if stderr:
        top = max(asked, key=lambda c: asked[c].categories[c].p)
        stderr = {"p_unsafe": stderr[top], **stderr}
    traces = sum(s.traces for s in summaries)
    return replace(combined, reasoning=ReasoningSummary(
        first.mode, first.traces, first.temperature, sum(s.tokens * s.traces for s in summaries) / traces,
        sum(s.cut for s in summaries), stderr, tuple(t for s in summaries for t in s.texts)))
