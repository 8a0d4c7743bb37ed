"""``ScoreOptions``: what one scoring call is asked, as one frozen object that travels between
layers instead of keyword dictionaries. Built once, where keyword arguments enter
(``Classifier.options``), from options the table (guardprob.options.table) declares."""

from __future__ import annotations

from dataclasses import dataclass, field

from guardprob.core.decision import DecisionRule
from guardprob.core.reasoning import GREEDY_TRACE, TraceConfig
from guardprob.core.tree import SearchConfig


@dataclass(frozen=True)
class ScoreOptions:
    """search: the tree search (SearchConfig); trace: the reasoning written first, for formats
    that reason (TraceConfig); decision: the thresholds a certified decision stops at (None: no
    decision). Equal options search alike: two requests with equal (method, options) may share
    a batched search; the decision rule is carried, not compared (callers that share searches
    key on the rule's name as well)."""

    search: SearchConfig = field(default_factory=SearchConfig)
    trace: TraceConfig = GREEDY_TRACE
    decision: DecisionRule | None = field(default=None, compare=False, hash=False)

    def as_params(self) -> dict:
        """The options as ``Classifier.score``'s keyword arguments (search and trace)."""
        trace = self.trace
        return {**self.search.as_dict(), "traces": trace.traces, "temperature": trace.temperature,
                "seed": trace.seed, "reasoning_tokens": trace.max_tokens}
