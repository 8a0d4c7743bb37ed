"""A verdict language compiled against a tokenizer: which tokens each parser state allows.

Labels are read from the parser state reached by a token path, never from decoded text.
A tokenizer is compiled once into per-state transitions (which tokens keep the parser in
the language and where they lead), cached per state; see docs/design.md, section 2. The language
itself (what a family's verdicts look like and say) is the format's: ``formats/language.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from guardprob.errors import GrammarError
from guardprob.formats.language import Language, ParserState


@dataclass(frozen=True)
class Vocabulary:
    """What each token writes: ``texts[i]`` is token i's characters, or None for special tokens."""

    texts: tuple[str | None, ...]
    eos_ids: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, eos_ids: Sequence[int] = (), verdict_tokens: Sequence[str] = ()) -> Vocabulary:
        """Decode every token after an anchor token, so leading-space markers are kept.
        ``verdict_tokens``: added tokens a format's verdict is written in, read as text even if special."""
        size = len(tokenizer)
        known = tokenizer.get_vocab() if verdict_tokens else {}
        special = set(getattr(tokenizer, "all_special_ids", ())) - {known[t] for t in verdict_tokens if t in known}
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
    final: bool = False  # an open-ended verdict is whole here: the node ends with all its mass

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


@functools.lru_cache(maxsize=4)  # a trie of a large vocabulary weighs tens of MB
def _trie(vocabulary: Vocabulary, alphabet: frozenset[str]) -> tuple[_Trie, frozenset[str]]:
    """The trie of the tokens that write only ``alphabet``'s characters, and their texts. Shared
    (read only) by the grammars of one vocabulary and alphabet: a format's per-category
    questions and both roles compile against one trie instead of walking the vocabulary each."""
    eos = set(vocabulary.eos_ids)
    trie, pieces = _Trie(), set()
    for token_id, text in enumerate(vocabulary.texts):
        if text and token_id not in eos and set(text) <= alphabet:
            trie.add(text, token_id)
            pieces.add(text)
    return trie, frozenset(pieces)


class TokenGrammar:
    """A verdict language compiled against one vocabulary, with transitions cached per state."""

    _CACHE_LIMIT = 200_000
    _MEMO_LIMIT = 100_000

    def __init__(self, language: Language, vocabulary: Vocabulary):
        self.language = language
        self.vocabulary = vocabulary
        self._trie, pieces = _trie(vocabulary, frozenset(language.alphabet))
        for word in language.words():
            if not _segmentable(word, pieces):
                raise GrammarError(
                    f"the tokenizer cannot write {word!r} with tokens that contain only verdict characters; "
                    "use category ids the tokenizer can spell (such as 'S1') or another tokenizer"
                )
        self._cache: dict[ParserState, Transitions] = {}
        self._memos: dict[Hashable, dict[ParserState, Any]] = {}
        # With every verdict character a token of its own, any state the parser accepts can be
        # finished token by token; without, a path may reach a state no token continues.
        self.dead_ends = not all(char in pieces for char in language.alphabet)

    def memo(self, key: Hashable) -> dict[ParserState, Any]:
        """A per-state table for what a reader of this grammar's states computes (``key``: what
        it computes, say a set of measures), kept with the grammar so that every tree of it
        shares it: the states a verdict passes through are the same for every prompt. Every
        table starts afresh once they hold ``_MEMO_LIMIT`` states in all (a long-running service
        keeps meeting new states; tens of MB at most)."""
        if sum(len(t) for t in self._memos.values()) >= self._MEMO_LIMIT:
            self._memos.clear()
        return self._memos.setdefault(key, {})

    @property
    def root(self) -> ParserState:
        return self.language.root

    def transitions(self, state: ParserState) -> Transitions:
        cached = self._cache.get(state)
        if cached is not None:
            return cached
        if self.language.final(state):
            result = Transitions(np.asarray(self.vocabulary.eos_ids, dtype=np.int64), (), len(self.vocabulary.eos_ids), True)
            self._cache[state] = result
            return result
        found: list[tuple[int, ParserState]] = []
        stack = [(self._trie, state)]
        while stack:
            trie, at = stack.pop()
            for char, child in trie.children.items():
                after = self.language.step(at, char)
                if after is not None:
                    found.extend((token_id, after) for token_id in child.token_ids)
                    stack.append((child, after))
        found.sort(key=lambda item: item[0])
        eos = list(self.vocabulary.eos_ids) if self.language.can_end(state) else []
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
            state = self.language.walk(state, text)
            if state is None:
                return None
        return state


def _segmentable(word: str, pieces: set[str]) -> bool:
    reachable = [True] + [False] * len(word)
    for end in range(1, len(word) + 1):
        reachable[end] = any(reachable[start] and word[start:end] in pieces for start in range(end))
    return reachable[-1]
