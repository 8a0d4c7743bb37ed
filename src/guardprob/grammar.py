"""The verdict grammar: a character-level parser and its token-level compilation.

    verdict := "safe" | "unsafe" "\\n" id ("," id)*     each id at most once, then EOS

Labels are read from the parser state reached by a token path, never from decoded text.
A tokenizer is compiled once into per-state transitions (which tokens keep the parser in
the grammar and where they lead), cached per state; see DESIGN.md section 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from guardprob.errors import GrammarError

SAFE = "safe"
UNSAFE_HEAD = "unsafe\n"


@dataclass(frozen=True, slots=True)
class ParserState:
    """Where the parser stands: the head read so far, the ids closed, the id being written."""

    head: str = ""
    ids: tuple[str, ...] = ()
    buffer: str = ""

    @property
    def in_ids(self) -> bool:
        return self.head == UNSAFE_HEAD


@dataclass(frozen=True, slots=True)
class Verdict:
    unsafe: bool
    ids: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"unsafe\n{','.join(self.ids)}" if self.unsafe else "safe"


class VerdictGrammar:
    """The character-level parser for one taxonomy's ids."""

    def __init__(self, ids: Sequence[str]):
        self.ids = tuple(ids)
        self._index = {category: i for i, category in enumerate(self.ids)}
        # prefix -> ids that start with it, so a step never scans the whole taxonomy
        self._by_prefix: dict[str, tuple[str, ...]] = {}
        for category in self.ids:
            for end in range(len(category) + 1):
                self._by_prefix.setdefault(category[:end], ())
                self._by_prefix[category[:end]] += (category,)
        self.alphabet = frozenset(SAFE + UNSAFE_HEAD + "," + "".join(self.ids))
        self._facts: dict[ParserState, StateFacts] = {}

    def _remaining(self, state: ParserState) -> list[str]:
        return [i for i in self.ids if i not in state.ids]

    def _open_matches(self, state: ParserState, buffer: str) -> list[str]:
        return [i for i in self._by_prefix.get(buffer, ()) if i not in state.ids]

    def step(self, state: ParserState, char: str) -> ParserState | None:
        """The state after one more character, or None if it leaves the grammar."""
        if not state.in_ids:
            head = state.head + char
            if UNSAFE_HEAD.startswith(head) or SAFE.startswith(head):
                return ParserState(head)
            return None
        if char == ",":
            closes = state.buffer in self._index and state.buffer not in state.ids
            if closes and len(state.ids) + 1 < len(self.ids):
                return ParserState(state.head, state.ids + (state.buffer,))
            return None
        buffer = state.buffer + char
        if self._open_matches(state, buffer):
            return ParserState(state.head, state.ids, buffer)
        return None

    def walk(self, state: ParserState, text: str) -> ParserState | None:
        for char in text:
            state = self.step(state, char)
            if state is None:
                return None
        return state

    def can_end(self, state: ParserState) -> bool:
        if state.head == SAFE:
            return True
        return state.in_ids and state.buffer in self._index and state.buffer not in state.ids

    def verdict(self, state: ParserState) -> Verdict:
        """The verdict that ending at ``state`` writes (``can_end(state)`` must hold)."""
        if state.head == SAFE:
            return Verdict(False)
        return Verdict(True, state.ids + (state.buffer,))

    # -- what a state already says (DESIGN.md section 4) -------------------------------
    @property
    def outcomes(self) -> tuple[str, ...]:
        """The things a verdict can say, by index: each id, then ``"unsafe"`` (index ``len(ids)``)."""
        return self.ids + ("unsafe",)

    def facts(self, state: ParserState) -> StateFacts:
        """What every completion of ``state`` says and what some completion may say.

        One rule for every state: a state's completions are those of the verdict branches
        its text can still become (``safe``, or ``unsafe\n`` and an id list); a clause holds
        where it holds on every such branch, an outcome is reachable where it is on any.
        """
        cached = self._facts.get(state)
        if cached is not None:
            return cached
        if len(self._facts) >= _FACTS_LIMIT:
            self._facts.clear()
        if state.in_ids:
            result = self._list_facts(state)
        else:
            branches = [self._head_facts(word) for word in _HEADS if word.startswith(state.head)]
            clauses = set(branches[0].clauses).intersection(*(b.clauses for b in branches[1:])) if branches else set()
            reachable = frozenset().union(*(b.reachable for b in branches))
            result = StateFacts(tuple(sorted(clauses, key=sorted)), reachable)
        self._facts[state] = result
        return result

    def _head_facts(self, word: str) -> StateFacts:
        """The facts at the end of a head word: ``safe`` says nothing, ``unsafe\n`` enters the id list."""
        if word == SAFE:
            return StateFacts((), frozenset())
        return self._list_facts(ParserState(UNSAFE_HEAD))

    def _list_facts(self, state: ParserState) -> StateFacts:
        unsafe = len(self.ids)
        remaining = self._remaining(state)
        current = self._open_matches(state, state.buffer)  # the id being written is one of these
        clauses = [frozenset({unsafe})] + [frozenset({self._index[c]}) for c in state.ids]
        clauses.append(frozenset(self._index[c] for c in current))
        # another id may follow the current one only while two or more remain
        later = remaining if len(remaining) >= 2 else current
        reachable = frozenset({unsafe, *(self._index[c] for c in (*state.ids, *current, *later))})
        return StateFacts(tuple(dict.fromkeys(clauses)), reachable)

    def named(self, state: ParserState) -> frozenset[int]:
        """The outcome indices the verdict that ends at ``state`` names (``can_end(state)``)."""
        verdict = self.verdict(state)
        return frozenset([self._index[c] for c in verdict.ids] + ([len(self.ids)] if verdict.unsafe else []))

    def slot_facts(self, state: ParserState, slot: int) -> SlotFacts:
        """What ``state`` says about the id in position ``slot`` of the verdict."""
        if not state.in_ids:
            possible = frozenset(self.ids) if UNSAFE_HEAD.startswith(state.head) else frozenset()
            return SlotFacts(None, None, possible)
        if slot < len(state.ids):
            return SlotFacts(state.ids[slot], state.ids[slot], frozenset({state.ids[slot]}))
        current = self._open_matches(state, state.buffer)
        if slot == len(state.ids):
            return SlotFacts(None, current[0] if len(current) == 1 else None, frozenset(current))
        # later positions hold ids that are left once the current one closes
        later = [c for c in self._remaining(state) if len(current) > 1 or c not in current]
        enough = len(later) >= slot - len(state.ids)  # ids left for the positions up to this one
        return SlotFacts(None, None, frozenset(later) if enough else frozenset())

    def first_word(self, state: ParserState) -> bool | None:
        """Whether the verdict's text begins with ``unsafe``: True once written, False once it
        cannot, None while undecided (the head is a prefix of it)."""
        if state.head.startswith("unsafe"):
            return True
        return None if "unsafe".startswith(state.head) else False


