"""``guardprob bench --decide``: what a certified decision costs, against the full marginal
and against greedy generation of the verdict, on the same examples in one run.

Per example, interleaved so that every contender sees the same load, each starting from a
prefix cache that holds only the format's fixed header (no contender reuses another's prompt):

- ``generate``: transformers' ``model.generate`` writing the verdict greedily (what running
  the guard costs without probabilities: the whole prompt prefilled, one call per token), for
  as many tokens as the greedy verdict has plus its end (a guard stops there; a chat model
  that is no guard may write on, which is not the guard's cost);
- ``greedy``: the verdict's greedy path on guardprob's engine (the shared taxonomy block
  from the process cache, as for the others);
- ``marginal``: the full marginal search at the run's settings (eps 1e-3 by default);
- ``decide@<name>``: the certified decision at each set of thresholds (0.5 everywhere, and
  those of a calibration file when one is given).

Each decision is checked against the full marginal: wherever the marginal's own interval
lies on one side of a threshold, the decision must be on that side (``disagreements`` must be
0; where the marginal's interval straddles the threshold, only the decision knows the side).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from guardprob.core.decision import DecisionRule, side


@dataclass(frozen=True)
class Contender:
    """One way of scoring one example: its cost and, for decisions, how it compares."""

    name: str
    example: int
    calls: int  # model calls after the prefill
    seconds: float
    decided: bool | None = None
    disagreements: int = 0  # flags that contradict the full marginal's own decided interval
    straddled: int = 0  # thresholds the full marginal's interval leaves open (the decision settles them)


def bench_decisions(
    clf: Any, conversations: Sequence[object], rules: Mapping[str, DecisionRule], params: dict | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every contender on every conversation; the runs and a summary of ratios."""
    say = progress or (lambda _: None)
    params = dict(params or {})
    prompts = [clf.prompt(c) for c in conversations]
    clf.score_prompts(prompts[:1], ("greedy",))  # the shared block's cache and first-call costs, paid once
    runs: list[Contender] = []
    for i, prompt in enumerate(prompts):
        greedy, seconds = _timed(clf, prompt, "greedy")
        runs.append(_generate(clf, prompt, i, greedy.verdict))
        runs.append(Contender("greedy", i, greedy.model_calls, seconds))
        full, seconds = _timed(clf, prompt, "marginal", **params)
        runs.append(Contender("marginal", i, full.model_calls, seconds))
        limit = {k: v for k, v in params.items() if k == "max_nodes"}  # a decision sets the rest itself
        for name, rule in rules.items():
            decided, seconds = _timed(clf, prompt, "marginal", decide=rule, **limit)
            wrong, open_ = _compare(decided, full, rule)
            runs.append(Contender(f"decide@{name}", i, decided.model_calls, seconds, decided.decision.decided, wrong, open_))
        say(f"example {i}: " + ", ".join(f"{r.name} {r.calls} calls {r.seconds:.2f} s" for r in runs if r.example == i))
    return {"runs": [asdict(r) for r in runs], "summary": summarise(runs)}


def _timed(clf: Any, prompt: Any, method: str, **params: Any) -> tuple[Any, float]:
    """One prompt's Scores under ``method``, and the seconds they took."""
    from guardprob.bench.compare import forget_conversations

    forget_conversations(clf.backend, [prompt])
    started = time.perf_counter()
    out = clf.score_prompts([prompt], (method,), **params)[0][method]
    return out, time.perf_counter() - started


def _generate(clf: Any, prompt: Any, example: int, verdict: str | None) -> Contender:
    """transformers' greedy generation of the verdict: its tokens and the end (the longest
    verdict where greedy decoding leaves the grammar)."""
    import torch

    model = clf.model
    ids = torch.tensor([prompt.ids], device=next(model.parameters()).device)
    eos = list(clf.vocabulary.eos_ids)
    started = time.perf_counter()
    with torch.inference_mode():
        budget = clf._verdict_budget if verdict is None else len(clf.tokenizer.encode(verdict, add_special_tokens=False)) + 1
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget,
                             do_sample=False, eos_token_id=eos or None, pad_token_id=eos[0] if eos else 0)
    seconds = time.perf_counter() - started
    return Contender("generate", example, int(out.shape[1] - ids.shape[1]), seconds)


def _compare(decided: Any, full: Any, rule: DecisionRule) -> tuple[int, int]:
    """(flags that contradict the full marginal's decided intervals, thresholds it leaves open)."""
    wrong = open_ = 0
    for cid, flag in decided.decision.categories.items():
        c = full.categories[cid]
        truth = rule.category_side(cid, c.lower, c.upper)
        open_ += truth is None
        wrong += truth is not None and flag is not None and flag != truth
    if rule.unsafe is not None:
        truth = side(full.p_unsafe_lower, full.p_unsafe_upper, rule.unsafe)
        flag = decided.decision.unsafe
        open_ += truth is None
        wrong += truth is not None and flag is not None and flag != truth
    return wrong, open_


def summarise(runs: Sequence[Contender]) -> dict[str, Any]:
    by: dict[str, list[Contender]] = {}
    for r in runs:
        by.setdefault(r.name, []).append(r)
    out: dict[str, Any] = {}
    for name, rs in by.items():
        out[name] = {
            "examples": len(rs),
            "seconds_per_example": sum(r.seconds for r in rs) / len(rs),
            "calls_per_example": sum(r.calls for r in rs) / len(rs),
        }
        if name.startswith("decide@"):
            out[name].update(decided=sum(bool(r.decided) for r in rs), disagreements=sum(r.disagreements for r in rs),
                             straddled=sum(r.straddled for r in rs))
    for name in by:
        if name.startswith("decide@"):
            for other in ("greedy", "generate", "marginal"):
                if other in out:
                    out[name][f"over_{other}"] = out[name]["seconds_per_example"] / out[other]["seconds_per_example"]
    return out


def print_summary(summary: Mapping[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="certified decisions against the full marginal and greedy generation", title_justify="left")
    for column in ("contender", "examples", "s/example", "calls/example", "decided", "disagree", "x greedy",
                   "x generate", "x marginal"):
        table.add_column(column, justify="left" if column == "contender" else "right")
    for name, m in summary.items():
        ratios = [f"{m[f'over_{other}']:.2f}" if f"over_{other}" in m else "" for other in ("greedy", "generate", "marginal")]
        table.add_row(name, str(m["examples"]), f"{m['seconds_per_example']:.3f}", f"{m['calls_per_example']:.1f}",
                      str(m.get("decided", "")), str(m.get("disagreements", "")), *ratios)
    Console(width=max(Console().width, 120)).print(table)  # the full names, also when piped
