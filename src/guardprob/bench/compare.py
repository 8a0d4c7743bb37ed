"""``guardprob bench``: the real engine against the per-node baseline and the floor.

The engines run the same search (model, prompts, eps, top_p, method) per example:

- ``naive``: backends/naive.py, one full forward over prompt + path per node (no cache, no
  speculation);
- ``guardprob``: the transformers engine (prefill once, tree attention per round);
- ``floor``: one prefill of the example's own tokens (the shared prefix comes from the
  process cache, as in guardprob) plus one tree-attention pass over exactly the nodes the
  guardprob search expanded, logits included, in a single call (children it asked ahead
  and then dropped are not counted). No engine can need less;
- ``separate`` (formats that ask one question per category, such as ShieldGemma): each
  question as a prompt of its own, the K prompts in one batched search, against the K
  questions after one shared conversation that guardprob asks (the engine's own sharing
  within a batch is off there, so each prompt runs its conversation, as the family's code
  would);
- ``turns``: a conversation of ``turns`` messages (user and assistant in turn) moderated
  after every message, with the engine's prefix cache and without it, against scoring the
  final conversation once; prefill tokens, prefill and scoring time, and whether the
  scores agree.

Every measurement but ``turns`` starts from a prefix cache that holds only the format's
shared prefixes, so no example reuses another's tokens (as before the cache existed).

It checks that naive and guardprob agree, measures peak resident memory per example and
per batch, and compares a batch of ``--batch`` prompts searched together with one at a time.
``benchmarks/bench.py`` is a thin wrapper; docs/performance.md shows results.
"""

from __future__ import annotations

import copy
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from guardprob.backends.base import Backend, Prompt, Query, Session, Usage, common_prefix
from guardprob.core.prior import TreePrior
from guardprob.core.reasoning import GREEDY_TRACE, TraceConfig
from guardprob.errors import InputError
from guardprob.inputs.conversation import read_conversations

ENGINES = ("naive", "guardprob", "floor", "separate", "turns")  # separate: per-category formats only
AGREE = 1e-4  # naive vs guardprob, per category, in float32


# -- results --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One engine on one example (or one batch)."""

    engine: str
    example: int  # -1 for a batch
    nodes: int  # model-evaluated nodes
    calls: int  # model calls, prefill included
    tokens: int  # tokens run through the model, prompt tokens included
    seconds: float
    peak_rss_mb: float  # peak resident memory above what the process held before the run
    scores: dict[str, float] = field(default_factory=dict)  # category -> p
    prefill_tokens: int = 0  # prompt tokens run through the model (not read from the prefix cache)
    prefill_seconds: float = 0.0  # time spent opening sessions: the prefill, cache copies included


@dataclass(frozen=True)
class Report:
    settings: dict[str, Any]
    runs: tuple[Run, ...]
    summary: dict[str, Any]

    def as_dict(self) -> dict:
        return {"settings": self.settings, "runs": [asdict(r) for r in self.runs], "summary": self.summary}


# -- measuring ------------------------------------------------------------------------------
class PeakRSS:
    """Peak resident set size during a block, above the level at its start (sampled every 2 ms).

    ``ru_maxrss`` is a process-lifetime maximum, so it cannot tell one example from the next;
    psutil (if installed) or /proc gives the current RSS to sample.
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self._start = _rss_mb()
        self._peak = self._start
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self._peak, _rss_mb()) - self._start


def _rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Recorder:
    """A backend wrapper that keeps each session's usage and queries, for counting."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.name = backend.name
        self.max_context = backend.max_context
        self.tree_calls = getattr(backend, "tree_calls", False)
        self.sessions: list[_RecordingSession] = []
        self.open_seconds = 0.0

    def open(self, prompts: Sequence[Prompt]) -> Session:
        started = time.perf_counter()
        session = _RecordingSession(self.backend.open(prompts))
        self.open_seconds += time.perf_counter() - started
        self.sessions.append(session)
        return session

    @property
    def prefill_tokens(self) -> int:
        return sum(s.usage.prompt_tokens for s in self.sessions)

    @property
    def usage(self) -> Usage:
        total = Usage()
        for s in self.sessions:
            total.model_calls += s.usage.model_calls
            total.tokens += s.usage.tokens + s.usage.prompt_tokens
        return total

    def queries(self) -> list[Query]:
        return [q for s in self.sessions for q in s.queries]


