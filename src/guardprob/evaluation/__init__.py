"""Evaluation: datasets, metrics, thresholds and calibration, baselines, reports.

``evaluate(...)`` is the entry point (also ``guardprob eval``); ``load_calibration(path)``
reads the thresholds and calibrators it saves. scikit-learn, matplotlib and tqdm load only
when used (the ``eval`` extra).
"""

from __future__ import annotations

from typing import Any

__all__ = ["evaluate", "load_calibration", "score_example_batch"]


def __getattr__(name: str) -> Any:
    if name == "evaluate":
        from guardprob.evaluation.api import evaluate

        return evaluate
    if name == "load_calibration":
        from guardprob.evaluation.calibration import load_calibration

        return load_calibration
    if name == "score_example_batch":
        from guardprob.evaluation.runner import score_example_batch

        return score_example_batch
    raise AttributeError(f"module 'guardprob.evaluation' has no attribute {name!r}")
