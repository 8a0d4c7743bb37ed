"""Engine settings every layer checks the same way (the spec, the server config, the engines
themselves), below all of them so that none imports another to check a number."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from guardprob.options.table import ENGINE, option

ENGINES = ("transformers", "openai", "llamacpp")  # the engines ClassifierSpec can build (backends/registry.py)


def check_cache_mb(value: Any, where: str = "cache_mb") -> float | None:
    """A prefix-cache budget in megabytes: a finite number >= 0 (0 turns the cache off), or
    None (the engine's default). The table's check (guardprob.options.table)."""
    value = option(ENGINE, "cache_mb").check(value, where)
    return None if value is None else float(value)


def check_prefill_chunk(value: Any, where: str = "prefill_chunk") -> int | None:
    """Prompt tokens per model call of a stepped prefill: a positive integer, or None (the
    engine's default). The table's check (guardprob.options.table)."""
    return option(ENGINE, "prefill_chunk").check(value, where)


def token_ids(value: int | Sequence[int] | None) -> list[int]:
    """An eos_token_id setting (one id, a list, or None) as a list."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
