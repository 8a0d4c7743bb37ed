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
  questions after one shared conversation that guardprob asks.

It checks that naive and guardprob agree, measures peak resident memory per example and
per batch, and compares a batch of ``--batch`` prompts searched together with one at a time.
``benchmarks/bench.py`` is a thin wrapper; docs/performance.md shows results.
"""

from __future__ import annotations

import argparse
import itertools
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from guardprob.backends.base import Backend, Prompt, Query, Session, Usage
from guardprob.conversation import read_conversations
from guardprob.errors import InputError
from guardprob.prior import TreePrior
from guardprob.reasoning import GREEDY_TRACE, TraceConfig

ENGINES = ("naive", "guardprob", "floor", "separate")  # separate: per-category formats only
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

    def open(self, prompts: Sequence[Prompt]) -> Session:
        session = _RecordingSession(self.backend.open(prompts))
        self.sessions.append(session)
        return session

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
    return Run(engine, example, nodes, usage.model_calls, usage.tokens, seconds, rss.peak_mb, scores), used


def run_separate(clf: Any, backend: Backend, prompt: Prompt, config: Any, method: str, example: int,
                 trace: TraceConfig = GREEDY_TRACE) -> Run:
    """A per-category format's questions asked as prompts of their own (each the whole text
    up to its verdict), in one batched search: what the questions after one shared
    conversation save."""
    alone = [Prompt(prompt.ids + suffix, prompt.shared_prefix, prompt.role, ((category, ()),))
             for category, suffix in prompt.questions]
    recorder = Recorder(backend)
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
        nodes = [Query(0, q.path, q.candidates) for q in queries if q.path]
        if nodes:
            session.next_tokens(nodes)
        seconds = time.perf_counter() - started
        usage = session.usage
        session.close()
    return Run("floor", example, len(queries), usage.model_calls, usage.tokens + usage.prompt_tokens, seconds, rss.peak_mb)


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
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Run the engines on ``conversations`` and summarise (see the module docstring).

    warm: other conversations searched first, unmeasured, so that guardprob guesses from
    history (``SearchConfig.prior``) as a running classifier does. One at a time, each example
    then also learns from the examples before it; the batch guesses from ``warm`` only, never
    from the trees of its own examples.
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
    if not hasattr(fast, "prefix_kv"):
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
            run, queries[i] = run_search(clf, fast, [prompt], config, method, "guardprob", i, history, trace)
            if "guardprob" in engines:
                runs.append(run)
                say(f"guardprob example {i}: {run.nodes} nodes, {run.seconds:.2f} s")
        if "floor" in engines:
            runs.append(run_floor(fast, prompt, queries[i], i))
        if "separate" in engines and prompt.questions:
            run = run_separate(clf, fast, prompt, config, method, i, trace)
            runs.append(run)
            say(f"separate prompts example {i}: {run.tokens} tokens, {run.seconds:.2f} s")
        if "naive" in engines and i < naive_limit:
            run, _ = run_search(clf, NaiveBackend(clf.model), [prompt], naive_config, method, "naive", i, trace=trace)
            runs.append(run)
            say(f"naive example {i}: {run.nodes} nodes, {run.seconds:.2f} s")
    if "guardprob" in engines and batch > 1 and len(prompts) > 1:
        for start in range(0, len(prompts), batch):
            run, _ = run_search(clf, fast, prompts[start : start + batch], config, method, "batch", -1, batch_history.copy(),
                                trace)
            runs.append(run)
            say(f"batch of {min(batch, len(prompts) - start)}: {run.seconds:.2f} s")
    settings = {"method": method, **config.as_dict(), "examples": len(prompts), "naive_limit": naive_limit, "batch": batch,
                "warm": len(warm), "prompt_tokens": [len(p.ids) for p in prompts], "shared_prefix": [p.shared_prefix for p in prompts]}
    return Report(settings, tuple(runs), summarise(runs))


def summarise(runs: Sequence[Run]) -> dict[str, Any]:
    """Throughput per engine, the ratios between them, agreement and memory."""
    by: dict[str, dict[int, Run]] = {}
    for r in runs:
        if r.example >= 0:
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
    return out


# -- the command ----------------------------------------------------------------------------
def register(subparsers: argparse._SubParsersAction) -> None:
    from guardprob.commands.options import add_model_options, add_reasoning_options, add_search_options
    from guardprob.estimators import METHODS

    p = subparsers.add_parser("bench", help="time the engine against the per-node baseline and the floor")
    p.add_argument("--data", default=None, help="JSONL with 'messages', 'text' or 'unsafe_query' per line (default: the shipped sample)")
    p.add_argument("--limit", type=int, default=8, help="examples to run (default 8)")
    p.add_argument("--warm", type=int, default=16,
                   help="conversations after the measured ones searched first, unmeasured, for the search's guesses "
                        "from history (--prior; default 16)")
    p.add_argument("--method", default="marginal", choices=METHODS)
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {','.join(ENGINES)}")
    p.add_argument("--naive-limit", type=int, default=1, help="examples the naive baseline runs (it is ~100x slower; default 1)")
    p.add_argument("--batch", type=int, default=32, help="prompts searched together for the batch comparison (1: skip it)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", dest="json_path", default=None, help="also write the full report to this JSON file")
    p.add_argument("--decide", action="store_true",
                   help="measure certified decisions instead (bench_decisions.py): at thresholds 0.5 and, with "
                        "--calibration, the file's, against the full marginal and greedy generation")
    p.add_argument("--calibration", default=None, help="with --decide: a calibration file whose thresholds to decide")
    add_model_options(p)
    add_search_options(p)
    add_reasoning_options(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import sys

    from guardprob.commands.formats import announce
    from guardprob.commands.options import reasoning_params, search_params, spec_from_args

    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit {args.limit}: use a positive number of examples")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip())
    if args.warm < 0:
        raise InputError(f"--warm {args.warm}: use a number of conversations >= 0")
    rows = load_conversations(args.data, args.limit + args.warm)
    conversations, warm = rows[: args.limit], rows[args.limit :]
    clf = spec_from_args(args).build()
    announce(clf)
    if args.decide:
        return _run_decisions(args, clf, conversations)
    report = bench(
        clf, conversations, method=args.method, params={**search_params(args), **reasoning_params(args)}, engines=engines,
        naive_limit=args.naive_limit, batch=args.batch, warm=warm,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    report.settings.update({"model": clf.name, "format": clf.format.name, "data": args.data or "sample", "threads": _threads()})
    print_report(report)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8")
    return 0


def _run_decisions(args: argparse.Namespace, clf: Any, conversations: Sequence[object]) -> int:
    import sys

    from guardprob.bench_decisions import bench_decisions, print_summary
    from guardprob.commands.options import search_params

    rules = {"0.5": clf.decision_rule(True)}
    if args.calibration:
        rules["calibrated"] = clf.decision_rule(True, calibration=args.calibration)
    report = bench_decisions(clf, conversations, rules, search_params(args),
                             progress=lambda line: print(line, file=sys.stderr, flush=True))
    report["settings"] = {"model": clf.name, "format": clf.format.name, "data": args.data or "sample",
                          "examples": len(conversations), "threads": _threads(), **search_params(args)}
    print_summary(report["summary"])
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()


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
    for line in lines:
        console.print(line)
