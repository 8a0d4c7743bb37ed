"""Pure functions from a searched tree to category scores (docs/design.md, section 3).

Every estimator reads the same tree, so one search serves all of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from guardprob.core.measures import (
    FirstWord,
    MeasureSet,
    Outcome,
    Slot,
    bounds,
    greedy_path,
    greedy_targets,
    greedy_verdict,
)
from guardprob.core.tree import Node, Tree
from guardprob.errors import InputError
from guardprob.formats.language import UNSAFE, Verdict
from guardprob.result import CategoryScore, Scores
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
    """The Scores of ``method`` read from a searched tree; ``groups`` adds named unions.

    Every category is an outcome of the format's language; the language's other outcomes
    (a field's value, such as ``safety=controversial``) are reported as ``fields``."""
    check_method(method)
    groups = check_groups(groups, taxonomy)
    language = tree.grammar.language
    index = language.index
    reported = [*taxonomy.ids, *(o for o in language.outcomes if o != UNSAFE and o not in taxonomy.ids)]
    verdict = greedy_verdict(tree.root, tree.grammar)
    said = verdict.outcomes if verdict else frozenset()
    # The marginal's measures (every outcome, unsafe, every group) serve every method's P(unsafe).
    outcomes = [Outcome(frozenset({index[o]})) for o in reported] + [Outcome(frozenset({language.unsafe}))]
    outcomes += [Outcome(frozenset(index[c] for c in members)) for members in groups.values()]
    low, up = bounds(tree.root, MeasureSet(tree.grammar, outcomes, tree.config.constrained))
    n = len(reported)
    unsafe_bounds = (float(low[n]), float(up[n]))
    group_low, group_up = low[n + 1:], up[n + 1:]
    if method == "marginal":
        values = {o: (low[i], low[i], up[i]) for i, o in enumerate(reported)}
        group_values = [(lo, lo, hi) for lo, hi in zip(group_low, group_up)]
    elif method != "first_token" and not _greedy_finished(tree):
        # stopped at a deadline before greedy decoding ended: its verdict, so every slot, is unknown
        values = {o: (0.0, 0.0, 1.0) for o in reported}
        group_values = [(0.0, 0.0, 1.0)] * len(groups)
    elif method == "greedy":
        values = {o: (float(o in said),) * 3 for o in reported}
        group_values = [(float(any(c in said for c in m)),) * 3 for m in groups.values()]
    else:
        values = _greedy_path_values(tree, method, reported, taxonomy.ids)
        group_values = [_largest(values, members) for members in groups.values()]
    categories = {c: CategoryScore(c, taxonomy[c].name, *map(float, values[c])) for c in taxonomy.ids}
    fields = {o: CategoryScore(o, o, *map(float, values[o])) for o in reported[len(taxonomy.ids):]}
    group_scores = {
        name: CategoryScore(name, ",".join(members), *map(float, v)) for (name, members), v in zip(groups.items(), group_values)
    }
    unexplored, invalid = _leftover(tree.root)
    return Scores(
        method=method,
        taxonomy=taxonomy.name,
        p_unsafe=unsafe_bounds[0],
        categories=categories,
        verdict=language.write(verdict) if verdict else None,
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
        fields=fields,
        verdict_categories=_named(verdict, taxonomy),
        verdict_unsafe=verdict.unsafe if verdict else None,
    )


def _named(verdict: Verdict | None, taxonomy: Taxonomy) -> tuple[str, ...]:
    """The categories the greedy verdict names: its list in order, then those its branch says."""
    if verdict is None:
        return ()
    listed = [c for c in verdict.labels if c in taxonomy.ids]
    return (*listed, *(c for c in taxonomy.ids if c in verdict.outcomes and c not in listed))


def _greedy_path_values(
    tree: Tree, method: str, reported: Sequence[str], categories: Sequence[str],
) -> dict[str, tuple[float, float, float]]:
    """first_token, conditional and joint: (p, lower, upper) per outcome from the method's targets.

    A list label the greedy verdict does not write scores 0 (the paper's slot estimators);
    an outcome a branch chooses scores from the greedy node where its choice is made."""
    language = tree.grammar.language
    values = {o: (0.0, 0.0, 0.0) for o in reported}
    constrained = tree.config.constrained
    targets = greedy_targets(tree.root, tree.grammar, ("conditional" if method == "first_token" else method,), constrained)
    if method == "first_token":
        targets = [(tree.root, FirstWord())] + [(s, t) for s, t in targets if isinstance(t, Outcome)]
    for start, target in targets:
        lo, hi = (float(x[0]) for x in bounds(start, MeasureSet(tree.grammar, [target], constrained)))
        if isinstance(target, FirstWord):  # P(unsafe) as the first word, for every category
            values.update({c: (lo, lo, hi) for c in categories if c not in language.choices})
            continue
        if method != "joint":
            hi = min(1.0, hi / start.mass)
            lo = min(lo / start.mass, hi)  # a ratio of equal sums can round a hair past 1
        name = target.category if isinstance(target, Slot) else language.outcomes[next(iter(target.members))]
        values[name] = (lo, lo, hi)
    return values


def _greedy_finished(tree: Tree) -> bool:
    last = greedy_path(tree.root)[-1]
    return last.expanded and last.greedy_child is None


def _largest(values: dict[str, tuple[float, float, float]], members: Sequence[str]) -> tuple[float, float, float]:
    """A group under a slot estimator: its largest member's score (a union has no slot)."""
    return tuple(max(values[c][i] for c in members) for i in range(3))


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


def combine(asked: Mapping[str, Scores], taxonomy: Taxonomy) -> Scores:
    """One conversation's Scores from one question per category (ShieldGemma, Granite Guardian).

    Each question is a distribution of its own, so no verdict names two categories: P(unsafe)
    is the largest category's probability (bounds: the largest lower and upper bounds), the
    masses left unexplored or invalid are the largest of any question, the nodes are summed
    and the model calls are those of the batched run (the questions share every call)."""
    first = next(iter(asked.values()))
    scores = [asked[c] for c in taxonomy.ids if c in asked]
    verdicts = [s.verdict for s in scores]
    return Scores(
        method=first.method,
        taxonomy=taxonomy.name,
        p_unsafe=max(s.p_unsafe for s in scores),
        categories={c: asked[c].categories[c] for c in taxonomy.ids if c in asked},
        verdict=None if None in verdicts else "\n".join(f"{c}: {asked[c].verdict}" for c in taxonomy.ids if c in asked),
        unexplored_mass=max(s.unexplored_mass for s in scores),
        invalid_mass=max(s.invalid_mass for s in scores),
        expanded_nodes=sum(s.expanded_nodes for s in scores),
        model_calls=max(s.model_calls for s in scores),
        truncated=any(s.truncated for s in scores),
        params=first.params,
        seconds=first.seconds,
        p_unsafe_lower=max(s.p_unsafe_lower for s in scores),
        p_unsafe_upper=max(s.p_unsafe_upper for s in scores),
        complete=all(s.complete for s in scores),
        verdict_categories=tuple(c for c in taxonomy.ids if c in asked and asked[c].verdict_unsafe),
        verdict_unsafe=None if None in verdicts else any(s.verdict_unsafe for s in scores),
    )
