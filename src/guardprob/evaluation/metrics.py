"""Multi-label and binary metrics, computed with scikit-learn's metric functions.

Arrays: ``y`` [n, k] of 0/1 labels, ``scores`` [n, k] of probabilities in [0, 1].
A category with no positive (or no negative) example has no AUC; it is named in
``Metrics.skipped_auc`` and left out of the macro averages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Metrics:
    """Overall metrics; ``per_category[id]`` holds f1, roc_auc, pr_auc, brier, support."""

    n: int
    micro_f1: float
    macro_f1: float
    hamming_loss: float
    micro_roc_auc: float
    macro_roc_auc: float
    micro_pr_auc: float
    macro_pr_auc: float
    brier: float
    ece: float
    per_category: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    skipped_auc: tuple[str, ...] = ()

    def row(self) -> dict[str, float]:
        return {
            "micro_f1": self.micro_f1, "macro_f1": self.macro_f1, "hamming": self.hamming_loss,
            "micro_roc_auc": self.micro_roc_auc, "macro_roc_auc": self.macro_roc_auc,
            "micro_pr_auc": self.micro_pr_auc, "macro_pr_auc": self.macro_pr_auc,
            "brier": self.brier, "ece": self.ece,
        }


@dataclass(frozen=True)
class BinaryMetrics:
    """The safe/unsafe decision: y [n] (1 = unsafe), scored by P(unsafe)."""

    n: int
    f1: float
    roc_auc: float
    pr_auc: float
    brier: float
    ece: float

    def row(self) -> dict[str, float]:
        return {"binary_f1": self.f1, "binary_roc_auc": self.roc_auc, "binary_pr_auc": self.pr_auc, "binary_brier": self.brier}


def predict(scores: np.ndarray, thresholds: float | np.ndarray = 0.5) -> np.ndarray:
    """[n, k] scores -> [n, k] int predictions: score >= threshold (one per column or shared)."""
    return (np.asarray(scores) >= np.asarray(thresholds)).astype(int)


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Weighted mean |accuracy - confidence| over equal-width probability bins (flattened).

    scikit-learn has no ECE; its calibration_curve gives the per-bin means but not the bin
    weights, so the weights come from a histogram with the same bin edges.
    """
    y, p = np.ravel(y).astype(float), np.clip(np.ravel(p).astype(float), 0.0, 1.0)
    if y.size == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=False), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.sum() / y.size * abs(y[mask].mean() - p[mask].mean())
    return float(total)


def _has_both(column: np.ndarray) -> bool:
    return 0 < column.sum() < column.size


def multilabel_metrics(y: np.ndarray, scores: np.ndarray, ids: Sequence[str], thresholds: float | np.ndarray = 0.5) -> Metrics:
    """Micro/macro F1 at ``thresholds``, Hamming loss, micro/macro ROC-AUC and PR-AUC, Brier, ECE."""
    from sklearn.metrics import (
        average_precision_score,
        brier_score_loss,
        f1_score,
        hamming_loss,
        roc_auc_score,
    )

    y = np.asarray(y, dtype=int)
    scores = np.clip(np.asarray(scores, dtype=float), 0.0, 1.0)
    pred = predict(scores, thresholds)
    valid = [j for j in range(y.shape[1]) if _has_both(y[:, j])]
    skipped = tuple(ids[j] for j in range(y.shape[1]) if j not in valid)
    nan = float("nan")
    flat_ok = _has_both(y.ravel())
    per_category = {}
    for j, cid in enumerate(ids):
        ok = j in valid
        per_category[cid] = {
            "support": int(y[:, j].sum()),
            "f1": float(f1_score(y[:, j], pred[:, j], zero_division=0)),
            "roc_auc": float(roc_auc_score(y[:, j], scores[:, j])) if ok else nan,
            "pr_auc": float(average_precision_score(y[:, j], scores[:, j])) if ok else nan,
            "brier": float(brier_score_loss(y[:, j], scores[:, j], labels=[0, 1])),
        }
    return Metrics(
        n=int(y.shape[0]),
        micro_f1=float(f1_score(y, pred, average="micro", zero_division=0)),
        macro_f1=float(f1_score(y, pred, average="macro", zero_division=0)),
        hamming_loss=float(hamming_loss(y, pred)),
        micro_roc_auc=float(roc_auc_score(y.ravel(), scores.ravel())) if flat_ok else nan,
        macro_roc_auc=float(roc_auc_score(y[:, valid], scores[:, valid], average="macro")) if valid else nan,
        micro_pr_auc=float(average_precision_score(y.ravel(), scores.ravel())) if flat_ok else nan,
        macro_pr_auc=float(average_precision_score(y[:, valid], scores[:, valid], average="macro")) if valid else nan,
        brier=float(brier_score_loss(y.ravel(), scores.ravel(), labels=[0, 1])),
        ece=expected_calibration_error(y, scores),
        per_category=per_category,
        skipped_auc=skipped,
    )


def binary_metrics(y: np.ndarray, p_unsafe: np.ndarray, threshold: float = 0.5) -> BinaryMetrics | None:
    """Safe/unsafe metrics, or None when the data holds only one class."""
    from sklearn.metrics import average_precision_score, brier_score_loss, f1_score, roc_auc_score

    y = np.asarray(y, dtype=int)
    p = np.clip(np.asarray(p_unsafe, dtype=float), 0.0, 1.0)
    if not _has_both(y):
        return None
    return BinaryMetrics(
        n=int(y.size),
        f1=float(f1_score(y, (p >= threshold).astype(int), zero_division=0)),
        roc_auc=float(roc_auc_score(y, p)),
        pr_auc=float(average_precision_score(y, p)),
        brier=float(brier_score_loss(y, p)),
        ece=expected_calibration_error(y, p),
    )