class _RecordingSession:
    def __init__(self, inner: Session):
        self.inner = inner
        self.usage = inner.usage
        self.queries: list[Query] = []
        if hasattr(inner, "release"):
            self.release = inner.release  # keep the engine's memory release visible to the search

    def next_tokens(self, queries: Sequence[Query]) -> list:
        self.queries.extend(queries)
        return self.inner.next_tokens(queries)

    def close(self) -> None:
        self.inner.close()


# -- the engines ----------------------------------------------------------------------------
def run_search(
    clf: Any, backend: Backend, prompts: list[Prompt], config: Any, method: str, engine: str, example: int,
    prior: TreePrior | None = None, trace: TraceConfig = GREEDY_TRACE,
) -> tuple[Run, list[Query]]:
    """One search of ``prompts`` together on ``backend`` (guessing from ``prior``, which learns
    from it): its cost, each prompt's scores, and the queries whose answers the search used
    (not those asked ahead and dropped)."""
    recorder = Recorder(backend)
    with PeakRSS() as rss:
        started = time.perf_counter()
        run = clf.open(prompts, config, (method,), backend=recorder, prior=TreePrior() if prior is None else prior,
                       trace=trace).finish()
        seconds = time.perf_counter() - started
    usage = recorder.usage
    trees = run.trees()
    nodes = sum(t.expanded_nodes for _, _, t in trees)
    scores = {}
    if len(prompts) == 1:
        scores = {k: c.p for k, c in run.results()[0][method].categories.items()}
    expanded: list[set] = [set() for _ in prompts]
    for prompt, offset, tree in trees:
        expanded[prompt] |= {offset + path for path in expanded_paths(tree.root)}
    used = [q for q in recorder.queries() if q.path in expanded[q.prompt]]
    run = Run(engine, example, nodes, usage.model_calls, usage.tokens, seconds, rss.peak_mb, scores,
              recorder.prefill_tokens, recorder.open_seconds)
    return run, used


def run_separate(clf: Any, backend: Backend, prompt: Prompt, config: Any, method: str, example: int,
                 trace: TraceConfig = GREEDY_TRACE) -> Run:
    """A per-category format's questions asked as prompts of their own (each the whole text
    up to its verdict), in one batched search: what the questions after one shared
    conversation save."""
    alone = [Prompt(prompt.ids + suffix, prompt.shared_prefix, prompt.role, ((category, ()),))
             for category, suffix in prompt.questions]
    unshared = copy.copy(backend)  # the same model and prefix cache, without sharing within the batch
    unshared.share_batch = False
    recorder = Recorder(unshared)
    with PeakRSS() as rss:
        started = time.perf_counter()
        run = clf.open(alone, config, (method,), backend=recorder, prior=TreePrior(), trace=trace).finish()
        seconds = time.perf_counter() - started
    scores = {k: c.p for result in run.results() for k, c in result[method].categories.items()}
    nodes = sum(t.expanded_nodes for _, _, t in run.trees())
    usage = recorder.usage
    return Run("separate", example, nodes, usage.model_calls, usage.tokens, seconds, rss.peak_mb, scores)


def expanded_paths(root: Any) -> set[tuple[int, ...]]:
    """The paths of a searched tree's expanded nodes (those asked ahead and dropped are not)."""
    out, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node.expanded:
            out.add(node.path)
            stack.extend(node.children)
    return out


def run_floor(backend: Any, prompt: Prompt, queries: Sequence[Query], example: int) -> Run:
    """Prefill the prompt (shared prefix from the process cache), then every node the search
    expanded (``queries``) in one call."""
    with PeakRSS() as rss:
        started = time.perf_counter()
        session = backend.open([prompt])
        opened = time.perf_counter() - started
        nodes = [Query(0, q.path, q.candidates) for q in queries if q.path]
        if nodes:
            session.next_tokens(nodes)
        seconds = time.perf_counter() - started
        usage = session.usage
        session.close()
    return Run("floor", example, len(queries), usage.model_calls, usage.tokens + usage.prompt_tokens, seconds, rss.peak_mb,
               prefill_tokens=usage.prompt_tokens, prefill_seconds=opened)


def forget_conversations(backend: Any, prompts: Sequence[Prompt]) -> None:
    """Empty the engine's prefix cache but for the prompts' shared prefixes (the format's fixed
    part), so that a measured run reuses no other example's tokens."""
    cache = getattr(backend, "cache", None)
    if cache is not None:
        cache.trim({p.ids[: p.shared_prefix] for p in prompts if p.shared_prefix})


