"""Pure functions from a searched tree to category scores (DESIGN.md section 3).

Every estimator reads the same tree, so one search serves all of them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from guardprob.errors import InputError
from guardprob.grammar import ParserState, VerdictGrammar
from guardprob.result import CategoryScore, Scores
from guardprob.search import Node, Tree
from guardprob.taxonomy import Taxonomy

METHODS = ("greedy", "first_token", "conditional", "joint", "marginal")

Flags = Callable[[ParserState], tuple[np.ndarray, np.ndarray]]
Ends = Callable[[ParserState], np.ndarray]


def check_method(method: str) -> str:
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    return method


def subtree_bounds(node: Node, flags: Flags, ends: Ends, constrained: bool, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds on the mass below ``node`` of each outcome.

    flags(state) -> (committed, possible) boolean [size]; ends(state) -> [size] indicator of
    the verdict written by ending at ``state``. Unexpanded nodes count fully where committed
    (lower, constrained mode only: unconstrained mass may still leave the grammar) and where
    possible (upper); unreported mass counts like an unexpanded node.
    """
    lower = np.zeros(size)
    upper = np.zeros(size)
    stack = [node]
    while stack:
        n = stack.pop()
        if n.expanded:
            if n.end_mass:
                hit = n.end_mass * ends(n.state)
                lower += hit
                upper += hit
            stack.extend(n.children)
        # mass not followed further: an unexpanded node's, or what the engine left unreported
        pending = n.remainder if n.expanded else n.mass
        if pending:
            committed, possible = flags(n.state)
            if constrained:  # every grammar continuation keeps what this node committed
                lower += pending * committed
            upper += pending * possible
    return lower, upper


def greedy_path(tree: Tree) -> list[Node]:
    path = [tree.root]
    while path[-1].greedy_child is not None:
        path.append(path[-1].greedy_child)
    return path


def greedy_verdict(tree: Tree) -> tuple[bool, tuple[str, ...]] | None:
    """(unsafe, ids) of the greedy path, or None if greedy decoding leaves the grammar."""
    last = greedy_path(tree)[-1]
    if last.greedy != "end":
        return None
    verdict = tree.grammar.grammar.verdict(last.state)
    return verdict.unsafe, verdict.ids


def _marginal_bounds(tree: Tree) -> tuple[np.ndarray, np.ndarray]:
    """Bounds over ``ids + (unsafe,)``."""
    grammar = tree.grammar.grammar
    size = len(grammar.ids) + 1
    index = {c: i for i, c in enumerate(grammar.ids)}

    def ends(state: ParserState) -> np.ndarray:
        out = np.zeros(size)
        verdict = grammar.verdict(state)
        out[size - 1] = verdict.unsafe
        for c in verdict.ids:
            out[index[c]] = 1.0
        return out

    return subtree_bounds(tree.root, grammar.flags, ends, tree.config.constrained, size)


def _slot_start(path: list[Node], slot: int) -> Node:
    """The deepest greedy node at which the id in position ``slot`` has not begun.

    A node's forced tokens carry its whole mass, so a slot that starts inside them starts
    at that node: test the state before the forced tokens.
    """
    start = path[0]
    for node in path:
        s = node.entry
        if not s.in_ids or len(s.ids) < slot or (len(s.ids) == slot and s.buffer == ""):
            start = node
    return start


def _slot_bounds(tree: Tree, node: Node, slot: int) -> tuple[np.ndarray, np.ndarray]:
    """Bounds over ids of the mass below ``node`` whose id in position ``slot`` is each id."""
    grammar: VerdictGrammar = tree.grammar.grammar
    size = len(grammar.ids)
    index = {c: i for i, c in enumerate(grammar.ids)}

    def flags(state: ParserState) -> tuple[np.ndarray, np.ndarray]:
        committed = np.zeros(size, dtype=bool)
        decided = grammar.slot_id(state, slot)
        if decided is not None:
            committed[index[decided]] = True
            return committed, committed
        possible = np.ones(size, dtype=bool)
        if state.in_ids:
            for c in state.ids[:slot]:
                possible[index[c]] = False
        return committed, possible

    def ends(state: ParserState) -> np.ndarray:
        out = np.zeros(size)
        ids = grammar.verdict(state).ids
        if len(ids) > slot:
            out[index[ids[slot]]] = 1.0
        return out

    return subtree_bounds(node, flags, ends, tree.config.constrained, size)


def estimate(tree: Tree, method: str, taxonomy: Taxonomy, seconds: float = 0.0) -> Scores:
    """The Scores of ``method`` read from a searched tree."""
    check_method(method)
    grammar = tree.grammar.grammar
    ids = grammar.ids
    m_low, m_up = _marginal_bounds(tree)
    p_unsafe = float(m_low[-1])
    verdict = greedy_verdict(tree)
    in_greedy = set(verdict[1]) if verdict else set()
    bounds: dict[str, tuple[float, float, float]] = {}
    if method == "marginal":
        bounds = {c: (m_low[i], m_low[i], m_up[i]) for i, c in enumerate(ids)}
    elif method == "first_token":
        bounds = {c: (p_unsafe, p_unsafe, float(m_up[-1])) for c in ids}
    elif method == "greedy":
        bounds = {c: (float(c in in_greedy),) * 3 for c in ids}
    else:
        path = greedy_path(tree)
        bounds = {c: (0.0, 0.0, 0.0) for c in ids}
        for slot, category in enumerate(verdict[1] if verdict else ()):
            start = _slot_start(path, slot)
            low, up = _slot_bounds(tree, start, slot)
            k = ids.index(category)
            scale = 1.0 / start.mass if method == "conditional" else 1.0
            bounds[category] = (low[k] * scale, low[k] * scale, min(1.0, up[k] * scale))
    categories = {
        c: CategoryScore(c, taxonomy[c].name, float(p), float(lo), float(hi)) for c, (p, lo, hi) in bounds.items()
    }
    unexplored, invalid = _leftover(tree.root)
    return Scores(
        method=method,
        taxonomy=taxonomy.name,
        p_unsafe=p_unsafe,
        categories=categories,
        verdict=_verdict_text(verdict),
        unexplored_mass=unexplored,
        invalid_mass=invalid,
        expanded_nodes=tree.expanded_nodes,
        model_calls=tree.model_calls,
        truncated=tree.truncated,
        params=tree.config.as_dict(),
        seconds=seconds,
    )


def _verdict_text(verdict: tuple[bool, tuple[str, ...]] | None) -> str | None:
    if verdict is None:
        return None
    unsafe, ids = verdict
    return "unsafe\n" + ",".join(ids) if unsafe else "safe"


def _leftover(root: Node) -> tuple[float, float]:
    """(unexplored, invalid) mass of the tree."""
    unexplored = invalid = 0.0
    stack = [root]
    while stack:
        n = stack.pop()
        invalid += n.invalid
        if n.expanded:
            unexplored += n.remainder
            stack.extend(n.children)
        else:
            unexplored += n.mass
    return unexplored, invalid
