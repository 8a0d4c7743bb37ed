"""A tokenizer's control tokens, and text tokenized so that it can never write one.

A *control token* steers the model instead of being read as text. Only a format's own markup
may put one in a prompt; a message that spells one out gets its characters read as characters.
A token is a control token when it is

- an added token flagged special (``<|eot_id|>``, ``<|im_start|>``);
- a token the tokenizer names for a role: bos, eos, unk, pad, sep, cls, mask, and its other
  special tokens (a converted or hub tokenizer takes them from the model's configuration),
  unless it is a plain word of the vocabulary that a configuration misnames (pad = ``!``);
- an added token whose text is markup or a placeholder, flagged special or not: stripped of
  whitespace and word-boundary marks, it is one pair of angle or square brackets around
  something (``</s>`` in Phi-3, ``<|User|>`` and ``<|EOT|>`` in DeepSeek Coder, ``<pad>``,
  ``[PAD151646]`` in Qwen2, ``[INST]``).

Every other added token is text and keeps tokenizing as the model was trained: DeepSeek's
vocabularies add ``ø``, ``ö``, ``ú`` as tokens of their own, and a message holding them is
read with them. An added text token that happens to look like markup (``<br>``) is read by the
model's own vocabulary instead, which changes how that string is cut, never what it says.

docs/formats.md ("Text stays text") describes the rule for users.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

_MARKUP = re.compile(r"<[^<>]+>|\[[^\[\]]+\]")
_MARKS = " \t\r\n\u2581\u0120"  # whitespace, SentencePiece's and byte-level BPE's word-boundary marks
_ROLES = ("bos", "eos", "unk", "pad", "sep", "cls", "mask")


def is_markup(text: str) -> bool:
    """Whether an added token's text is markup or a placeholder rather than text."""
    return _MARKUP.fullmatch(text.strip(_MARKS)) is not None


@dataclass(frozen=True)
class Controls:
    """A tokenizer's control tokens.

    ids: every control id. strings: the text of each added control token (what a message could
    spell), with its id. pattern: finds those texts, longest first (None where there are none).
    unknown: the id the tokenizer reads an unknown character as (not a control where the
    model itself writes it for a character it cannot spell; never from its spelled-out text).
    """

    ids: frozenset[int]
    strings: dict[str, int]
    pattern: re.Pattern | None
    unknown: int | None


def controls(tokenizer: Any) -> Controls:
    """The control tokens of ``tokenizer`` (computed once per tokenizer and size)."""
    key = len(tokenizer)
    cached = _cache_get(tokenizer)
    if cached is not None and cached[0] == key:
        return cached[1]
    found = _find(tokenizer)
    _cache_put(tokenizer, (key, found))
    return found


def control_ids(tokenizer: Any) -> frozenset[int]:
    """The ids only a format's own markup may put in a prompt (see the module's docstring)."""
    return controls(tokenizer).ids


def _find(tokenizer: Any) -> Controls:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    named: set[int] = {int(i) for i in getattr(tokenizer, "all_special_ids", ()) or () if i is not None}
    for role in _ROLES:
        value = getattr(tokenizer, f"{role}_token_id", None)
        if isinstance(value, int):
            named.add(value)
    # a named id outside the added tokens whose text is a plain word (a configuration that
    # names "!" its pad token) stays text: a message must be able to write it
    named = {i for i in named if i in added or is_markup(str(_token_text(tokenizer, i)))}
    strings = {}
    for i, token in added.items():
        text = getattr(token, "content", "")
        if text and (getattr(token, "special", False) or i in named or is_markup(text)):
            strings[text] = int(i)
    pattern = re.compile("(" + "|".join(map(re.escape, sorted(strings, key=len, reverse=True))) + ")") if strings else None
    unknown = getattr(tokenizer, "unk_token_id", None)
    return Controls(frozenset(named) | frozenset(strings.values()), strings, pattern,
                    unknown if isinstance(unknown, int) else None)


def _token_text(tokenizer: Any, token_id: int) -> str | None:
    try:
        return tokenizer.convert_ids_to_tokens(token_id)
    except (IndexError, KeyError, OverflowError, TypeError, ValueError):
        return None


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """``text`` tokenized as the model reads text, with no added control token matched: a
    spelled-out control token is cut by the model's own vocabulary, while added text tokens
    (DeepSeek's ``ø``) are read as themselves."""
    if not text:
        return []
    reader = _text_reader(tokenizer)
    if reader is not None:
        return list(reader.encode(text, add_special_tokens=False).ids)
    # a tokenizer without a tokenizers backend: special-token parsing off (which, in transformers'
    # Python tokenizers, turns off the matching of every added token)
    return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))


def _text_reader(tokenizer: Any) -> Any:
    """A copy of the tokenizer's ``tokenizers`` backend in which every added control token is
    marked special and special tokens are read as text (``encode_special_tokens``): built once
    per tokenizer, on first need (it copies the whole vocabulary)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    key = ("reader", len(tokenizer))
    with _LOCK:
        cached = _READERS.get(id(tokenizer))
        if cached is not None and cached[0] == key and cached[1]() is tokenizer:
            return cached[2]
    from tokenizers import Tokenizer

    marked = controls(tokenizer).strings
    data = json.loads(backend.to_str())
    for token in data.get("added_tokens", ()):
        if token.get("content") in marked:
            token["special"] = True
    reader = Tokenizer.from_str(json.dumps(data))
    reader.no_truncation()
    reader.no_padding()
    reader.encode_special_tokens = True
    ref = _ref(tokenizer)
    if ref is not None:
        with _LOCK:
            _READERS[id(tokenizer)] = (key, ref, reader)
    return reader


def count_controls(ids: Iterable[int], found: Controls, *, unknown: bool = True) -> dict[int, int]:
    """How many times each control id occurs in ``ids`` (``unknown=False``: the unknown id left out)."""
    out: dict[int, int] = {}
    for i in ids:
        if i in found.ids and (unknown or i != found.unknown):
            out[i] = out.get(i, 0) + 1
    return out


# -- one cache entry per live tokenizer ------------------------------------------------------
_LOCK = threading.Lock()
_CACHE: dict[int, tuple[weakref.ref, tuple[int, Controls]]] = {}
_READERS: dict[int, tuple[tuple, weakref.ref, Any]] = {}


def _cache_get(tokenizer: Any) -> tuple[int, Controls] | None:
    with _LOCK:
        entry = _CACHE.get(id(tokenizer))
    return entry[1] if entry is not None and entry[0]() is tokenizer else None


def _cache_put(tokenizer: Any, value: tuple[int, Controls]) -> None:
    ref = _ref(tokenizer)
    if ref is not None:
        with _LOCK:
            _CACHE[id(tokenizer)] = (ref, value)


def _ref(tokenizer: Any) -> weakref.ref | None:
    """A weak reference that forgets the tokenizer's entries when it goes (None: an object
    without weak references, which is then not cached)."""
    key = id(tokenizer)
    try:
        return weakref.ref(tokenizer, lambda _: _forget(key))
    except TypeError:
        return None


def _forget(key: int) -> None:
    with _LOCK:
        _CACHE.pop(key, None)
        _READERS.pop(key, None)
