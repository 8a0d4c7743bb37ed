"""What an integration decides on: every category's probability with its bounds, and the
flagged decision under the thresholds, read from a guardprob service's answer or from
scores computed in process (the same rule either way: docs/server.md, Thresholds)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from guardprob.evaluation.calibration import Calibration
    from guardprob.result import Scores
    from guardprob.server.config import Thresholds


@dataclass(frozen=True)
class CategoryVerdict:
    """One category: ``lower <= p <= upper`` bound the exact probability; ``score`` is the
    calibrated probability when a calibration applies, else ``p``; ``flagged`` is
    ``score >= threshold``."""

    id: str
    name: str
    p: float
    lower: float
    upper: float
    score: float
    threshold: float
    flagged: bool

    def describe(self) -> str:
        """'S1 Violent Crimes (0.62 >= threshold 0.30)'."""
        return f"{self.id} {self.name} ({self.score:.2f} >= threshold {self.threshold:.2f})"


@dataclass(frozen=True)
class Judgement:
    """The guard's judgement of one conversation's last message (``role``'s)."""

    role: str
    model: str
    method: str
    p_unsafe: float
    p_unsafe_lower: float
    p_unsafe_upper: float
    flagged: bool
    flagged_categories: tuple[str, ...]  # ids, in the taxonomy's order
    categories: Mapping[str, CategoryVerdict]
    verdict: str | None  # the greedy verdict text ("unsafe\nS1"); None where it leaves the grammar

    @property
    def scores(self) -> dict[str, float]:
        """Category id -> the score its threshold is compared with."""
        return {cid: c.score for cid, c in self.categories.items()}

    def reasons(self) -> list[str]:
        """One line per flagged category: its id, name, score and threshold."""
        return [self.categories[cid].describe() for cid in self.flagged_categories]

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON values: what the integrations log and return."""
        return {
            "role": self.role,
            "model": self.model,
            "method": self.method,
            "flagged": self.flagged,
            "flagged_categories": list(self.flagged_categories),
            "p_unsafe": self.p_unsafe,
            "p_unsafe_lower": self.p_unsafe_lower,
            "p_unsafe_upper": self.p_unsafe_upper,
            "scores": self.scores,
            "categories": {
                cid: {"name": c.name, "p": c.p, "lower": c.lower, "upper": c.upper, "score": c.score,
                      "threshold": c.threshold, "flagged": c.flagged}
                for cid, c in self.categories.items()
            },
            "verdict": self.verdict,
        }


def from_service(answer: Mapping[str, Any], role: str) -> Judgement:
    """A ``POST /v1/classify`` answer; KeyError or TypeError where it is not one."""
    categories = {
        cid: CategoryVerdict(cid, row["name"], float(row["p"]), float(row["lower"]), float(row["upper"]),
                             float(row["score"]), float(row["threshold"]), bool(row["flagged"]))
        for cid, row in answer["categories"].items()
    }
    return Judgement(
        role=role, model=str(answer["model"]), method=str(answer["method"]), p_unsafe=float(answer["p_unsafe"]),
        p_unsafe_lower=float(answer["p_unsafe_lower"]), p_unsafe_upper=float(answer["p_unsafe_upper"]),
        flagged=bool(answer["flagged"]), flagged_categories=tuple(answer["flagged_categories"]),
        categories=categories, verdict=answer.get("verdict"),
    )


def from_scores(scores: Scores, role: str, model: str, thresholds: Thresholds,
                calibration: Calibration | None = None) -> Judgement:
    """Scores computed in process, flagged as the service flags them: each category's score
    (calibrated where a calibration is given) against its threshold."""
    from guardprob.core.decision import calibrated, flags

    flagged = flags({cid: c.p for cid, c in scores.categories.items()}, thresholds.values, calibration)
    categories = {cid: CategoryVerdict(cid, c.name, c.p, c.lower, c.upper, calibrated(cid, c.p, calibration),
                                       thresholds.values[cid], flagged[cid])
                  for cid, c in scores.categories.items()}
    flagged = tuple(cid for cid, c in categories.items() if c.flagged)
    return Judgement(
        role=role, model=model, method=scores.method, p_unsafe=scores.p_unsafe, p_unsafe_lower=scores.p_unsafe_lower,
        p_unsafe_upper=scores.p_unsafe_upper, flagged=bool(flagged), flagged_categories=flagged,
        categories=categories, verdict=scores.verdict,
    )
