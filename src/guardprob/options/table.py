"""Every scoring option, declared once: its name, type, default, range, help and group.

The CLI flags of ``guardprob score``, ``bench`` and ``eval`` (commands/options.py), the request
fields of the service (server/schemas.py), the evaluation API's ``params`` (evaluation/api.py)
and the range checks of ``SearchConfig`` and ``TraceConfig`` are all read from ``OPTIONS``;
an option's error always names it and says what to give instead (``check``).

A leaf module: it imports nothing of guardprob but its errors, so every layer may read it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from guardprob.errors import InputError

SEARCH, TRACE, DECISION = "search", "trace", "decision"
GROUPS = (SEARCH, TRACE, DECISION)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float))


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Option:
    """One scoring option.

    name: the keyword (``Classifier.score(eps=...)``, the request field, the ``params`` key).
    type: its Python type (``int | None`` where None means no limit). default: its value when
    not given. valid: the check a value passes. fix: what to give instead, in the error.
    range: the range or choices, as the docs and help read it. help: one line. group: search,
    trace or decision. flag: its CLI flag (None: not a flag). metavar: the flag's value name.
    none: what None means (None: None is not a value of it). fills: the name of the dataclass
    field it fills where that differs (``reasoning_tokens`` is ``TraceConfig.max_tokens``).
    request: whether the service takes it per request; bounds: pydantic bounds the service
    puts on the request field (a per-request cap, not the option's range).
    """

    name: str
    type: type | Any
    default: Any
    valid: Callable[[Any], bool]
    fix: str
    range: str
    help: str
    group: str
    flag: str | None = None
    metavar: str | None = None
    none: str | None = None
    fills: str | None = None
    request: bool = False
    bounds: Mapping[str, Any] = field(default_factory=dict)

    @property
    def attr(self) -> str:
        """The dataclass field it fills (SearchConfig, TraceConfig)."""
        return self.fills or self.name

    @property
    def dest(self) -> str:
        """The argparse destination of its flag."""
        return (self.flag or "").lstrip("-").replace("-", "_")

    def check(self, value: Any) -> Any:
        """``value``, or an InputError naming the option and the fix."""
        if value is None and self.none is not None:
            return value
        if not self.valid(value):
            raise InputError(f"{self.name}={value!r}: {self.fix}")
        return value

    def default_text(self) -> str:
        """The default as help text shows it."""
        if self.default is None:
            return f"none: {self.none}" if self.none else "none"
        if isinstance(self.default, bool):
            return str(self.default).lower()
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)


OPTIONS: tuple[Option, ...] = (
    # -- search (core.tree.SearchConfig) ------------------------------------------------
    Option("eps", float, 1e-3, lambda v: _number(v) and 0 <= v <= 1,
           "use a mass between 0 and 1 (0 expands everything)", "[0, 1]",
           "do not expand children below this mass", SEARCH, "--eps", request=True),
    Option("top_p", float, 1.0, lambda v: _number(v) and 0 < v <= 1,
           "use a value in (0, 1] (1 keeps every child)", "(0, 1]",
           "expand only each node's top-p nucleus", SEARCH, "--top-p", request=True),
    Option("max_nodes", int, 2048, lambda v: _integer(v) and v >= 1,
           "use a positive integer, or None for no limit", ">= 1 or none",
           "model-evaluated nodes per example", SEARCH, "--max-nodes", "N|none", none="no limit", request=True),
    Option("max_depth", int, None, lambda v: _integer(v) and v >= 1,
           "use a positive integer, or None for no limit", ">= 1 or none",
           "longest token path expanded", SEARCH, "--max-depth", "N|none", none="no limit", request=True),
    Option("tolerance", float, 0.0, lambda v: _number(v) and 0 <= v < 1,
           "use a mass in [0, 1)", "[0, 1)", "stop once the open frontier holds at most this mass", SEARCH),
    Option("batch", int, 64, lambda v: isinstance(v, int) and v >= 1,
           "use a positive integer", ">= 1", "nodes per prompt per model call", SEARCH),
    Option("constrained", bool, True, lambda v: isinstance(v, bool),
           "use true or false", "true, false",
           "renormalise over grammar tokens; off (--unconstrained): raw softmax, and the mass outside the grammar "
           "is reported as invalid", SEARCH, "--unconstrained"),
    Option("speculate", int, 1, lambda v: isinstance(v, int) and v >= 0,
           "use a number of grammar tokens >= 0 (0 turns speculation off)", ">= 0",
           "evaluate the children of nodes with at most N grammar tokens in the node's own call (0: off)",
           SEARCH, "--speculate", "N"),
    Option("prior", float, 2.0, lambda v: _number(v) and 0 <= v < math.inf,
           "use a number >= 0 (how boldly to guess from earlier searches; 0 turns it off)", ">= 0",
           "with each node, also ask the descendants that recent searches expanded and whose expected mass "
           "reaches eps/B (transformers engine; 0: off)", SEARCH, "--prior", "B"),
    # -- trace (core.reasoning.TraceConfig): formats that reason before the verdict ------
    Option("traces", int, 0, lambda v: _integer(v) and v >= 0,
           "use 0 (the greedy reasoning) or a number of sampled traces", ">= 0",
           "average over N reasoning traces sampled from the model, with standard errors (0: the verdict "
           "scored exactly given the greedy reasoning)", TRACE, "--traces", "N", request=True,
           bounds={"ge": 0, "le": 16}),
    Option("temperature", float, 1.0, lambda v: _number(v) and 0 < v < math.inf,
           "use a number > 0 (1 samples the model as it is)", "> 0",
           "sampling temperature of the traces", TRACE, "--temperature", request=True),
    Option("seed", int, None, _integer, "use an integer, or None", "an integer",
           "seed of the sampled traces", TRACE, "--trace-seed", none="fresh randomness", request=True),
    Option("reasoning_tokens", int, None, lambda v: _integer(v) and v >= 1,
           "use a positive number of tokens", ">= 1",
           "close a trace after N tokens", TRACE, "--reasoning-tokens", "N", none="the format's budget",
           fills="max_tokens", request=True),
    # -- decision ------------------------------------------------------------------------
    Option("decide", bool, False, lambda v: isinstance(v, bool), "use true or false", "true, false",
           "stop once every category's interval lies on one side of its threshold", DECISION, request=True),
)

BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}


def group(name: str) -> tuple[Option, ...]:
    """The options of one group (search, trace, decision)."""
    if name not in GROUPS:
        raise InputError(f"option group {name!r}: use one of {', '.join(GROUPS)}")
    return tuple(o for o in OPTIONS if o.group == name)


def defaults(name: str) -> dict[str, Any]:
    """A group's defaults, by option name."""
    return {o.name: o.default for o in group(name)}


def check(name: str, value: Any) -> Any:
    """``value`` if it is one of option ``name``'s, else an InputError that names it and the fix."""
    return BY_NAME[name].check(value)


def check_params(params: Mapping[str, Any], groups: Iterable[str] = (SEARCH, TRACE), where: str = "params") -> dict:
    """Scoring keyword arguments (``params``) checked against the table: every key an option of
    ``groups``, every value in its range. A copy of them."""
    known = {o.name: o for g in groups for o in group(g)}
    if not isinstance(params, Mapping):
        raise InputError(f"{where}={params!r}: give a mapping of option name to value, e.g. {{'eps': 0.001}}")
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise InputError(f"{where}: unknown option(s) {', '.join(map(str, unknown))}; use {', '.join(known)}")
    return {k: known[k].check(v) for k, v in params.items()}
