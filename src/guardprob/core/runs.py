"""Batched scoring that a scheduler advances one model call at a time: a classifier's run
(``ScoringRun``), and runs that share one search and every call (``ScoringPool``, continuous
batching)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from guardprob.core.decision import DecisionRule
from guardprob.core.estimators import combine, estimate
from guardprob.core.grammar import TokenGrammar
from guardprob.core.prior import TreePrior
from guardprob.core.reasoning import GREEDY_TRACE, Trace, TraceConfig, TraceWriter, mean_scores, merge_questions
from guardprob.core.search import SearchRun
from guardprob.core.tree import SearchConfig, Tree
from guardprob.errors import InputError
from guardprob.result import Scores
from guardprob.taxonomy import Taxonomy

if TYPE_CHECKING:
    from guardprob.backends.base import Prompt


class Scorer(Protocol):
    """What runs and pools read of the classifier that opens them (``Classifier`` is one)."""

    taxonomy: Taxonomy
    backend: Any

    @property
    def joinable(self) -> bool: ...

    def asked(self, category: str) -> Taxonomy: ...

    def start(self, prompts: Sequence[Prompt], methods: Sequence[str] = ..., **kwargs: Any) -> ScoringRun: ...


class ScoringRun:
    """A classifier's batched search that a scheduler advances one model call at a time; or a
    request's share of a pool's search (``ScoringPool``: the pool steps, the run only reads)."""

    def __init__(
        self, classifier: Scorer, run: SearchRun, ids: Sequence[int], *, base: int, methods: tuple[str, ...],
        groups: dict, seconds: float, owners: list[tuple[int, str | None]], traces: list[Trace] | None = None,
        trace: TraceConfig = GREEDY_TRACE, reasoning_calls: int = 0, decision: DecisionRule | None = None,
        pool: ScoringPool | None = None,
    ):
        """``run``'s searches ``ids`` (of the prompts from ``base`` on, ``owners``: whose each
        search is) scored by ``methods``; the rest by name, as the classifier opens it."""
        self._classifier, self._run, self.methods, self._groups = classifier, run, methods, groups
        self._ids = list(ids)  # its searches in the run
        # each search's prompt (counted from this run's first) and the tokens its tree starts after
        self._roots = [(run.roots[i][0] - base, run.roots[i][1]) for i in self._ids]
        self._pool = pool
        self._trees: list[Tree] | None = None  # kept when it leaves a pool's search
        self._decision = decision  # the thresholds the marginal's search decided (decide=True)
        self._seconds = seconds  # model time so far: the prefill (and reasoning), then each step
        self._owners = owners  # each search's prompt, and the category its question asks about
        # a format that reasons first: each search's trace (searches of one question are consecutive)
        self._traces, self._trace, self._reasoning_calls = traces, trace, reasoning_calls
        self._base = base
        self._writer: TraceWriter | None = None  # the reasoning, while it is written
        self._plan: SearchPlan | None = None  # the searches to start after each trace once it is
        self._stopped: set[int] = set()  # prompts stopped (a deadline) while their reasoning was written

    def reason(self, writer: TraceWriter, plan: SearchPlan) -> None:
        """Write the reasoning in the run's calls first; then search the verdict after each trace."""
        self._writer, self._plan = writer, plan
        self._run.ride(_Reasoning(self, writer))

    def _written(self) -> None:
        """The reasoning is written: the verdict searches join the run, one after each trace."""
        writer, plan = self._writer, self._plan
        if writer is None or plan is None:
            return
        self._writer = self._plan = None
        written = writer.traces
        roots = [(p, suffix + t.tokens) for (p, suffix), ts in zip(plan.roots, written) for t in ts]
        grammars = [g for g, ts in zip(plan.grammars, written) for _ in ts]
        self._owners = [o for o, ts in zip(plan.owners, written) for _ in ts]
        self._traces = [t for ts in written for t in ts]
        self._reasoning_calls = writer.calls
        goals = None if self._decision is None else [
            self._decision.goal(g, self._groups, plan.config.constrained) for g in grammars]
        self._ids = self._run.attach(self._base, 0, grammars, plan.config, plan.prior, roots, goals)
        self._roots = [(self._run.roots[i][0] - self._base, self._run.roots[i][1]) for i in self._ids]
        for prompt in self._stopped:
            self.stop(prompt)

    def step(self) -> bool:
        """One model call for every unfinished prompt; False once all are done."""
        if self._pool is not None:
            raise InputError("this run is part of a pool, whose step() serves all of its runs; call pool.step()")
        started = time.perf_counter()
        try:
            return self._run.step()
        finally:
            self._seconds += time.perf_counter() - started

    @property
    def done(self) -> bool:
        """True once every search of this run is over (its reasoning written first)."""
        return self._trees is not None or (self._writer is None and self._run.done(self._ids))

    def stop(self, prompt: int) -> None:
        """End prompt ``prompt``'s search after this call, with the bounds reached (incomplete);
        reasoning still being written ends where it is, and its verdict is not searched."""
        if self._writer is not None and self._plan is not None:
            self._stopped.add(prompt)
            self._writer.stop({s for s, (owner, _) in enumerate(self._plan.owners) if owner == prompt})
            if self._writer.done:
                self._written()
            return
        for i, (owner, _) in zip(self._ids, self._owners):
            if owner == prompt:
                self._run.stop(i)

    def stop_all(self) -> None:
        for prompt in {owner for owner, _ in (self._plan.owners if self._plan is not None else self._owners)}:
            self.stop(prompt)

    def finish(self) -> ScoringRun:
        """Step until every search is done, then close."""
        try:
            if self._pool is not None:
                while not self.done and self._pool.step():
                    pass
            else:
                while self.step():
                    pass
        finally:
            self.close()
        return self

    def close(self) -> None:
        """Free what the run holds (in a pool: leave it; unfinished searches stop there)."""
        if self._writer is not None:
            self.stop_all()
        if self._pool is None:
            self._run.close()
        elif self._trees is None:
            self._trees = self._run.forget(self._ids)
            self._pool.members.remove(self)

    def _tree_list(self) -> list[Tree]:
        return self._trees if self._trees is not None else self._run.trees(self._ids)

    def trees(self) -> list[tuple[int, tuple[int, ...], Tree]]:
        """Each search's prompt, the tokens its tree starts after, and its tree."""
        return [(p, offset, t) for (p, offset), t in zip(self._roots, self._tree_list())]

    def stop_on(self, event: Any = None, deadline: float | None = None) -> None:
        """Let the engine stop a model call in flight once ``event`` (a threading.Event) is set or
        at ``deadline`` (a ``time.monotonic()`` time), where it can (the openai engine's HTTP
        rounds); that call then raises ``RoundCancelled``. Elsewhere a stop waits for the call, and
        so does a run in a pool, whose calls serve other runs too."""
        if self._pool is not None:
            return
        stop_on = getattr(self._run.session, "stop_on", None)
        if stop_on is not None and (event is not None or deadline is not None):
            stop_on(event, deadline)

    def results(self) -> list[dict[str, Scores]]:
        """A dict of Scores by method per prompt (the run must be done)."""
        clf = self._classifier
        trees = self._tree_list()
        prompts = 1 + max((p for p, _ in self._owners), default=-1)
        seconds = self._seconds / max(prompts, 1)
        traces = self._traces or [None] * len(trees)
        asked: list[dict[str | None, list]] = [{} for _ in range(prompts)]
        for (prompt, category), tree, trace in zip(self._owners, trees, traces):
            asked[prompt].setdefault(category, []).append((tree, trace))
        out = []
        for per in asked:
            scored = {c: {m: self._scores(searched, m, None if c is None else clf.asked(c), seconds)
                          for m in self.methods} for c, searched in per.items()}
            if None in scored:
                out.append(scored[None])
            else:
                out.append({m: merge_questions({c: s[m] for c, s in scored.items()}, combine(
                    {c: s[m] for c, s in scored.items()}, clf.taxonomy)) for m in self.methods})
        if self._decision is not None:
            for per_method in out:
                per_method["marginal"] = replace(per_method["marginal"],
                                                 decision=self._decision.judge(per_method["marginal"]))
        return out

    def _scores(self, searched: list[tuple[Tree, Trace | None]], method: str, asked: Taxonomy | None,
                seconds: float) -> Scores:
        """One question's (or the whole verdict's) Scores: from its tree, or the mean over the
        trees after each trace of the reasoning."""
        per = [estimate(tree, method, asked or self._classifier.taxonomy, seconds, None if asked else self._groups)
               for tree, _ in searched]
        if self._traces is None:
            return per[0]
        return mean_scores(per, [t for _, t in searched], self._trace, self._reasoning_calls)


