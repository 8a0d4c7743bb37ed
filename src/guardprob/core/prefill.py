"""The first-id walk of the prefill baselines (evaluation/baselines.py), on the search's tree.

The *prefill path* runs from the root through the most probable child among the tokens that
keep to the unsafe verdict's text up to its list plus the labels' common prefix (Llama Guard:
``unsafe\\n`` and ``S``), until the parser arrives there: the *arrival node*. Below it the
walk follows every node whose share of the arrival node is at least the walk's eps and whose
first label is not yet closed. The search expands these nodes (``SearchConfig.first_id``);
the baselines read the first id's distribution from them. Both use the functions here, so
the search expands exactly the nodes the reading needs.

A node's share of its parent is the parent's distribution renormalised over what the engine
reported of the grammar's tokens (the children and the end), in both modes: under constraint
it is the search's own step, unconstrained the step given that the model stays in the
grammar there. Everything is read from parser states, never from decoded text.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from guardprob.formats.language import UNSAFE, Labels, Language, ParserState, Thread

if TYPE_CHECKING:
    from guardprob.core.grammar import TokenGrammar
    from guardprob.core.tree import Node


class Way(Enum):
    """Where a token path leaves the prefill path's walker."""

    ON = "on"  # still on the way to the arrival state
    ARRIVED = "arrived"  # it passed through the arrival state
    OFF = "off"  # it left the way before arriving


@dataclass(frozen=True)
class PrefillRule:
    """The prefill path's rule for one verdict language: the branches of its unsafe verdicts
    with their list's place (``at``: branch -> part index) and the labels' common prefix."""

    language: Language
    at: Mapping[int, int]
    target: str

    @classmethod
    def of(cls, language: Language) -> PrefillRule | None:
        """The rule, or None if the unsafe verdicts have no single list of labels, or no
        non-empty prefix of theirs leads to that list alone (another verdict may still follow
        it, as Qwen3Guard's ``Categories: None`` does, or the list comes first)."""
        labels = unsafe_list(language)
        if labels is None:
            return None
        at = {i: b.parts.index(b.labels) for i, b in enumerate(language.branches) if UNSAFE in b.says and b.labels is not None}
        rule = cls(language, at, os.path.commonprefix(list(labels.words)))
        heads = ["".join(language.branches[i].parts[:part]) + rule.target for i, part in at.items()]
        arrives = any(head and (state := language.walk(language.root, head)) is not None and rule.arrived(state)
                      for head in heads)
        return rule if arrives else None

    def _on_the_way(self, t: Thread) -> bool:
        at = self.at.get(t.branch)
        return at is not None and (t.part < at or (
            t.part == at and not t.done and not t.offset and self.target.startswith(t.buffer)))

    def allowed(self, state: ParserState) -> bool:
        """Some thread still writes the unsafe head (a token the walker may take)."""
        return any(self._on_the_way(t) for t in state.threads)

    def arrived(self, state: ParserState) -> bool:
        """Every thread stands at the list's start with the common prefix written."""
        return all(self._on_the_way(t) and t.part == self.at[t.branch] and t.buffer == self.target for t in state.threads)

    def way(self, grammar: TokenGrammar, node: Node) -> Way:
        """Where ``node``'s own tokens (its first and those the grammar forced after it) lead,
        tested after each token as a walker that asks the model at every step would."""
        for state in own_states(grammar, node):
            if not self.allowed(state):
                return Way.OFF
            if self.arrived(state):
                return Way.ARRIVED
        return Way.ON

    def next(self, node: Node) -> Node | None:
        """The prefill path's child of ``node``: the most probable one whose first token keeps
        to the way (the first of equals, as the candidates are ordered)."""
        best = None
        for child in node.children:
            if self.allowed(child.entry) and (best is None or child.mass > best.mass):
                best = child
        return best

    def closed(self, state: ParserState) -> str | None:
        """The first label, once its terminator is written."""
        return self.language.slot_facts(state, 0).closed


def unsafe_list(language: Language) -> Labels | None:
    """The list of the language's unsafe verdicts, or None if there is no single one."""
    lists = {b.labels for b in language.branches if UNSAFE in b.says and b.labels is not None}
    return lists.pop() if len(lists) == 1 else None


def own_states(grammar: TokenGrammar, node: Node) -> Iterator[ParserState]:
    """The parser state after each of ``node``'s own tokens (from its parent's state)."""
    parent = node.parent
    state = grammar.root if parent is None else parent.state
    for token in node.path[0 if parent is None else len(parent.path):]:
        state = grammar.read((token,), state)
        if state is None:  # cannot happen on a searched tree: its paths stay in the grammar
            return
        yield state


def shares(node: Node) -> tuple[list[tuple[Node, float]], float]:
    """Each child's share of ``node`` and the share that ends there, renormalised over what was
    reported of the grammar's tokens (empty where nothing was)."""
    total = sum(child.mass for child in node.children) + node.end_mass
    if not total > 0:
        return [], 0.0
    return [(child, child.mass / total) for child in node.children], node.end_mass / total
