"""Engine settings every layer checks the same way (the spec, the server config, the engines
themselves), below all of them so that none imports another to check a number."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from guardprob.errors import InputError

ENGINES = ("transformers", "openai", "llamacpp")  # the engines ClassifierSpec can build (backends/registry.py)


def check_cache_mb(value: Any, where: str = "cache_mb") -> float:
    """A prefix-cache budget in megabytes: a finite number >= 0 (0 turns the cache off)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InputError(f"{where} is {value!r}; use a number of megabytes >= 0 for the prefix cache "
                         "(0 turns it off; leave it out for the default)")
    return float(value)


def check_prefill_chunk(value: Any, where: str = "prefill_chunk") -> int | None:
    """Prompt tokens per model call of a stepped prefill: a positive integer, or None (a
    prompt's whole prefill in one step)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InputError(f"{where} is {value!r}; use a positive number of prompt tokens per model call "
                         "(leave it out for the default)")
    return value


def token_ids(value: int | Sequence[int] | None) -> list[int]:
    """An eos_token_id setting (one id, a list, or None) as a list."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