# -- turn by turn ---------------------------------------------------------------------------
def turn_conversation(conversations: Sequence[object], turns: int) -> list[dict[str, str]]:
    """A conversation of ``turns`` exchanges (a user message, then the assistant's reply): the
    user texts of ``conversations`` in order, and their assistant texts (the user texts again
    where they hold none), each cycled where they are too few."""
    from guardprob.inputs.conversation import to_messages

    messages = [m for c in conversations for m in to_messages(c)]  # type: ignore[arg-type]
    users = [m.content for m in messages if m.role == "user"]
    replies = [m.content for m in messages if m.role == "assistant"] or users
    if turns < 1 or not users:
        raise InputError(f"the turn-by-turn measurement needs --turns >= 1 and some user messages (turns={turns})")
    return [{"role": role, "content": texts[k % len(texts)]}
            for k in range(turns) for role, texts in (("user", users), ("assistant", replies))]


def turn_schedule(conversation: Sequence[dict[str, str]], every_message: bool = False) -> list[list[dict[str, str]]]:
    """The conversations a moderator scores: after every exchange (judging the reply), or after
    every message (judging user and assistant in turn)."""
    ends = range(1, len(conversation) + 1) if every_message else range(2, len(conversation) + 1, 2)
    return [list(conversation[:k]) for k in ends]


def fresh_tokens(prompts: Sequence[Prompt]) -> int:
    """What an exact engine must run for these prompts in this order, keeping every earlier
    prompt's keys: each prompt's tokens past the longest prefix it shares with an earlier one
    (and at least its last token, whose distribution is the answer)."""
    total = 0
    for k, p in enumerate(prompts):
        shared = max((common_prefix(p.ids, q.ids) for q in prompts[:k]), default=0)
        total += len(p.ids) - min(shared, len(p.ids) - 1)
    return total


def run_turns(
    clf: Any, schedule: Sequence[Sequence[dict[str, str]]], config: Any, method: str,
    prior: TreePrior | None = None, trace: TraceConfig = GREEDY_TRACE,
) -> list[Run]:
    """Each conversation of ``schedule`` scored in order with the classifier's engine and its
    prefix cache (emptied first) and with the same engine without a cache, interleaved so that
    both see the same machine load, and the last conversation scored once on an empty cache,
    before and after them (the machine's load drifts). Runs ``turns:final`` (example 0:
    before, 1: after), ``turns:cached`` and ``turns:uncached`` (example = the scoring, from 1)."""
    from guardprob.backends.transformers import TransformersBackend

    cached = clf.backend
    if getattr(cached, "cache", None) is None:
        raise InputError("the turn-by-turn measurement compares the prefix cache with none, and this engine has no "
                         "cache (--cache-mb 0?): give it a budget, or leave turns out of --engines")
    uncached = TransformersBackend(clf.model, cache_mb=0)
    start = prior.copy() if prior is not None else TreePrior()
    histories = {"turns:cached": start.copy(), "turns:uncached": start.copy()}
    prompts = [clf.prompt(c) for c in schedule]
    def final(example: int) -> Run:
        cached.cache.trim()
        return run_search(clf, cached, prompts[-1:], config, method, "turns:final", example, start.copy(), trace)[0]

    runs = [final(0)]
    cached.cache.trim()
    for k, prompt in enumerate(prompts, 1):
        for engine, backend in (("turns:cached", cached), ("turns:uncached", uncached)):
            run, _ = run_search(clf, backend, [prompt], config, method, engine, k, histories[engine], trace)
            runs.append(run)
    runs.append(final(1))
    cached.cache.trim()
    return runs


