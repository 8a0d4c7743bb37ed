"""Certified decisions: which side of its threshold each score lies on, known before the score is.

A category is flagged when its score (calibrated, where a calibration is given) reaches its
threshold. The search bounds the exact probability p by [lower, upper], and a calibrator never
decreases, so the flag that the exhaustive search would give is known as soon as
f(lower) >= t (flagged, since f(p) >= f(lower)) or f(upper) < t (not flagged, since
f(p) <= f(upper)). With ``decide=True`` the search stops there (``Goal``, read by search.py)
and expands only the nodes that can still move an undecided score, usually long before the
bounds meet.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from guardprob.core.measures import MeasureSet, Outcome, bounds
from guardprob.errors import InputError
from guardprob.result import Decision, Scores

if TYPE_CHECKING:
    from guardprob.core.grammar import TokenGrammar
    from guardprob.core.tree import Node
    from guardprob.taxonomy import Taxonomy

UNSAFE_KEY = "unsafe"  # the threshold on P(unsafe) in a thresholds mapping
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class DecisionRule:
    """The thresholds to decide.

    categories: id -> threshold on the category's score (calibrated where ``calibration``
    has a calibrator for it). unsafe: threshold on P(unsafe), None to leave it undecided.
    groups: a named union's name -> threshold on its probability (never calibrated).
    """

    categories: Mapping[str, float]
    unsafe: float | None = None
    groups: Mapping[str, float] = field(default_factory=dict)
    calibration: Any = None  # a Calibration (evaluation/calibration.py); its calibrators never decrease

    @classmethod
    def build(
        cls, taxonomy: Taxonomy, thresholds: float | Mapping[str, float] | None = None, calibration: Any = None,
        groups: Sequence[str] = (),
    ) -> DecisionRule:
        """A rule from what a user gives: one threshold for everything, or a mapping of category
        id, group name or ``unsafe`` to threshold; a category not named takes the calibration's
        threshold, else 0.5, and P(unsafe) and every group 0.5 unless named."""
        known = {*taxonomy.ids, *groups, UNSAFE_KEY}
        given: dict[str, float] = {}
        if thresholds is None:
            every = None
        elif isinstance(thresholds, (int, float)) and not isinstance(thresholds, bool):
            every = _probability("thresholds", thresholds)
        elif isinstance(thresholds, Mapping):
            every = None
            unknown = [k for k in thresholds if k not in known]
            if unknown:
                raise InputError(f"thresholds name {unknown!r}, which are neither category ids of {taxonomy.name}, "
                                 f"group names nor {UNSAFE_KEY!r}; use {', '.join(sorted(known))}")
            given = {k: _probability(f"thresholds[{k!r}]", v) for k, v in thresholds.items()}
        else:
            raise InputError(f"thresholds={thresholds!r}: give one probability for every score, or a mapping of "
                             f"category id (or group name, or {UNSAFE_KEY!r}) to probability")
        fitted = dict(getattr(calibration, "thresholds", {}) or {})

        def pick(name: str, fallback: float) -> float:
            if name in given:
                return given[name]
            return every if every is not None else fallback

        return cls(
            categories={c: pick(c, fitted.get(c, DEFAULT_THRESHOLD)) for c in taxonomy.ids},
            unsafe=pick(UNSAFE_KEY, DEFAULT_THRESHOLD),
            groups={g: pick(g, DEFAULT_THRESHOLD) for g in groups},
            calibration=calibration,
        )

    @property
    def thresholds(self) -> dict[str, float]:
        out = dict(self.categories)
        if self.unsafe is not None:
            out[UNSAFE_KEY] = self.unsafe
        return {**out, **self.groups}

    def category_side(self, category: str, lower: float, upper: float) -> bool | None:
        return side(lower, upper, self.categories[category], self._calibrator(category))

    def _calibrator(self, category: str):
        return None if self.calibration is None else _calibrator(self.calibration, category)

    def judge(self, scores: Scores) -> Decision:
        """The decision that the intervals of ``scores`` certify."""
        categories = {c: self.category_side(c, s.lower, s.upper) for c, s in scores.categories.items()
                      if c in self.categories}
        unsafe = None if self.unsafe is None else side(scores.p_unsafe_lower, scores.p_unsafe_upper, self.unsafe)
        groups = {g: side(s.lower, s.upper, self.groups[g]) for g, s in scores.groups.items() if g in self.groups}
        sides = [*categories.values(), *groups.values(), *([unsafe] if self.unsafe is not None else [])]
        decided = all(s is not None for s in sides)
        flagged = True if any(s is True for s in sides) else (False if decided else None)
        return Decision(decided, flagged, categories, unsafe, groups, self.thresholds)

    def goal(self, grammar: TokenGrammar, groups: Mapping[str, Sequence[str]], constrained: bool) -> Goal:
        """What one search must decide: the rule's scores among the outcomes of ``grammar``'s
        language (a question about one category has that category only)."""
        language = grammar.language
        index = language.index
        measures: list[Outcome] = []
        rules: list[tuple[float, Any]] = []
        for category, threshold in self.categories.items():
            if category in index:
                measures.append(Outcome(frozenset({index[category]})))
                rules.append((threshold, self._calibrator(category)))
        if self.unsafe is not None:
            measures.append(Outcome(frozenset({language.unsafe})))
            rules.append((self.unsafe, None))
        for name, threshold in self.groups.items():
            members = [index[c] for c in groups.get(name, ()) if c in index]
            if members:
                measures.append(Outcome(frozenset(members)))
                rules.append((threshold, None))
        return Goal(MeasureSet(grammar, measures, constrained), tuple(rules))


def calibrated(category: str, p: float, calibration: Any = None) -> float:
    """A category's score as its threshold reads it: ``calibration``'s calibrated probability
    where one is given, else ``p``."""
    return float(p) if calibration is None else float(calibration.calibrate(category, p))


def flags(scores: Mapping[str, float], thresholds: Mapping[str, float], calibration: Any = None,
          default: float | None = None) -> dict[str, bool]:
    """The one flag rule: id -> its score (calibrated where ``calibration`` is given) reaches its
    threshold. ``default``: the threshold of an id ``thresholds`` does not name (None: every id
    must be named). The service, the judges, ``guardprob score`` and ``DecisionRule`` (on an
    interval, ``side``) all flag this way."""
    out = {}
    for cid, p in scores.items():
        threshold = thresholds.get(cid, default)
        if threshold is None:
            raise InputError(f"no threshold for {cid!r}; give one (thresholds) or a default")
        out[cid] = side(p, p, threshold, None if calibration is None else _calibrator(calibration, cid)) is True
    return out


def _calibrator(calibration: Any, category: str) -> Any:
    return lambda p: calibration.calibrate(category, p)


def side(lower: float, upper: float, threshold: float, calibrator: Any = None) -> bool | None:
    """True if every value in [lower, upper] reaches ``threshold`` (through ``calibrator``),
    False if none does, None while the interval straddles it."""
    f = (lambda p: p) if calibrator is None else calibrator
    if float(f(lower)) >= threshold:
        return True
    if float(f(upper)) < threshold:
        return False
    return None


class Goal:
    """A search's decisions: the measures to decide and, per measure, (threshold, calibrator)."""

    def __init__(self, measures: MeasureSet, rules: tuple[tuple[float, Any], ...]):
        self.measures = measures
        self.rules = rules
        self.undecided = np.ones(len(rules), dtype=bool)

    def update(self, root: Node) -> bool:
        """Read the bounds reached below ``root``; True once every measure is decided."""
        if not self.undecided.any():
            return True
        lower, upper = bounds(root, self.measures)
        for i, (threshold, calibrator) in enumerate(self.rules):
            if self.undecided[i] and side(float(lower[i]), float(upper[i]), threshold, calibrator) is not None:
                self.undecided[i] = False
        return not self.undecided.any()

    def moves(self, state: Any) -> bool:
        """True if what lies below a node at ``state`` can still move an undecided measure."""
        yes, no, _ = self.measures.at(state)
        return bool((self.undecided & ~yes & ~no).any())


def _probability(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
        raise InputError(f"{name}={value!r}: use a probability between 0 and 1")
    return float(value)
