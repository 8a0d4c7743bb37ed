"""Module paths of earlier releases that moved when the package was given its layers
(core/, inputs/, bench/, evaluation/): importing an old path still works for one release and
warns with the new one (CHANGELOG.md lists them)."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

MOVED = {
    **{f"guardprob.{name}": f"guardprob.core.{name}" for name in (
        "grammar", "search", "measures", "estimators", "decision", "prefill", "prior", "reasoning", "streaming", "runs")},
    **{f"guardprob.{name}": f"guardprob.inputs.{name}" for name in ("conversation", "reader", "controls", "datafile")},
    "guardprob.bench_decisions": "guardprob.bench.decisions",
    "guardprob.bench_streaming": "guardprob.bench.streaming",
    "guardprob.distributed": "guardprob.evaluation.distributed",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers an old path with the module at its new one (the same object, so classes and
    state are shared)."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there ({spec.name} will be removed in a "
                      "future release)", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        spec.loader_state = module.__spec__  # the import system overwrites it; exec_module puts it back
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = module.__spec__.loader_state


def install() -> None:
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModules())
