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
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from guardprob.core.estimators import METHODS
from guardprob.errors import InputError
from guardprob.evaluation.baselines import BASELINES, SELECTION
from guardprob.inputs.datafile import JSON_ERRORS, check_file, finite, json_reason, read_text, show

if TYPE_CHECKING:
    from guardprob.taxonomy import Taxonomy

KINDS = ("isotonic", "temperature", "none")
# The temperatures a calibrator may have: below, logit / T overflows into a hard 0 or 1 for every
# score; above, every score is 0.5 to many digits. A fit past them is clipped to them.
TEMPERATURES = (1e-3, 1e3)
_EPS = 1e-6
# The keys of a saved file, and each calibrator kind's own keys besides "kind".
_FILE_KEYS = ("version", "method", "taxonomy", "model", "kind", "thresholds", "calibrators")
_KIND_KEYS = {"isotonic": ("x", "y"), "temperature": ("temperature",), "none": ()}
_REFIT = "write the file again with `guardprob eval`"
# The methods a calibration is fitted for: the estimators and prefill (the selection baselines fit a switch).
_CALIBRATED = (*METHODS, *(b for b in BASELINES if b not in SELECTION))


@dataclass(frozen=True)
class Calibrator:
    """One category's map from a raw score to a calibrated probability.

    Checked when made, so that a bad file fails at load, not on every request later.
    ``name`` (not stored) names the calibrator in errors, e.g. "calibrators.S1".
    """

    kind: str = "none"
    temperature: float = 1.0
    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()
    name: InitVar[str] = "calibrator"

    def __post_init__(self, name: str) -> None:
        if self.kind not in KINDS:
            raise InputError(f"field '{name}.kind' is {show(self.kind)}; use one of {', '.join(KINDS)}")
        if self.kind == "temperature":
            t = finite(self.temperature)
            if t is None or not TEMPERATURES[0] <= t <= TEMPERATURES[1]:
                raise InputError(f"field '{name}.temperature' is {show(self.temperature)}; use a number between "
                                 f"{TEMPERATURES[0]:g} and {TEMPERATURES[1]:g} (1 leaves scores unchanged; past "
                                 "these a score is a hard 0 or 1 or a flat 0.5), or fit it again with `guardprob eval`")
            object.__setattr__(self, "temperature", t)
        if self.kind == "isotonic":
            x, y = _breakpoints(self.x, f"{name}.x"), _breakpoints(self.y, f"{name}.y")
            if not x or len(x) != len(y):
                raise InputError(f"field '{name}.x' has {len(x)} values but '{name}.y' has {len(y)}; "
                                 "give one y per x, at least one pair")
            step = next((i for i in range(1, len(x)) if x[i] < x[i - 1]), None)
            if step is not None:
                raise InputError(f"field '{name}.x' is not non-decreasing ({x[step - 1]} then {x[step]} at "
                                 f"position {step}); sort the breakpoints by x")
            for key, values, meaning in (("x", x, "raw scores"), ("y", y, "calibrated probabilities")):
                outside = next((v for v in values if not 0 <= v <= 1), None)
                if outside is not None:
                    raise InputError(f"field '{name}.{key}' holds {outside}; {meaning} lie between 0 and 1")
            down = next((i for i in range(1, len(y)) if y[i] < y[i - 1]), None)
            if down is not None:
                raise InputError(f"field '{name}.y' decreases ({y[down - 1]} then {y[down]} at position {down}); "
                                 "an isotonic calibrator never lowers a higher score: fit it again with `guardprob eval`")
            object.__setattr__(self, "x", x)
            object.__setattr__(self, "y", y)

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


