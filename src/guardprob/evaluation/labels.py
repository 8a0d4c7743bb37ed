"""A dataset's own labels and how they become category ids.

A label column's value names labels: a list of names, a comma-separated text, a
{name: true/false} mapping (the true ones), or a true/false or 0/1 flag (also as text, as CSV
writes it), which names its own column when set. A ``LabelMap`` turns each name into category ids of the taxonomy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from guardprob.errors import InputError
from guardprob.inputs.datafile import finite, read_data_file, show

# What a map entry may say besides category ids.
SAFE: tuple[str, ...] = ()  # the label says the row is safe (e.g. "benign")
NO_CATEGORY = None  # an unsafe label with no category in the taxonomy: a row with only such labels is left out

# Words an "is unsafe" column may hold (compared in lower case).
UNSAFE_WORDS = ("unsafe", "harmful", "toxic", "yes", "true", "1")
SAFE_WORDS = ("safe", "unharmful", "benign", "non-toxic", "no", "false", "0")

_TEXT_FLAGS = {"0": False, "1": True, "false": False, "true": True}

MAP_SYNTAX = "NAME=ID[,ID...] (NAME= for a label that means safe, NAME=- for one with no category)"


class Unlabelled(Exception):
    """A row whose label cell is empty (null): it has no label to score against."""


@dataclass(frozen=True)
class LabelMap:
    """Label name -> category ids: a tuple of ids, ``SAFE`` (empty) or ``NO_CATEGORY`` (None).

    A key may name its column, ``"column:name"``, which wins over the bare ``"name"``: two
    columns may use the same word (``harmful``) for different categories."""

    entries: Mapping[str, tuple[str, ...] | None] = field(default_factory=dict)

    def merged(self, other: LabelMap | None) -> LabelMap:
        """These entries with ``other``'s over them."""
        return self if other is None else LabelMap({**self.entries, **other.entries})

    def key(self, column: str, name: str) -> str | None:
        """The entry that maps ``name`` read from ``column``, or None."""
        for key in (f"{column}:{name}", name):
            if key in self.entries:
                return key
        return None

    def __bool__(self) -> bool:
        return bool(self.entries)


def parse_map_options(items: Iterable[str]) -> LabelMap:
    """``--map NAME=IDS`` options (the last ``=`` splits: names may hold commas, ids cannot)."""
    entries: dict[str, tuple[str, ...] | None] = {}
    for item in items:
        name, sep, ids = item.rpartition("=")
        if not sep or not name.strip():
            raise InputError(f"--map {item!r}: write {MAP_SYNTAX}")
        entries[name.strip()] = _ids_from_text(ids, f"--map {item!r}")
    return LabelMap(entries)


def load_label_map(path: str | Path) -> LabelMap:
    """A .json or .yaml file: {name: "S1" | ["S1", "S9"] | [] (safe) | null (no category)}."""
    path = Path(path)
    data = read_data_file(path, "label map file", InputError)
    if not isinstance(data, dict) or not data:
        raise InputError(f"label map file {path}: expected a mapping of label name to category ids, "
                         'e.g. {"violence": "S1", "benign": [], "politics": null}')
    entries: dict[str, tuple[str, ...] | None] = {}
    for name, ids in data.items():
        where = f"label map file {path}, label {show(name)}"
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"{where}: a label name must be non-empty text")
        if ids is None:
            entries[name.strip()] = NO_CATEGORY
        elif isinstance(ids, str):
            entries[name.strip()] = _ids_from_text(ids, where)
        elif isinstance(ids, list) and all(isinstance(i, str) and i.strip() for i in ids):
            entries[name.strip()] = tuple(dict.fromkeys(i.strip() for i in ids))
        else:
            raise InputError(f"{where}: {show(ids)} is no category id; write an id (\"S1\"), a list of ids, "
                             "[] for a label that means safe, or null for one with no category")
    return LabelMap(entries)


def _ids_from_text(text: str, where: str) -> tuple[str, ...] | None:
    text = text.strip()
    if text == "-":
        return NO_CATEGORY
    ids = [i.strip() for i in text.split(",")]
    if text and not all(ids):
        raise InputError(f"{where}: an empty category id; write {MAP_SYNTAX}")
    return tuple(dict.fromkeys(ids)) if text else SAFE


def label_names(value: object, column: str) -> tuple[str, ...]:
    """The label names one label cell holds; raises ``Unlabelled`` for an empty (null) cell."""
    if _empty(value):
        raise Unlabelled(f"column {column!r} is empty (null) in this row")
    if isinstance(value, bool) or (finite(value) is not None and value in (0, 1)):
        return (column,) if value else ()
    if isinstance(value, str):
        if value.strip().lower() in _TEXT_FLAGS:  # a flag as CSV writes it
            return (column,) if _TEXT_FLAGS[value.strip().lower()] else ()
        return tuple(part.strip() for part in value.replace(";", ",").split(",") if part.strip())
    if isinstance(value, Mapping):
        for name, on in value.items():
            if not isinstance(name, str) or _flag(on) is None:
                raise InputError(f"column {column!r} maps {show(name)} to {show(on)}; a mapping of label names "
                                 "must hold true/false (or 0/1) values")
        return tuple(name for name, on in value.items() if _flag(on))
    if isinstance(value, Sequence) and all(isinstance(x, str) and x.strip() for x in value):
        names = tuple(x.strip() for x in value)
        if len(set(names)) != len(names):
            raise InputError(f"column {column!r} repeats a category id: {list(names)}")
        return names
    raise InputError(
        f"column {column!r} must be a list of category ids or label names (or a comma-separated text, a "
        f"{{name: true/false}} mapping, or a 0/1 flag), got {show(value)}"
    )


def unsafe_flag(value: object, column: str) -> bool:
    """What an "is unsafe" cell says: True unsafe, False safe; ``Unlabelled`` for an empty cell."""
    if _empty(value) or (isinstance(value, str) and not value.strip()):
        raise Unlabelled(f"column {column!r} is empty in this row")
    flag = _flag(value)
    if flag is None and isinstance(value, str):
        word = value.strip().lower()
        flag = True if word in UNSAFE_WORDS else False if word in SAFE_WORDS else None
    if flag is None:
        raise InputError(f"column {column!r} holds {show(value)}, which says neither safe nor unsafe; use true/false, "
                         f"0/1, or one of {', '.join(UNSAFE_WORDS + SAFE_WORDS)}")
    return flag


def _empty(value: object) -> bool:
    """A null cell: None, or the NaN that pandas writes for a missing number."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _flag(value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    if finite(value) is not None and value in (0, 1):
        return bool(value)
    return None