_HEADS = (SAFE, UNSAFE_HEAD)
_FACTS_LIMIT = 200_000


@dataclass(frozen=True, slots=True)
class StateFacts:
    """Per state, over outcome indices (``VerdictGrammar.outcomes``).

    clauses: every completion contains at least one outcome of each clause (a category is
    committed where ``{k}`` is a clause; a union where it contains a clause).
    reachable: the outcomes some completion may contain (a superset only loosens bounds).
    """

    clauses: tuple[frozenset[int], ...]
    reachable: frozenset[int]


@dataclass(frozen=True, slots=True)
class SlotFacts:
    """What a state says of one verdict position: ``closed``, the id written there with its
    terminator (a fact of the prefix); ``sure``, the id every completion writes there;
    ``possible``, the ids some completion may write there."""

    closed: str | None
    sure: str | None
    possible: frozenset[str]


@dataclass(frozen=True)
class Vocabulary:
    """What each token writes: ``texts[i]`` is token i's characters, or None for special tokens."""

    texts: tuple[str | None, ...]
    eos_ids: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, eos_ids: Sequence[int] = ()) -> Vocabulary:
        """Decode every token after an anchor token, so leading-space markers are kept."""
        size = len(tokenizer)
        special = set(getattr(tokenizer, "all_special_ids", ()))
        anchor_ids = tokenizer.encode("a", add_special_tokens=False)
        anchor = tokenizer.decode(anchor_ids, clean_up_tokenization_spaces=False)
        decoded = tokenizer.batch_decode(
            [anchor_ids + [i] for i in range(size)], clean_up_tokenization_spaces=False
        )
        texts: list[str | None] = []
        for token_id, text in enumerate(decoded):
            usable = token_id not in special and text.startswith(anchor) and len(text) > len(anchor)
            texts.append(text[len(anchor):] if usable else None)
        eos = sorted({*eos_ids, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})
        if not eos:
            raise GrammarError("the tokenizer has no end-of-sequence token; pass eos_ids to mark where a verdict ends")
        return cls(tuple(texts), tuple(eos))


