"""The formats guardprob knows: each registers itself with ``@register_format``.

A format is one module: its class carries the decorator, with the name ``--format`` takes,
the model-name markers ``--format auto`` looks for and the chat-template hints it reads when
the name says nothing. The registry is filled by discovery (``discovery.py``): the package's
own ``formats/`` modules, installed plugins (entry-point group ``guardprob.formats``) and the
directories named by ``GUARDPROB_FORMAT_PATH``.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from guardprob.errors import TemplateError

T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class Entry:
    """One registered format name: how to build it and how ``auto`` finds it.

    markers: texts of a model's name (lowercased, ``_`` read as ``-``) that pick this format;
    the longest marker found wins, so a family's own name beats a generic one.
    template_hints: texts of a tokenizer's chat template that pick it when no name matches.
    """

    name: str
    build: Callable[[], Any]
    markers: tuple[str, ...] = ()
    template_hints: tuple[str, ...] = ()
    module: str = ""


_ENTRIES: dict[str, Entry] = {}


def register_format(name: str, *, markers: tuple[str, ...] = (), template_hints: tuple[str, ...] = (),
                    **options: Any) -> Callable[[T], T]:
    """Register the decorated Format class under ``name``; ``options`` are passed to it (with
    ``name``) when it is built. Stack the decorator to register one class under several names."""
    if not isinstance(name, str) or not name.strip() or name != name.strip() or name == "auto":
        raise TemplateError(f"format name {name!r}: use a non-empty name without surrounding spaces (not 'auto')")

    def decorate(cls: T) -> T:
        entry = Entry(name, functools.partial(cls, name=name, **options), tuple(m.lower() for m in markers),
                      tuple(template_hints), f"{cls.__module__}.{cls.__qualname__}")
        add(entry)
        return cls

    return decorate


def add(entry: Entry) -> None:
    """Add ``entry``; the same class registering again (its module read twice) replaces itself."""
    old = _ENTRIES.get(entry.name)
    if old is not None and old.module != entry.module:
        raise TemplateError(
            f"two formats are registered as {entry.name!r}: {old.module} and {entry.module}; "
            "rename one of them (its @register_format name), or remove the module you do not want"
        )
    _ENTRIES[entry.name] = entry


def entries() -> Mapping[str, Entry]:
    """Every registered format, after discovery."""
    from guardprob.formats.discovery import discover

    discover()
    return _ENTRIES


class Registry(Mapping[str, Callable[[], Any]]):
    """The registered formats as ``name -> build()``, discovered on first use."""

    def __getitem__(self, name: str) -> Callable[[], Any]:
        return entries()[name].build

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(entries()))

    def __len__(self) -> int:
        return len(entries())


def taxonomies() -> dict[str, Any]:
    """The taxonomies registered formats write in their own files, by name (presets excluded)."""
    from guardprob.taxonomy import PRESETS, Taxonomy

    found: dict[str, Any] = {}
    for entry in entries().values():
        taxonomy = entry.build().taxonomy
        if isinstance(taxonomy, Taxonomy) and taxonomy.name not in PRESETS:
            found.setdefault(taxonomy.name, taxonomy)
    return found


def load_taxonomy(spec: Any) -> Any:
    """``guardprob.taxonomy.load_taxonomy`` that also knows the registered formats' own taxonomies
    by name (``--taxonomy kanana-safeguard``): what the classifier, the CLI and the service use."""
    from guardprob.taxonomy import PRESETS
    from guardprob.taxonomy import load_taxonomy as load

    if isinstance(spec, str) and spec not in PRESETS and not Path(spec).suffix:
        return load(spec, taxonomies())
    return load(spec)


def module_doc(fmt: Any) -> str:
    """The first line of the docstring of the module a format is written in."""
    module = sys.modules.get(type(fmt).__module__)
    lines = ((module.__doc__ if module else "") or "").strip().splitlines()
    return lines[0] if lines else ""