def _breakpoints(values: object, name: str) -> tuple[float, ...]:
    """An isotonic calibrator's x or y: finite numbers."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise InputError(f"field '{name}' is {show(values)}; use a list of numbers")
    numbers = tuple(finite(v) for v in values)
    bad = next((i for i, v in enumerate(numbers) if v is None), None)
    if bad is not None:
        raise InputError(f"field '{name}' holds {show(values[bad])} at position {bad}; use finite numbers only")
    return numbers  # type: ignore[return-value]


@dataclass(frozen=True)
class Calibration:
    """Thresholds and calibrators per category id (what ``load_calibration`` returns).

    Checked whole when made: every threshold a finite probability, every calibrator valid.
    ``source`` names the file in errors and takes no part in equality.
    """

    thresholds: Mapping[str, float]
    calibrators: Mapping[str, Calibrator] = field(default_factory=dict)
    method: str = ""
    taxonomy: str = ""
    model: str = ""
    kind: str = "none"
    source: str = field(default="calibration", compare=False)

    def __post_init__(self) -> None:
        where = self.source
        if not isinstance(self.thresholds, Mapping):
            raise InputError(f"{where}: field 'thresholds' is {show(self.thresholds)}; use a mapping of category id "
                             f"to threshold; {_REFIT}")
        if not isinstance(self.calibrators, Mapping):
            raise InputError(f"{where}: field 'calibrators' is {show(self.calibrators)}; use a mapping of category id "
                             f"to calibrator; {_REFIT}")
        thresholds = {}
        for cid, value in self.thresholds.items():
            threshold = finite(value)
            if not isinstance(cid, str) or threshold is None or not 0 <= threshold <= 1:
                raise InputError(f"{where}: field 'thresholds.{cid}' is {show(value)}; use a probability between 0 "
                                 "and 1 (the calibrated score at which the category is flagged)")
            thresholds[cid] = threshold
        object.__setattr__(self, "thresholds", thresholds)
        for cid, calibrator in self.calibrators.items():
            if not isinstance(cid, str) or not isinstance(calibrator, Calibrator):
                raise InputError(f"{where}: field 'calibrators.{cid}' is {show(calibrator)}; use a Calibrator")
        if self.method != "" and self.method not in _CALIBRATED:
            raise InputError(f"{where}: field 'method' is {show(self.method)}; use one of {', '.join(_CALIBRATED)}")
        for name in ("taxonomy", "model"):
            if not isinstance(getattr(self, name), str):
                raise InputError(f"{where}: field {name!r} is {show(getattr(self, name))}; use text; {_REFIT}")
        if self.kind not in KINDS:
            raise InputError(f"{where}: field 'kind' is {show(self.kind)}; use one of {', '.join(KINDS)}")

    def check_taxonomy(self, taxonomy: Taxonomy) -> None:
        """Refuse a calibration that names ids the taxonomy lacks (fitted for another taxonomy)."""
        for name, ids in (("thresholds", self.thresholds), ("calibrators", self.calibrators)):
            unknown = [cid for cid in ids if cid not in taxonomy.ids]
            if unknown:
                raise InputError(
                    f"{self.source}: field '{name}.{unknown[0]}' names no category of taxonomy {taxonomy.name!r} "
                    f"({len(unknown)} unknown id(s): {', '.join(unknown[:5])}; the ids are {', '.join(taxonomy.ids)}); "
                    "use a calibration file fitted with this taxonomy, or pass the taxonomy it was fitted with"
                )

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
        """The ids whose calibrated probability reaches their threshold (0.5 where it has none)."""
        from guardprob.core.decision import flags  # the one flag rule

        return [cid for cid, flagged in flags(probabilities, self.thresholds, self, default=0.5).items() if flagged]

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


def load_calibration(path: str | Path, taxonomy: Taxonomy | None = None) -> Calibration:
    """Read a calibration file written by ``guardprob eval`` (calibration-<method>.json), checked
    whole; with ``taxonomy``, its ids must be the taxonomy's."""
    path = Path(path)
    where = f"calibration file {path}"
    check_file(path, "calibration file", InputError, "give a calibration-<method>.json file that `guardprob eval` "
               "wrote (run it to write one)")
    text = read_text(path, "calibration file", InputError)
    try:
        data = json.loads(text)
    except JSON_ERRORS as exc:
        raise InputError(f"{where} is not valid JSON ({json_reason(exc)}); {_REFIT}") from None
    version = data.get("version") if isinstance(data, dict) else None
    if isinstance(version, bool) or version != 1:
        raise InputError(f"{where} is not a version-1 guardprob calibration file; {_REFIT}")
    unknown = sorted(set(data) - set(_FILE_KEYS))
    if unknown:
        raise InputError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; a calibration file holds "
                         f"{', '.join(_FILE_KEYS)}; {_REFIT}")
    if not isinstance(data.get("thresholds"), dict):
        raise InputError(f"{where}: field 'thresholds' is {show(data.get('thresholds'))}; use a mapping of category "
                         f"id to threshold; {_REFIT}")
    raw = data.get("calibrators")
    if raw is not None and not isinstance(raw, dict):
        raise InputError(f"{where}: field 'calibrators' is {show(raw)}; use a mapping of category id to "
                         f"calibrator; {_REFIT}")
    try:
        calibrators = {cid: _calibrator(c, f"calibrators.{cid}") for cid, c in (raw or {}).items()}
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    about = {k: data.get(k, "") for k in ("method", "taxonomy", "model")}
    calibration = Calibration(data["thresholds"], calibrators, **about, kind=data.get("kind", "none"), source=where)
    if taxonomy is not None:
        calibration.check_taxonomy(taxonomy)
    return calibration


def _calibrator(raw: object, name: str) -> Calibrator:
    """One saved calibrator: a mapping with its kind and exactly that kind's keys."""
    if not isinstance(raw, dict):
        raise InputError(f"field '{name}' is {show(raw)}; use a mapping such as "
                         '{"kind": "temperature", "temperature": 1.7}')
    kind = raw.get("kind")
    if kind not in KINDS:
        raise InputError(f"field '{name}.kind' is {show(kind)}; use one of {', '.join(KINDS)}")
    own = _KIND_KEYS[kind]
    unknown = sorted(set(raw) - {"kind", *own})
    if unknown:
        raise InputError(f"field '{name}' has unknown key(s) {', '.join(map(repr, unknown))}; a {kind} calibrator "
                         f"holds {', '.join(('kind', *own))}")
    missing = [k for k in own if k not in raw]
    if missing:
        raise InputError(f"field '{name}.{missing[0]}' is missing; a {kind} calibrator needs {', '.join(own)}")
    values = {k: raw[k] for k in own}
    for key in ("x", "y"):
        if key in values:
            values[key] = _breakpoints(values[key], f"{name}.{key}")
    return Calibrator(kind, **values, name=name)


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
    temperature = 1.0 / coef if coef > 0 else TEMPERATURES[1]
    return Calibrator("temperature", temperature=min(max(temperature, TEMPERATURES[0]), TEMPERATURES[1]))


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
