"""What the estimators bound, decided per parser state (docs/design.md, sections 3 and 4).

A *measure* is a mass of the verdict tree: the verdicts that name a category, say unsafe,
give a field a value or name any of a group (``Outcome``), the continuations whose label in
one list position is a given label (``Slot``), the verdicts whose text begins with the
format's unsafe word (``FirstWord``). At every
parser state the grammar says whether all of a node's continuations count (*yes*), none
does (*no*), or it is still open; a verdict that ends at the state counts or not (*end*).
Bounds then follow one rule (``bounds``): a decided node adds its mass wholesale, an open
node's mass is followed into its children, and whatever is left unexplored counts toward
the upper bound alone.

*Yes* from what every completion contains holds only when every path can be finished:
under constraint, with a vocabulary that has no dead ends. Unconstrained mass may still
leave the grammar, so there only facts of the prefix itself (a slot closed by its
terminator, the unsafe word written) decide yes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from guardprob.core.grammar import TokenGrammar
from guardprob.formats.language import ParserState, Verdict

if TYPE_CHECKING:
    from guardprob.core.tree import Node


@dataclass(frozen=True)
class Outcome:
    """The verdict names at least one of ``members`` (indices into the language's outcomes)."""

    members: frozenset[int]


@dataclass(frozen=True)
class Slot:
    """The label in list position ``position`` names ``category``, with its terminator (a prefix measure)."""

    position: int
    category: str


@dataclass(frozen=True)
class FirstWord:
    """The verdict's text begins with the format's unsafe word (the first-token recipe, over every spelling)."""


Measure = Outcome | Slot | FirstWord


class MeasureSet:
    """Measures read per state: ``at(state) -> (yes, no, end)``, each bool [len(measures)]."""

    def __init__(self, grammar: TokenGrammar, measures: Sequence[Measure], constrained: bool):
        self.grammar = grammar.language
        self.measures = tuple(measures)
        # "every completion says so" decides only where every path reaches a completion
        self.sure = constrained and not grammar.dead_ends
        # what the measures say per state, shared by every MeasureSet of these measures on this grammar
        self._cache: dict[ParserState, tuple[np.ndarray, np.ndarray, np.ndarray]] = grammar.memo(
            ("measures", self.measures, self.sure))

    def __len__(self) -> int:
        return len(self.measures)

    def at(self, state: ParserState) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cached = self._cache.get(state)
        if cached is None:
            rows = [self._one(m, state) for m in self.measures]
            cached = tuple(np.array([r[i] for r in rows], dtype=bool) for i in range(3))
            for array in cached:  # shared by every reader of this grammar: read only
                array.flags.writeable = False
            self._cache[state] = cached
        return cached

    def open(self, state: ParserState) -> bool:
        """True if some measure is still undecided at ``state``."""
        yes, no, _ = self.at(state)
        return bool((~yes & ~no).any())

    def _one(self, measure: Measure, state: ParserState) -> tuple[bool, bool, bool]:
        g = self.grammar
        ends = g.can_end(state)
        if isinstance(measure, Outcome):
            facts = g.facts(state)
            yes = self.sure and any(clause <= measure.members for clause in facts.clauses)
            no = not (facts.reachable & measure.members)
            end = ends and bool(g.named(state) & measure.members)
            return yes, no, end
        if isinstance(measure, Slot):
            slot = g.slot_facts(state, measure.position)
            yes = slot.closed == measure.category or (self.sure and slot.sure == measure.category)
            no = measure.category not in slot.possible
            labels = g.verdict(state).labels if ends else ()
            return yes, no, len(labels) > measure.position and labels[measure.position] == measure.category
        written = g.first_word(state)
        yes = written is True or (self.sure and frozenset({g.unsafe}) in g.facts(state).clauses)
        return yes, written is False, ends and g.verdict(state).unsafe


def bounds(node: Node, measures: MeasureSet) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds [len(measures)] on each measure's mass below ``node``.

    A node where a measure is decided adds its mass (yes) or nothing (no); an expanded open
    node adds the mass that ends there if that verdict counts, counts what the engine left
    unreported toward the upper bound and passes on to its children; an unexpanded open
    node's mass counts toward the upper bound alone. Invalid mass counts nowhere.
    """
    size = len(measures)
    lower = np.zeros(size)
    upper = np.zeros(size)
    stack = [(node, np.ones(size, dtype=bool))]
    while stack:
        n, active = stack.pop()
        yes, no, end = measures.at(n.state)
        hit = active & yes
        lower[hit] += n.mass
        upper[hit] += n.mass
        undecided = active & ~yes & ~no
        if not undecided.any():
            continue
        if not n.expanded:
            upper[undecided] += n.mass
            continue
        if n.end_mass:
            ended = undecided & end
            lower[ended] += n.end_mass
            upper[ended] += n.end_mass
        if n.remainder:
            upper[undecided] += n.remainder
        stack.extend((child, undecided) for child in n.children)
    return lower, upper


def greedy_path(root: Node) -> list[Node]:
    path = [root]
    while path[-1].greedy_child is not None:
        path.append(path[-1].greedy_child)
    return path


def greedy_verdict(root: Node, grammar: TokenGrammar) -> Verdict | None:
    """The verdict of the greedy path, or None if greedy decoding leaves the grammar."""
    last = greedy_path(root)[-1]
    if last.greedy != "end":
        return None
    return grammar.language.verdict(last.state)


def slot_start(path: list[Node], grammar: TokenGrammar, slot: int) -> Node:
    """The deepest greedy node at which the label in position ``slot`` has not begun.

    A node's forced tokens carry its whole mass, so a slot that starts inside them starts
    at that node: test the state before the forced tokens.
    """
    language = grammar.language
    start = path[0]
    for node in path:
        if not language.slot_begun(node.entry, slot):
            start = node
    return start


def choice_start(path: list[Node], measures: MeasureSet) -> Node:
    """The deepest greedy node at which a one-measure set (a field's value) is still open,
    tested before the node's forced tokens as ``slot_start`` does."""
    start = path[0]
    for node in path:
        yes, no, _ = measures.at(node.entry)
        if not (yes[0] or no[0]):
            start = node
    return start


def greedy_targets(
    root: Node, grammar: TokenGrammar, methods: Sequence[str] = ("first_token", "conditional", "joint"),
    constrained: bool = True,
) -> list[tuple[Node, Measure]]:
    """What the greedy-path estimators among ``methods`` measure, each with the node it is
    measured below: the first word from the root (``first_token``); for ``conditional`` and
    ``joint``, each label of the greedy verdict's list in its slot from the slot's start, and
    each outcome a branch chooses (a field's value, such as ``refusal=yes``) from the last
    greedy node where it is open."""
    targets: list[tuple[Node, Measure]] = [(root, FirstWord())] if "first_token" in methods else []
    verdict = greedy_verdict(root, grammar)
    if verdict is not None and ("conditional" in methods or "joint" in methods):
        path = greedy_path(root)
        targets += [(slot_start(path, grammar, j), Slot(j, k)) for j, k in enumerate(verdict.labels)]
        language = grammar.language
        for k in language.choices:
            measure = Outcome(frozenset({language.index[k]}))
            targets.append((choice_start(path, MeasureSet(grammar, [measure], constrained)), measure))
    return targets
