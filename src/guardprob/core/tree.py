"""The values a search works on: its settings (``SearchConfig``), the nodes of the verdict tree
(``Node``) and a searched tree with what it cost (``Tree``). Below the search, so the modules
that read trees (measures, decisions, estimators, the first-id walk) need not import it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from guardprob.core.grammar import ParserState, TokenGrammar
from guardprob.errors import InputError
from guardprob.options.table import SEARCH, group

GREEDY_PATH_METHODS = ("first_token", "conditional", "joint")  # estimators read below the greedy path
SEARCH_OPTIONS = group(SEARCH)
_DEFAULT = {o.attr: o.default for o in SEARCH_OPTIONS}


@dataclass(frozen=True)
class SearchConfig:
    """How far to walk the tree.

    eps: children below this mass are not expanded. top_p: only the children inside the
    parent's top-p nucleus are expanded. max_nodes: model-evaluated nodes per prompt.
    max_depth: longest path (tokens) expanded. tolerance: stop once the expandable
    frontier holds at most this mass. batch: nodes per prompt per model call.
    constrained: renormalise over grammar tokens (else the rest is reported as invalid).
    speculate: evaluate the children of a node with at most this many grammar tokens in the
    node's own call. prior: with each node, ask the descendants that recent searches expanded
    and whose expected mass reaches eps / prior (needs a TreePrior; larger guesses more; 0:
    off). Neither changes the result. exact_greedy: the greedy-path estimators to make exact
    ("first_token", "conditional", "joint"): once the greedy path is known, also expand,
    whatever eps and top_p say, every node that can still change them (the first word; each
    greedy id in its slot), so that they are exact unless max_nodes, max_depth or tolerance
    cut the search. first_id: also walk the prefill baselines' first-id tree (prefill.py), with
    this eps relative to the arrival node (None: off): the prefill path, then every node below
    it whose share reaches first_id and whose first label is open, expanded whatever eps,
    top_p, max_nodes, max_depth and tolerance say (as the greedy path is); the arrival node's
    raw logits are kept on the tree (``Tree.first_logits``, for LogTokU).
    With eps=0, top_p=1 and no limits the search is exhaustive and exact.
    """

    # defaults and ranges: guardprob.options.table
    eps: float = _DEFAULT["eps"]
    top_p: float = _DEFAULT["top_p"]
    max_nodes: int | None = _DEFAULT["max_nodes"]
    max_depth: int | None = _DEFAULT["max_depth"]
    tolerance: float = _DEFAULT["tolerance"]
    batch: int = _DEFAULT["batch"]
    constrained: bool = _DEFAULT["constrained"]
    speculate: int = _DEFAULT["speculate"]
    prior: float = _DEFAULT["prior"]
    exact_greedy: tuple[str, ...] = ()
    first_id: float | None = None

    def __post_init__(self) -> None:
        for option in SEARCH_OPTIONS:  # the table's range checks (guardprob.options.table)
            option.check(getattr(self, option.attr))
        if not (isinstance(self.exact_greedy, tuple) and set(self.exact_greedy) <= set(GREEDY_PATH_METHODS)):
            raise InputError(f"exact_greedy={self.exact_greedy!r}: use a tuple of {', '.join(GREEDY_PATH_METHODS)}")
        if self.first_id is not None and not (
            isinstance(self.first_id, (int, float)) and not isinstance(self.first_id, bool) and 0 <= self.first_id <= 1
        ):
            raise InputError(f"first_id={self.first_id!r}: use a share between 0 and 1, or None for no first-id walk")

    def as_dict(self) -> dict:
        return asdict(self)


class Node:
    """A token path after the prompt. Forced tokens are folded into the path."""

    __slots__ = (
        "path", "mass", "state", "entry", "on_greedy", "children", "end_mass",
        "remainder", "invalid", "expanded", "greedy", "greedy_child", "parent", "queued", "waiting",
    )

    def __init__(self, path: tuple[int, ...], mass: float, state: ParserState, on_greedy: bool, parent: Node | None = None):
        self.path = path
        self.parent = parent
        self.queued = 0  # children waiting in the frontier or still holding queued descendants; -1 once retired
        self.waiting = False  # in the frontier
        self.mass = mass
        self.state = state
        self.entry = state  # the state before forced tokens were folded in (same mass)
        self.on_greedy = on_greedy
        self.children: list[Node] = []
        self.end_mass = 0.0  # mass that ends the verdict right here (EOS)
        self.remainder = 0.0  # mass of grammar tokens the engine did not report (open, like an unexpanded node)
        self.invalid = 0.0  # mass that leaves the grammar (unconstrained mode, or a dead end)
        self.expanded = False
        self.greedy = ""  # on the greedy path: "child", "end" or "invalid" once expanded
        self.greedy_child: Node | None = None

    @property
    def depth(self) -> int:
        return len(self.path)

    def __repr__(self) -> str:
        return f"Node(path={self.path}, mass={self.mass:.4g}, state={self.state})"


@dataclass(frozen=True)
class Tree:
    """A searched tree and what it cost. ``root`` is the node of the empty path."""

    root: Node
    grammar: TokenGrammar
    config: SearchConfig
    expanded_nodes: int
    model_calls: int
    truncated: bool  # an engine answered with top-k log-probabilities only
    complete: bool = True  # False: stopped before its stop rules (a deadline); the bounds still hold
    # [n_tokens] raw logits of the grammar tokens at the first-id walk's arrival node (config.first_id),
    # None where the walk did not ask the model there or the engine reports no logits
    first_logits: np.ndarray | None = field(default=None, compare=False)
