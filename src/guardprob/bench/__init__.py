"""``guardprob bench``'s measurements: the engine against the per-node baseline and the floor
(compare), certified decisions (decisions) and streaming moderation (streaming)."""

from __future__ import annotations

import importlib
import warnings
from typing import Any


def __getattr__(name: str) -> Any:
    # ``guardprob.bench`` was one module before; its names live in bench/compare.py now.
    compare = importlib.import_module("guardprob.bench.compare")
    if name.startswith("__") or not hasattr(compare, name):
        raise AttributeError(f"module 'guardprob.bench' has no attribute {name!r}")
    warnings.warn(f"guardprob.bench.{name} moved to guardprob.bench.compare.{name}; import it from there",
                  DeprecationWarning, stacklevel=2)
    return getattr(compare, name)