@dataclass(frozen=True)
class SearchPlan:
    """The verdict searches a run starts once its reasoning is written: each root's prompt and
    the tokens after it, grammar and owner (prompt, asked category)."""

    roots: list[tuple[int, tuple[int, ...]]]
    grammars: list[TokenGrammar]
    owners: list[tuple[int, str | None]]
    config: SearchConfig
    prior: TreePrior


class _Reasoning:
    """A run's reasoning as a rider of its search's calls (SearchRun.ride)."""

    def __init__(self, scoring: ScoringRun, writer: TraceWriter):
        self._scoring, self._writer = scoring, writer

    @property
    def done(self) -> bool:
        return self._writer.done

    def queries(self) -> list:
        return self._writer.queries()

    def feed(self, answers: Sequence) -> None:
        self._writer.feed(answers)
        if self._writer.done:
            self._scoring._written()


class ScoringPool:
    """Continuous batching: scoring runs that share one engine session and every model call.

    ``join(prompts, methods, **start_kwargs)`` adds a request's prompts between calls (their
    prefill runs then) and returns its ScoringRun; ``step()`` runs one model call for every
    unfinished search of every run, rationed by ``round_nodes`` fairly across runs (SearchRun);
    a run is read once ``run.done`` and then ``close()``d, which takes its searches out. The
    engine must be joinable (``Classifier.joinable``). Not thread-safe: one scheduler drives it.
    """

    def __init__(self, classifier: Scorer, round_nodes: int | None = None):
        if not classifier.joinable:
            raise InputError(f"the {getattr(classifier.backend, 'name', 'engine')} engine's sessions take no prompts once "
                             "open, so runs cannot join one search; use Classifier.start per run")
        self._classifier = classifier
        self.round_nodes = round_nodes
        self._run: SearchRun | None = None
        self._closed = False
        self.members: list[ScoringRun] = []  # the runs joined and not yet closed

    def join(self, prompts: Sequence[Prompt], methods: Sequence[str] = ("marginal",), **start_kwargs: Any) -> ScoringRun:
        """A request's prompts, searched from the next call on (``start_kwargs``: ``Classifier.start``'s)."""
        if self._closed:
            raise InputError("this pool is closed; open a new one")
        return self._classifier.start(prompts, methods, pool=self, **start_kwargs)

    @property
    def running(self) -> SearchRun | None:
        """The search every joined run shares (None until the first run opens it)."""
        return self._run

    def admit(self, scoring: ScoringRun, opened: SearchRun | None = None) -> None:
        """Count a run the classifier opened on this pool; ``opened``: the search it started,
        which the pool's later runs join."""
        if opened is not None:
            self._run = opened
        self.members.append(scoring)

    def step(self) -> bool:
        """One model call for every unfinished search of every run; False when none has work."""
        if self._run is None:
            return False
        live = [m for m in self.members if not m.done]
        started = time.perf_counter()
        more = self._run.step()
        took = time.perf_counter() - started
        for m in live:
            m._seconds += took
        return more

    def close(self) -> None:
        """Free the engine's session; runs not closed yet keep the trees they reached."""
        self._closed = True
        for m in list(self.members):
            m.close()
        if self._run is not None:
            self._run.close()