def summarise_turns(runs: Sequence[Run], fresh: int | None = None) -> dict[str, Any]:
    """Totals over the turns with and without the cache, their ratios to the final conversation
    scored once, the cached prefill against ``fresh`` (``fresh_tokens``: the least an exact
    engine runs), and the largest score difference between the two (and against the final one)."""
    finals = [r for r in runs if r.engine == "turns:final"]
    by = {e: {r.example: r for r in runs if r.engine == e} for e in ("turns:cached", "turns:uncached")}
    out: dict[str, Any] = {"turns": len(by["turns:cached"])}
    groups = {"final": finals, "cached": list(by["turns:cached"].values()), "uncached": list(by["turns:uncached"].values())}
    for name, rs in groups.items():
        share = 1 / len(rs) if name == "final" else 1  # the final conversation: the mean of its runs
        out[name] = {measure: share * sum(getattr(x, measure) for x in rs)
                     for measure in ("prefill_tokens", "prefill_seconds", "seconds", "nodes", "calls")}
    for name in ("cached", "uncached"):
        for measure in ("prefill_tokens", "prefill_seconds", "seconds"):
            out[f"{name}_over_final_{measure}"] = out[name][measure] / out["final"][measure] if out["final"][measure] else None
    cached, uncached = by["turns:cached"], by["turns:uncached"]
    pairs = [(cached[k], uncached[k]) for k in sorted(cached)] + [(f, cached[max(cached)]) for f in finals]
    if fresh is not None:
        out["fresh_tokens"] = fresh
        out["cached_over_fresh_prefill_tokens"] = out["cached"]["prefill_tokens"] / fresh
    out["max_abs_diff_cached_uncached"] = max((abs(a.scores[c] - b.scores[c]) for a, b in pairs for c in a.scores), default=0.0)
    out["same_nodes"] = all(a.nodes == b.nodes for a, b in pairs)
    return out


# -- data -----------------------------------------------------------------------------------
def load_conversations(path: str | Path | None, limit: int | None) -> list[object]:
    """Conversations from a JSONL file (see ``read_conversations``); None: the shipped sample."""
    from guardprob.evaluation.datasets import sample_path

    path = Path(path) if path is not None else sample_path()
    out = list(itertools.islice(read_conversations(path), limit))
    if not out:
        raise InputError(f"dataset {path} holds no conversation")
    return out


