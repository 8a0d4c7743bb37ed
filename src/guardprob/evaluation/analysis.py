"""From scored records to test-part metrics: split, fit on the development part, measure.

Everything fitted (calibrators, per-category thresholds, the selection baselines' switch
threshold) sees the development rows only; the test rows are measured before and after.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from guardprob.core.estimators import METHODS
from guardprob.errors import InputError
from guardprob.evaluation.baselines import SELECTION, fit_switch_threshold, selection_scores
from guardprob.evaluation.calibration import Calibration, fit_calibration
from guardprob.evaluation.metrics import BinaryMetrics, Metrics, binary_metrics, multilabel_metrics


@dataclass(frozen=True)
class Estimate:
    """One estimator's scores over all rows: scores [n, k], p_unsafe [n]; for the selection
    baselines also the first-id distribution probs [n, k] and uncertainty [n]."""

    name: str
    scores: np.ndarray
    p_unsafe: np.ndarray
    probs: np.ndarray | None = None
    uncertainty: np.ndarray | None = None


@dataclass(frozen=True)
class EstimatorResult:
    """Test-part metrics before (raw scores, threshold 0.5; selection: always top-1) and after
    fitting on the development part; test scores for the plots."""

    name: str
    before: Metrics
    after: Metrics
    binary: BinaryMetrics | None
    calibration: Calibration | None
    switch_threshold: float | None
    test_raw: np.ndarray
    test_calibrated: np.ndarray
    test_p_unsafe: np.ndarray


@dataclass(frozen=True)
class Analysis:
    ids: tuple[str, ...]
    dev: np.ndarray  # row numbers of the development part
    test: np.ndarray
    y_test: np.ndarray  # [n_test, k]
    results: dict[str, EstimatorResult]
    notes: tuple[str, ...]


def split(n: int, dev_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of row numbers 0..n-1 into (dev, test), both non-empty."""
    if not 0 < dev_fraction < 1:
        raise InputError(f"dev_fraction={dev_fraction!r}: use a fraction in (0, 1), e.g. 0.5")
    if n < 2:
        raise InputError(f"{n} example(s) cannot be split into development and test parts; give at least 2")
    from sklearn.model_selection import train_test_split

    dev, test = train_test_split(np.arange(n), train_size=dev_fraction, random_state=seed, shuffle=True)
    return np.sort(dev), np.sort(test)


def label_matrix(records: Sequence[dict], ids: Sequence[str]) -> np.ndarray:
    """[n, k] 0/1 labels of the records."""
    column = {cid: j for j, cid in enumerate(ids)}
    y = np.zeros((len(records), len(ids)), dtype=int)
    for i, r in enumerate(records):
        for label in r["labels"]:
            y[i, column[label]] = 1
    return y


def estimates(records: Sequence[dict], ids: Sequence[str], methods: Sequence[str]) -> list[Estimate]:
    """The score arrays of each requested method, read from the records."""
    def matrix(get) -> np.ndarray:
        return np.array([[float(get(r).get(cid, 0.0)) for cid in ids] for r in records], dtype=float).reshape(len(records), len(ids))

    out = []
    for m in methods:
        if m == "greedy":  # its safe/unsafe decision is the verdict itself
            verdicts = np.array([float(bool(r["scores"][m].get("verdict_unsafe"))) for r in records])
            out.append(Estimate(m, matrix(lambda r: r["scores"]["greedy"]["p"]), verdicts))
            continue
        if m in METHODS:
            out.append(Estimate(m, matrix(lambda r, m=m: r["scores"][m]["p"]), np.array([r["scores"][m]["p_unsafe"] for r in records])))
            continue
        probs = matrix(lambda r: r["first_id"]["p"])
        p_unsafe = np.array([r["scores"]["first_token"]["p_unsafe"] for r in records])
        if m == "prefill":
            out.append(Estimate(m, probs, p_unsafe))
            continue
        uncertainty = np.array([r["first_id"][m] for r in records], dtype=float)
        scores = selection_scores(probs, uncertainty, None, float("inf"))
        out.append(Estimate(m, scores, p_unsafe, probs, uncertainty))
    return out


def analyse(
    records: Sequence[dict],
    ids: Sequence[str],
    methods: Sequence[str],
    *,
    dev_fraction: float = 0.5,
    seed: int = 0,
    calibration: str = "isotonic",
    about: dict | None = None,
) -> Analysis:
    """Split, fit on the development part, and measure every method on the test part."""
    ids = tuple(ids)
    y = label_matrix(records, ids)
    dev, test = split(len(records), dev_fraction, seed)
    notes = []
    no_dev = [cid for j, cid in enumerate(ids) if y[dev, j].sum() == 0 and y[:, j].sum() > 0]
    if no_dev:
        notes.append(f"the development part has no positive example of {', '.join(no_dev)}: their thresholds stay at 0.5")
    results = {}
    for est in estimates(records, ids, methods):
        results[est.name] = _fit_and_measure(est, y, dev, test, ids, calibration, about or {})
    skipped = next(iter(results.values())).before.skipped_auc if results else ()
    if skipped:
        notes.append(f"the test part has no positive (or no negative) example of {', '.join(skipped)}: their AUC is skipped")
    if not (0 < y[test].any(axis=1).sum() < len(test)):
        notes.append("the test part holds only unsafe (or only safe) rows: no safe/unsafe binary metrics")
    return Analysis(ids, dev, test, y[test], results, tuple(notes))


def _fit_and_measure(est: Estimate, y, dev, test, ids, kind: str, about: dict) -> EstimatorResult:
    before = multilabel_metrics(y[test], est.scores[test], ids)
    if est.name in SELECTION:
        t = fit_switch_threshold(y[dev], est.probs[dev], est.uncertainty[dev])
        after_scores = selection_scores(est.probs[test], est.uncertainty[test], None, t)
        after = multilabel_metrics(y[test], after_scores, ids)
        binary = binary_metrics(y[test].any(axis=1), est.p_unsafe[test])
        return EstimatorResult(est.name, before, after, binary, None, t, est.scores[test], after_scores, est.p_unsafe[test])
    cal = fit_calibration(y[dev], est.scores[dev], ids, kind, method=est.name, **about)
    calibrated = cal.calibrate_all(est.scores[test], ids)
    thresholds = np.array([cal.thresholds[cid] for cid in ids])
    after = multilabel_metrics(y[test], calibrated, ids, thresholds)
    binary = binary_metrics(y[test].any(axis=1), est.p_unsafe[test])
    return EstimatorResult(est.name, before, after, binary, cal, None, est.scores[test], calibrated, est.p_unsafe[test])
