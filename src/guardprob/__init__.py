"""guardprob: per-category probabilities from generative safety classifiers.

Token-level marginalization over the tree of verdicts (arXiv 2511.22312), exact with bounds.
Heavy dependencies (torch, transformers) load only when a model is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from guardprob import _moved
from guardprob.core.estimators import METHODS, estimate
from guardprob.core.tree import SearchConfig
from guardprob.errors import (
    BackendError,
    Cancelled,
    ContextLengthError,
    GrammarError,
    GuardprobError,
    GuardprobWarning,
    InputError,
    ModelLoadError,
    TaxonomyError,
    TemplateError,
)
from guardprob.formats.registry import load_taxonomy  # presets, files and the formats' own taxonomies
from guardprob.result import CategoryScore, Scores
from guardprob.taxonomy import PRESETS, Category, Taxonomy

if TYPE_CHECKING:
    from guardprob.classifier import Classifier

_moved.install()  # old module paths (before core/, inputs/, bench/) still import

__version__ = "0.1.0"

__all__ = [
    "METHODS", "PRESETS", "BackendError", "Cancelled", "Category", "CategoryScore", "Classifier", "ContextLengthError", "GrammarError",
    "GuardprobError", "GuardprobWarning", "InputError", "ModelLoadError", "Scores", "SearchConfig", "Taxonomy", "TaxonomyError",
    "TemplateError", "estimate", "load_taxonomy",
]


def __getattr__(name: str):
    if name == "Classifier":
        from guardprob.classifier import Classifier

        return Classifier
    raise AttributeError(f"module 'guardprob' has no attribute {name!r}")