@dataclass(frozen=True)
class Transitions:
    """The tokens allowed in one parser state.

    candidates: [n_tokens + n_eos] int64, the ids whose log-probabilities a node needs,
    the grammar tokens first (leading to ``next_states``), then the allowed EOS ids.
    """

    candidates: np.ndarray
    next_states: tuple[ParserState, ...]
    n_eos: int

    @property
    def n_tokens(self) -> int:
        return len(self.next_states)

    @property
    def forced(self) -> bool:
        """True when the constrained distribution has no choice to make (no model call needed)."""
        return self.n_tokens + min(self.n_eos, 1) <= 1


class _Trie:
    """Token texts as a character trie, so sibling tokens share the parser's steps."""

    __slots__ = ("children", "token_ids")

    def __init__(self) -> None:
        self.children: dict[str, _Trie] = {}
        self.token_ids: list[int] = []

    def add(self, text: str, token_id: int) -> None:
        node = self
        for char in text:
            node = node.children.setdefault(char, _Trie())
        node.token_ids.append(token_id)


class TokenGrammar:
    """A VerdictGrammar compiled against one vocabulary, with transitions cached per state."""

    _CACHE_LIMIT = 200_000

    def __init__(self, grammar: VerdictGrammar, vocabulary: Vocabulary):
        self.grammar = grammar
        self.vocabulary = vocabulary
        eos = set(vocabulary.eos_ids)
        self._trie = _Trie()
        pieces = set()
        for token_id, text in enumerate(vocabulary.texts):
            if text and token_id not in eos and set(text) <= grammar.alphabet:
                self._trie.add(text, token_id)
                pieces.add(text)
        for word in (SAFE, UNSAFE_HEAD, ",", *grammar.ids):
            if not _segmentable(word, pieces):
                raise GrammarError(
                    f"the tokenizer cannot write {word!r} with tokens that contain only verdict characters; "
                    "use category ids the tokenizer can spell (such as 'S1') or another tokenizer"
                )
        self._cache: dict[ParserState, Transitions] = {}
        # With every verdict character a token of its own, any state the parser accepts can be
        # finished token by token; without, a path may reach a state no token continues.
        self.dead_ends = not all(char in pieces for char in grammar.alphabet)

    @property
    def root(self) -> ParserState:
        return ParserState()

    def transitions(self, state: ParserState) -> Transitions:
        cached = self._cache.get(state)
        if cached is not None:
            return cached
        found: list[tuple[int, ParserState]] = []
        stack = [(self._trie, state)]
        while stack:
            trie, at = stack.pop()
            for char, child in trie.children.items():
                after = self.grammar.step(at, char)
                if after is not None:
                    found.extend((token_id, after) for token_id in child.token_ids)
                    stack.append((child, after))
        found.sort(key=lambda item: item[0])
        eos = list(self.vocabulary.eos_ids) if self.grammar.can_end(state) else []
        result = Transitions(
            np.asarray([t for t, _ in found] + eos, dtype=np.int64), tuple(s for _, s in found), len(eos)
        )
        if len(self._cache) >= self._CACHE_LIMIT:
            self._cache.clear()
        self._cache[state] = result
        return result

    def read(self, path: Sequence[int], state: ParserState | None = None) -> ParserState | None:
        """The state after a token path (EOS excluded), or None if it leaves the grammar."""
        state = self.root if state is None else state
        texts = self.vocabulary.texts
        for token_id in path:
            text = texts[token_id] if 0 <= token_id < len(texts) else None
            if not text:
                return None
            state = self.grammar.walk(state, text)
            if state is None:
                return None
        return state


def _segmentable(word: str, pieces: set[str]) -> bool:
    reachable = [True] + [False] * len(word)
    for end in range(1, len(word) + 1):
        reachable[end] = any(reachable[start] and word[start:end] in pieces for start in range(end))
    return reachable[-1]
