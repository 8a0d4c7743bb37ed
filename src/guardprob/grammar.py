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
        # Per state: (committed, possible) as boolean vectors over ids + [unsafe]; see DESIGN.md section 4.
        self._flags: dict[ParserState, tuple[np.ndarray, np.ndarray]] = {}

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

    def slot_id(self, state: ParserState, slot: int) -> str | None:
        """The id that every completion of ``state`` writes in position ``slot``, if already decided."""
        if not state.in_ids:
            return None
        if slot < len(state.ids):
            return state.ids[slot]
        if slot == len(state.ids):
            matches = self._open_matches(state, state.buffer)
            if len(matches) == 1:
                return matches[0]
        return None

    def flags(self, state: ParserState) -> tuple[np.ndarray, np.ndarray]:
        """(committed, possible): boolean vectors over ``ids + ("unsafe",)``.

        committed: every completion of ``state`` has it; possible: some completion may have it
        (a superset is allowed: it only loosens the upper bound).
        """
        cached = self._flags.get(state)
        if cached is not None:
            return cached
        n = len(self.ids)
        committed = np.zeros(n + 1, dtype=bool)
        possible = np.zeros(n + 1, dtype=bool)
        if state.head.startswith("u"):
            committed[n] = True
        elif state.head == "":
            possible[:] = True
        if state.in_ids:
            for category in state.ids:
                committed[self._index[category]] = True
            decided = self.slot_id(state, len(state.ids))
            if decided is not None:
                committed[self._index[decided]] = True
            for category in self._remaining(state):
                possible[self._index[category]] = True
        possible |= committed
        self._flags[state] = (committed, possible)
        return committed, possible


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
