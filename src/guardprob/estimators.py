"""Pure functions from a searched tree to category scores (DESIGN.md section 3).

Every estimator reads the same tree, so one search serves all of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from guardprob.errors import InputError
from guardprob.measures import FirstWord, MeasureSet, Outcome, bounds, greedy_path, greedy_targets, greedy_verdict
from guardprob.result import CategoryScore, Scores
from guardprob.search import Node, Tree
from guardprob.taxonomy import Taxonomy

METHODS = ("greedy", "first_token", "conditional", "joint", "marginal")



def check_method(method: str) -> str:
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    return method


def check_groups(groups: Mapping[str, Sequence[str]] | None, taxonomy: Taxonomy) -> dict[str, tuple[str, ...]]:
    """Named unions of category ids, checked against the taxonomy."""
    if groups is None:
        return {}
    if not isinstance(groups, Mapping):
        raise InputError("groups must map a name to a list of category ids, e.g. {'violence': ['S1', 'S9']}")
    out = {}
    for name, members in groups.items():
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"group name {name!r}: use a non-empty string")
        if isinstance(members, str) or not isinstance(members, Sequence) or not members:
            raise InputError(f"group {name!r}: give a non-empty list of category ids, e.g. ['S1', 'S9']")
        unknown = [m for m in members if m not in taxonomy.ids]
        if unknown:
            raise InputError(f"group {name!r} names {unknown!r}, not ids of {taxonomy.name}; use {', '.join(taxonomy.ids)}")
        out[name] = tuple(dict.fromkeys(members))
    return out


def estimate(
    tree: Tree, method: str, taxonomy: Taxonomy, seconds: float = 0.0,
    groups: Mapping[str, Sequence[str]] | None = None,
) -> Scores:
    """The Scores of ``method`` read from a searched tree; ``groups`` adds named unions."""
    check_method(method)
    groups = check_groups(groups, taxonomy)
    grammar = tree.grammar
    ids = grammar.grammar.ids
    index = {c: i for i, c in enumerate(ids)}
    unsafe = len(ids)
    verdict = greedy_verdict(tree.root, grammar)
    in_greedy = set(verdict[1]) if verdict else set()
    # The marginal's measures (every category, unsafe, every group) serve every method's P(unsafe).
    outcomes = [Outcome(frozenset({i})) for i in range(len(ids))] + [Outcome(frozenset({unsafe}))]
    outcomes += [Outcome(frozenset(index[c] for c in members)) for members in groups.values()]
    low, up = bounds(tree.root, MeasureSet(grammar, outcomes, tree.config.constrained))
    unsafe_bounds = (float(low[unsafe]), float(up[unsafe]))
    group_low, group_up = low[unsafe + 1:], up[unsafe + 1:]
    if method == "marginal":
        values = {c: (low[i], low[i], up[i]) for i, c in enumerate(ids)}
        group_values = [(lo, lo, hi) for lo, hi in zip(group_low, group_up)]
    elif method != "first_token" and not _greedy_finished(tree):
        # stopped at a deadline before greedy decoding ended: its verdict, so every slot, is unknown
        values = {c: (0.0, 0.0, 1.0) for c in ids}
        group_values = [(0.0, 0.0, 1.0)] * len(groups)
    elif method == "greedy":
        values = {c: (float(c in in_greedy),) * 3 for c in ids}
        group_values = [(float(any(c in in_greedy for c in m)),) * 3 for m in groups.values()]
    else:
        values = _greedy_path_values(tree, method)
        group_values = [_largest(values, members) for members in groups.values()]
    categories = {c: CategoryScore(c, taxonomy[c].name, *map(float, v)) for c, v in values.items()}
    group_scores = {
        name: CategoryScore(name, ",".join(members), *map(float, v)) for (name, members), v in zip(groups.items(), group_values)
    }
    unexplored, invalid = _leftover(tree.root)
    return Scores(
        method=method,
        taxonomy=taxonomy.name,
        p_unsafe=unsafe_bounds[0],
        categories=categories,
        verdict=_verdict_text(verdict),
        unexplored_mass=unexplored,
        invalid_mass=invalid,
        expanded_nodes=tree.expanded_nodes,
        model_calls=tree.model_calls,
        truncated=tree.truncated,
        params=tree.config.as_dict(),
        seconds=seconds,
        p_unsafe_lower=unsafe_bounds[0],
        p_unsafe_upper=unsafe_bounds[1],
        groups=group_scores,
        complete=tree.complete,
    )


def _greedy_path_values(tree: Tree, method: str) -> dict[str, tuple[float, float, float]]:
    """first_token, conditional and joint: (p, lower, upper) per category from the method's targets."""
    ids = tree.grammar.grammar.ids
    values = {c: (0.0, 0.0, 0.0) for c in ids}
    for start, target in greedy_targets(tree.root, tree.grammar, (method,)):
        lo, hi = (float(x[0]) for x in bounds(start, MeasureSet(tree.grammar, [target], tree.config.constrained)))
        if isinstance(target, FirstWord):  # P(unsafe) as the first word, for every category
            return {c: (lo, lo, hi) for c in ids}
        if method == "conditional":
            lo, hi = lo / start.mass, min(1.0, hi / start.mass)
        values[target.category] = (lo, lo, hi)
    return values


def _greedy_finished(tree: Tree) -> bool:
    last = greedy_path(tree.root)[-1]
    return last.expanded and last.greedy_child is None


def _largest(values: dict[str, tuple[float, float, float]], members: Sequence[str]) -> tuple[float, float, float]:
    """A group under a slot estimator: its largest member's score (a union has no slot)."""
    return tuple(max(values[c][i] for c in members) for i in range(3))


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
