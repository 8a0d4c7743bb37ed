"""What scoring returns: per-category probabilities with bounds, and what they cost."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class CategoryScore:
    """One category's score; ``lower <= p <= upper`` bound the exact value (docs/design.md, section 4)."""

    id: str
    name: str
    p: float
    lower: float
    upper: float


@dataclass(frozen=True)
class ReasoningSummary:
    """How the reasoning a format writes before its verdict was taken (reasoning.py).

    mode: ``greedy`` (the scores are exact given the model's greedy reasoning) or ``sampled``
    (the mean over ``traces`` sampled traces of the exact scores given each one, an estimate
    of the model's probability with its reasoning marginalised). ``stderr``: the standard
    error of that mean per score (``p_unsafe``, category ids, fields, groups); empty for one
    trace. ``tokens``: the tokens the model wrote per trace, on average; ``cut``: traces closed
    at the token budget; ``texts``: each trace's reasoning."""

    mode: str
    traces: int
    temperature: float | None
    tokens: float
    cut: int
    stderr: Mapping[str, float]
    texts: tuple[str, ...]


@dataclass(frozen=True)
class Decision:
    """The flags that the bounds certify (decision.py): each is the flag the exhaustive search
    would give, or None while its interval still straddles the threshold.

    decided: every threshold's side is known. flagged: some score reaches its threshold (None:
    none does yet, and some are undecided). categories, groups: per id or name; unsafe: for
    P(unsafe), None when it has no threshold or is undecided. thresholds: those applied (category
    scores are compared after calibration, where a calibration is loaded)."""

    decided: bool
    flagged: bool | None
    categories: Mapping[str, bool | None]
    unsafe: bool | None
    groups: Mapping[str, bool | None]
    thresholds: Mapping[str, float]

    @property
    def flagged_categories(self) -> tuple[str, ...]:
        return tuple(c for c, flag in self.categories.items() if flag)


@dataclass(frozen=True)
class Scores:
    """The scores of one conversation under one estimator.

    ``p_unsafe`` is P(the verdict is unsafe), bounded by ``p_unsafe_lower`` and
    ``p_unsafe_upper``; ``groups`` holds the named unions asked for (``p`` = P(the verdict
    names any member) under ``marginal``); ``fields`` the format's outcomes that are not
    categories (``safety=controversial``, ``refusal=yes``).
    """

    method: str
    taxonomy: str
    p_unsafe: float
    categories: Mapping[str, CategoryScore]
    verdict: str | None  # the greedy verdict as the model writes it ("unsafe\nS1,S10"); None if it leaves the grammar
    unexplored_mass: float
    invalid_mass: float
    expanded_nodes: int
    model_calls: int
    truncated: bool = False
    params: Mapping[str, object] = field(default_factory=dict)
    seconds: float = 0.0
    p_unsafe_lower: float = 0.0
    p_unsafe_upper: float = 1.0
    groups: Mapping[str, CategoryScore] = field(default_factory=dict)
    complete: bool = True  # False: stopped at a deadline; the bounds hold, p is the lower bound reached
    fields: Mapping[str, CategoryScore] = field(default_factory=dict)  # the format's other outcomes
    verdict_categories: tuple[str, ...] = ()  # the categories the greedy verdict names
    verdict_unsafe: bool | None = None  # whether the greedy verdict says unsafe (None: no verdict)
    reasoning: ReasoningSummary | None = None  # the reasoning before the verdict, for formats that reason first
    decision: Decision | None = None  # with decide=True: the flags the bounds certify

    @property
    def probabilities(self) -> dict[str, float]:
        return {cid: c.p for cid, c in self.categories.items()}

    @property
    def flagged_ids(self) -> tuple[str, ...]:
        """Deprecated: ``verdict_categories`` (the ids in the greedy verdict; flags are in ``decision``)."""
        warnings.warn("Scores.flagged_ids is deprecated, use Scores.verdict_categories (the same ids); "
                      "flagged_ids will be removed in a future release", DeprecationWarning, stacklevel=2)
        return self.verdict_categories

    def as_dict(self) -> dict:
        out = asdict(self)
        out["categories"] = {cid: asdict(c) for cid, c in self.categories.items()}
        out["groups"] = {name: asdict(g) for name, g in self.groups.items()}
        out["fields"] = {name: asdict(f) for name, f in self.fields.items()}
        out["verdict_categories"] = list(self.verdict_categories)
        out["params"] = dict(self.params)
        if self.decision is not None:
            d = self.decision
            out["decision"] = {**asdict(d), "categories": dict(d.categories), "groups": dict(d.groups),
                               "thresholds": dict(d.thresholds), "flagged_categories": list(d.flagged_categories)}
        if self.reasoning is not None:
            out["reasoning"] = {**asdict(self.reasoning), "stderr": dict(self.reasoning.stderr),
                                "texts": list(self.reasoning.texts)}
        return out
