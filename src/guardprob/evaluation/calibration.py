"""Per-category calibrators and F1-maximising thresholds, fitted on the development part only.

The saved file (JSON) is what ``score`` and the server load with ``load_calibration``:

    {"version": 1, "method": "marginal", "taxonomy": "llama-guard-3", "model": "...",
     "kind": "isotonic", "thresholds": {"S1": 0.31, ...},
     "calibrators": {"S1": {"kind": "isotonic", "x": [...], "y": [...]}, "S2": {"kind": "temperature", "temperature": 1.7}}}

Thresholds apply to the calibrated probability: ``calibrate(id, p) >= thresholds[id]``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from guardprob.errors import InputError

KINDS = ("isotonic", "temperature", "none")
_EPS = 1e-6


@dataclass(frozen=True)
class Calibrator:
    """One category's map from a raw score to a calibrated probability."""

    kind: str = "none"
    temperature: float = 1.0
    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()

    def __call__(self, p: float | np.ndarray) -> np.ndarray:
        p = np.clip(np.asarray(p, dtype=float), 0.0, 1.0)
        if self.kind == "temperature":
            logit = np.log(np.clip(p, _EPS, 1 - _EPS)) - np.log1p(-np.clip(p, _EPS, 1 - _EPS))
            return 1.0 / (1.0 + np.exp(-logit / self.temperature))
        if self.kind == "isotonic" and self.x:
            return np.interp(p, self.x, self.y)
        return p

    def as_dict(self) -> dict:
        if self.kind == "temperature":
            return {"kind": "temperature", "temperature": self.temperature}
        if self.kind == "isotonic":
            return {"kind": "isotonic", "x": list(self.x), "y": list(self.y)}
        return {"kind": "none"}


@dataclass(frozen=True)
class Calibration:
    """Thresholds and calibrators per category id (what ``load_calibration`` returns)."""

    thresholds: Mapping[str, float]
    calibrators: Mapping[str, Calibrator] = field(default_factory=dict)
    method: str = ""
    taxonomy: str = ""
    model: str = ""
    kind: str = "none"

    def calibrate(self, category_id: str, p: float) -> float:
        """The calibrated probability of a raw score (unchanged for an id without a calibrator)."""
        calibrator = self.calibrators.get(category_id)
        return float(calibrator(p)) if calibrator is not None else float(p)

    def calibrate_all(self, scores: np.ndarray, ids: Sequence[str]) -> np.ndarray:
        """[n, k] raw scores -> [n, k] calibrated, columns in ``ids`` order."""
        out = np.array(scores, dtype=float, copy=True)
        for j, cid in enumerate(ids):
            if cid in self.calibrators:
                out[:, j] = self.calibrators[cid](out[:, j])
        return out

    def flagged(self, probabilities: Mapping[str, float]) -> list[str]:
        """The ids whose calibrated probability reaches their threshold."""
        return [cid for cid, p in probabilities.items() if self.calibrate(cid, p) >= self.thresholds.get(cid, 0.5)]

    def as_dict(self) -> dict:
        return {
            "version": 1, "method": self.method, "taxonomy": self.taxonomy, "model": self.model, "kind": self.kind,
            "thresholds": dict(self.thresholds),
            "calibrators": {cid: c.as_dict() for cid, c in self.calibrators.items()},
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n", encoding="utf-8")
        return path


def load_calibration(path: str | Path) -> Calibration:
    """Read a calibration file written by ``guardprob eval`` (calibration-<method>.json)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"calibration file {path} does not exist; run `guardprob eval` to write one")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"calibration file {path} is not valid JSON ({exc.msg}); write it with `guardprob eval`") from None
    if not isinstance(data, dict) or data.get("version") != 1 or not isinstance(data.get("thresholds"), dict):
        raise InputError(f"calibration file {path} is not a version-1 guardprob calibration file; write it with `guardprob eval`")
    calibrators = {}
    for cid, raw in (data.get("calibrators") or {}).items():
        kind = raw.get("kind") if isinstance(raw, dict) else None
        if kind not in KINDS:
            raise InputError(f"calibration file {path}: category {cid!r} has calibrator kind {kind!r}; use one of {', '.join(KINDS)}")
        calibrators[cid] = Calibrator(
            kind, float(raw.get("temperature", 1.0)), tuple(map(float, raw.get("x", ()))), tuple(map(float, raw.get("y", ())))
        )
    thresholds = {str(k): float(v) for k, v in data["thresholds"].items()}
    return Calibration(thresholds, calibrators, data.get("method", ""), data.get("taxonomy", ""), data.get("model", ""), data.get("kind", "none"))


# -- fitting ------------------------------------------------------------------------------
def fit_calibrator(y: np.ndarray, p: np.ndarray, kind: str) -> Calibrator:
    """Fit one category's calibrator on development labels y [n] and scores p [n].

    temperature: logistic regression without intercept on logit(p) (coefficient 1/T);
    isotonic: scikit-learn's IsotonicRegression, stored as its breakpoints.
    With a single class in ``y`` nothing can be learned and the identity is returned.
    """
    if kind not in KINDS:
        raise InputError(f"unknown calibration {kind!r}; use one of {', '.join(KINDS)}")
    y = np.asarray(y, dtype=int)
    p = np.clip(np.asarray(p, dtype=float), 0.0, 1.0)
    if kind == "none" or not 0 < y.sum() < y.size:
        return Calibrator()
    if kind == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, y)
        return Calibrator("isotonic", x=tuple(map(float, iso.X_thresholds_)), y=tuple(map(float, iso.y_thresholds_)))
    from sklearn.linear_model import LogisticRegression

    q = np.clip(p, _EPS, 1 - _EPS)
    logit = (np.log(q) - np.log1p(-q)).reshape(-1, 1)
    coef = float(LogisticRegression(fit_intercept=False, C=1e6).fit(logit, y).coef_[0, 0])
    temperature = 1.0 / coef if coef > 1e-3 else 1e3
    return Calibrator("temperature", temperature=temperature)


def fit_threshold(y: np.ndarray, p: np.ndarray, default: float = 0.5) -> float:
    """The score threshold that maximises F1 on (y [n], p [n]); ``default`` with no positive."""
    from sklearn.metrics import precision_recall_curve

    y = np.asarray(y, dtype=int)
    if y.sum() == 0:
        return default
    precision, recall, thresholds = precision_recall_curve(y, np.asarray(p, dtype=float))
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0
    return float(thresholds[best]) if len(thresholds) else default


def fit_calibration(
    y: np.ndarray, scores: np.ndarray, ids: Sequence[str], kind: str = "isotonic", **about: str
) -> Calibration:
    """Per-category calibrators, then F1-maximising thresholds on the calibrated scores.

    y, scores: [n, k] development labels and raw scores only; the test part never enters.
    """
    y = np.asarray(y, dtype=int)
    scores = np.asarray(scores, dtype=float)
    calibrators = {cid: fit_calibrator(y[:, j], scores[:, j], kind) for j, cid in enumerate(ids)}
    thresholds = {cid: fit_threshold(y[:, j], calibrators[cid](scores[:, j])) for j, cid in enumerate(ids)}
    thresholds = {cid: (t if math.isfinite(t) else 0.5) for cid, t in thresholds.items()}
    return Calibration(thresholds, calibrators, kind=kind, **about)