# -- the benchmark --------------------------------------------------------------------------
def bench(
    clf: Any,
    conversations: Sequence[object],
    *,
    method: str = "marginal",
    params: dict | None = None,
    engines: Sequence[str] = ENGINES,
    naive_limit: int = 1,
    batch: int = 32,
    warm: Sequence[object] = (),
    turns: int = 16,
    every_message: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Run the engines on ``conversations`` and summarise (see the module docstring).

    warm: other conversations searched first, unmeasured, so that guardprob guesses from
    history (``SearchConfig.prior``) as a running classifier does. One at a time, each example
    then also learns from the examples before it; the batch guesses from ``warm`` only, never
    from the trees of its own examples.
    turns: the exchanges of the turn-by-turn conversation, whose texts are those of
    ``conversations`` and then ``warm``; it is scored after every exchange, or after every
    message with ``every_message``.
    """
    from guardprob.backends.naive import NaiveBackend

    unknown = set(engines) - set(ENGINES)
    if unknown:
        raise InputError(f"unknown engine(s) {', '.join(sorted(unknown))}; use {', '.join(ENGINES)}")
    say = progress or (lambda _: None)
    params = dict(params or {})
    trace = TraceConfig.pop(params)  # formats that reason first: how their reasoning is written
    config = clf.search_config(method, **params)
    naive_config = replace(config, speculate=0, prior=0.0)  # per node, as the reference code: one call each
    prompts = [clf.prompt(c) for c in conversations]
    fast = clf.backend
    if fast.name != "transformers":
        raise InputError(f"guardprob bench measures the transformers engine, not {fast.name!r}; use --backend transformers")
    # warm-up: the shared prefix's cache and the first-call costs are paid once per process
    run_search(clf, fast, prompts[:1], clf.search_config(method, eps=1.0), method, "warmup", -1, trace=trace)
    history = TreePrior()
    for conversation in warm:
        run_search(clf, fast, [clf.prompt(conversation)], config, method, "warmup", -1, history, trace)
    batch_history = history.copy()
    runs: list[Run] = []
    queries: dict[int, list[Query]] = {}
    for i, prompt in enumerate(prompts):
        if "guardprob" in engines or "floor" in engines:
            forget_conversations(fast, prompts)
            run, queries[i] = run_search(clf, fast, [prompt], config, method, "guardprob", i, history, trace)
            if "guardprob" in engines:
                runs.append(run)
                say(f"guardprob example {i}: {run.nodes} nodes, {run.seconds:.2f} s")
        if "floor" in engines:
            forget_conversations(fast, prompts)
            runs.append(run_floor(fast, prompt, queries[i], i))
        if "separate" in engines and prompt.questions:
            forget_conversations(fast, prompts)
            run = run_separate(clf, fast, prompt, config, method, i, trace)
            runs.append(run)
            say(f"separate prompts example {i}: {run.tokens} tokens, {run.seconds:.2f} s")
        if "naive" in engines and i < naive_limit:
            run, _ = run_search(clf, NaiveBackend(clf.model), [prompt], naive_config, method, "naive", i, trace=trace)
            runs.append(run)
            say(f"naive example {i}: {run.nodes} nodes, {run.seconds:.2f} s")
    if "guardprob" in engines and batch > 1 and len(prompts) > 1:
        for start in range(0, len(prompts), batch):
            forget_conversations(fast, prompts)
            run, _ = run_search(clf, fast, prompts[start : start + batch], config, method, "batch", -1, batch_history.copy(),
                                trace)
            runs.append(run)
            say(f"batch of {min(batch, len(prompts) - start)}: {run.seconds:.2f} s")
    settings = {"method": method, **config.as_dict(), "examples": len(prompts), "naive_limit": naive_limit, "batch": batch,
                "warm": len(warm), "prompt_tokens": [len(p.ids) for p in prompts], "shared_prefix": [p.shared_prefix for p in prompts]}
    if "turns" in engines:
        schedule = turn_schedule(turn_conversation([*conversations, *warm], turns), every_message)
        turn_runs = run_turns(clf, schedule, config, method, history, trace)
        runs += turn_runs
        settings.update(turns=turns, turn_every_message=every_message, cache_mb=fast.cache_mb,
                        turns_prompt_tokens=[len(clf.prompt(c).ids) for c in schedule],
                        turns_fresh_tokens=fresh_tokens([clf.prompt(c) for c in schedule]))
        say(f"turn by turn: {len(schedule)} scorings, {sum(r.seconds for r in turn_runs):.2f} s")
    return Report(settings, tuple(runs), summarise(runs, settings.get("turns_fresh_tokens")))


def summarise(runs: Sequence[Run], fresh: int | None = None) -> dict[str, Any]:
    """Throughput per engine, the ratios between them, agreement and memory (``fresh``: see
    ``summarise_turns``)."""
    by: dict[str, dict[int, Run]] = {}
    for r in runs:
        if r.example >= 0 and not r.engine.startswith("turns:"):
            by.setdefault(r.engine, {})[r.example] = r
    out: dict[str, Any] = {}
    for engine, rs in by.items():
        seconds = sum(r.seconds for r in rs.values())
        out[engine] = {
            "examples": len(rs),
            "examples_per_s": len(rs) / seconds if seconds else None,
            "seconds_per_example": seconds / len(rs),
            "nodes_per_example": sum(r.nodes for r in rs.values()) / len(rs),
            "calls_per_example": sum(r.calls for r in rs.values()) / len(rs),
            "tokens_per_example": sum(r.tokens for r in rs.values()) / len(rs),
            "peak_rss_mb_max": max(r.peak_rss_mb for r in rs.values()),
        }
    gp, naive, floor = by.get("guardprob", {}), by.get("naive", {}), by.get("floor", {})
    both = sorted(set(gp) & set(naive))
    if both:
        out["naive_over_guardprob"] = sum(naive[i].seconds for i in both) / sum(gp[i].seconds for i in both)
        diffs = [abs(naive[i].scores[k] - gp[i].scores[k]) for i in both for k in gp[i].scores]
        out["max_abs_diff_naive_guardprob"] = max(diffs, default=0.0)
        out["agree"] = out["max_abs_diff_naive_guardprob"] <= AGREE and all(naive[i].nodes == gp[i].nodes for i in both)
    shared = sorted(set(gp) & set(floor))
    if shared:
        out["guardprob_over_floor"] = sum(gp[i].seconds for i in shared) / sum(floor[i].seconds for i in shared)
    at_floor = sorted(set(naive) & set(floor))
    if at_floor:  # the most any exact engine can gain over naive on these examples
        out["naive_over_floor"] = sum(naive[i].seconds for i in at_floor) / sum(floor[i].seconds for i in at_floor)
    separate = by.get("separate", {})
    asked = sorted(set(gp) & set(separate))
    if asked:  # a per-category format: K prompts of their own against K questions after one conversation
        out["separate_over_questions"] = sum(separate[i].seconds for i in asked) / sum(gp[i].seconds for i in asked)
        out["separate_over_questions_tokens"] = sum(separate[i].tokens for i in asked) / sum(gp[i].tokens for i in asked)
        out["max_abs_diff_separate_questions"] = max(
            (abs(separate[i].scores[k] - gp[i].scores[k]) for i in asked for k in gp[i].scores), default=0.0)
    batches = [r for r in runs if r.engine == "batch"]
    if batches and gp:
        examples = len(gp)
        batch_rate = examples / sum(r.seconds for r in batches)
        out["batch"] = {
            "examples_per_s": batch_rate,
            "seconds_per_example": 1 / batch_rate,
            "calls": sum(r.calls for r in batches),
            "peak_rss_mb_max": max(r.peak_rss_mb for r in batches),
        }
        out["batch_over_single_throughput"] = batch_rate / out["guardprob"]["examples_per_s"]
        if shared:
            out["batch_over_floor"] = (1 / batch_rate) / out["floor"]["seconds_per_example"]
    if any(r.engine == "turns:final" for r in runs):
        out["turns"] = summarise_turns(runs, fresh)
    return out


def print_report(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    s = report.settings
    title = f"guardprob bench: {s.get('model', '')} {s['method']} eps={s['eps']} top_p={s['top_p']} prior={s['prior']} (warm {s['warm']})"
    table = Table(title=title, title_justify="left")
    for column in ("example", "engine", "nodes", "calls", "tokens", "seconds", "peak MB"):
        table.add_column(column, justify="left" if column in ("engine",) else "right")
    for r in report.runs:
        example = "batch" if r.example < 0 else str(r.example)
        table.add_row(example, r.engine, str(r.nodes), str(r.calls), str(r.tokens), f"{r.seconds:.3f}", f"{r.peak_rss_mb:.0f}")
    console.print(table)
    m = report.summary
    lines = []
    for engine in ("naive", "guardprob", "floor", "separate"):
        if engine in m:
            e = m[engine]
            lines.append(f"{engine}: {e['examples_per_s']:.3f} examples/s ({e['seconds_per_example']:.3f} s/example, {e['examples']} examples)")
    if "naive_over_guardprob" in m:
        ok = "agree" if m["agree"] else "DISAGREE"
        lines.append(f"naive/guardprob = {m['naive_over_guardprob']:.1f}x   scores {ok} (max |diff| {m['max_abs_diff_naive_guardprob']:.2e})")
    if "naive_over_floor" in m:
        lines.append(f"naive/floor = {m['naive_over_floor']:.1f}x   (the most any exact engine can gain over naive here)")
    if "guardprob_over_floor" in m:
        lines.append(f"guardprob/floor = {m['guardprob_over_floor']:.2f}x")
    if "separate_over_questions" in m:
        lines.append(
            f"separate prompts/questions = {m['separate_over_questions']:.2f}x time, "
            f"{m['separate_over_questions_tokens']:.2f}x tokens (max |diff| {m['max_abs_diff_separate_questions']:.2e})"
        )
    if "batch" in m:
        lines.append(
            f"batch of {s['batch']}: {m['batch']['examples_per_s']:.3f} examples/s = {m['batch_over_single_throughput']:.2f}x one at a time"
            + (f", {m['batch_over_floor']:.2f}x the floor per example" if "batch_over_floor" in m else "")
        )
    if "turns" in m:
        lines += turn_lines(m["turns"], s["turns_prompt_tokens"][-1], s["turn_every_message"])
    for line in lines:
        console.print(line)


def turn_lines(t: dict[str, Any], final_tokens: int, every_message: bool = False) -> list[str]:
    """The turn-by-turn summary in words."""
    when = "every message" if every_message else "every reply"
    same = "same nodes" if t["same_nodes"] else "DIFFERENT nodes"
    lines = [f"turn by turn ({t['turns']} scorings, after {when}; final prompt {final_tokens} tokens), "
             "against scoring the final conversation once:"]
    for name in ("cached", "uncached"):
        r = t[name]
        lines.append(
            f"  {name + ':':9} prefill {r['prefill_tokens']} tokens = {t[f'{name}_over_final_prefill_tokens']:.2f}x, "
            f"prefill {r['prefill_seconds']:.2f} s = {t[f'{name}_over_final_prefill_seconds']:.2f}x, "
            f"scoring {r['seconds']:.2f} s = {t[f'{name}_over_final_seconds']:.2f}x"
        )
    if "fresh_tokens" in t:
        lines.append(f"  the least an exact engine runs: {t['fresh_tokens']} tokens (cached prefill = "
                     f"{t['cached_over_fresh_prefill_tokens']:.2f}x that)")
    lines.append(f"  cached vs uncached scores: max |diff| {t['max_abs_diff_cached_uncached']:.2e}, {same}")
    return lines
