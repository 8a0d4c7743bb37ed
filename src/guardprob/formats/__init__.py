"""Every guard family's prompt and verdict language, one file each, and the registry.

A new format is one file: a Format subclass with ``@register_format`` (docs/formats.md,
"Adding a format"). The registry is filled by discovery: this package's modules, installed
plugins (entry-point group ``guardprob.formats``) and ``GUARDPROB_FORMAT_PATH``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from guardprob.errors import TemplateError
from guardprob.formats.base import Format
from guardprob.formats.registry import Registry, entries, load_taxonomy, register_format, taxonomies

REGISTRY = Registry()  # name -> a function that builds the format

__all__ = ["REGISTRY", "Format", "detect", "load_format", "load_taxonomy", "register_format", "taxonomies"]


def detect(model_name: str, tokenizer: Any = None) -> tuple[str, str]:
    """The format ``auto`` picks for a model, and why (for the message that says so): the
    longest registered marker in the model's name, else a registered hint in its chat template."""
    lowered = model_name.lower().replace("_", "-")
    known = entries().values()
    for marker, name in _longest_first((m, e.name) for e in known for m in e.markers):
        if marker in lowered:
            return name, f"the model name {model_name!r}"
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(template, str):
        for hint, name in _longest_first((h, e.name) for e in known for h in e.template_hints):
            if hint in template:
                return name, f"the tokenizer's chat template (it holds {hint!r})"
    if template:
        return "instruction", "the tokenizer's chat template: a chat model asked to answer as Llama Guard"
    return "llama-guard-3", "no better guess (no known model name, no chat template)"


def _longest_first(pairs) -> list[tuple[str, str]]:
    """The most specific text first; equal lengths in registration order."""
    return sorted(pairs, key=lambda pair: -len(pair[0]))


def load_format(spec: str | Path | Format, model_name: str = "", tokenizer: Any = None) -> Format:
    """A registered name, ``auto`` (see ``detect``), a file (a declarative ``.yaml``/``.json``
    format, or a prompt text file in Llama Guard's language), or a Format."""
    if isinstance(spec, Format):
        return spec
    if not isinstance(spec, (str, Path)):
        raise TemplateError(f"format {spec!r} is not a Format; subclass guardprob.formats.Format "
                            "(docs/formats.md, \"Adding a format\"), or give a format name or file")
    spec = str(spec)
    if spec == "auto":
        spec = detect(model_name, tokenizer)[0]
    if spec in REGISTRY:
        return REGISTRY[spec]()

    from guardprob.formats.declarative import DeclarativeFormat
    from guardprob.formats.prompt_file import PromptFileFormat

    suffix = Path(spec).suffix.lower()
    if suffix in (".yaml", ".yml", ".json"):
        return DeclarativeFormat.load(spec)
    if suffix:
        return PromptFileFormat.load(spec)
    raise TemplateError(f"unknown format {spec!r}; use auto, {', '.join(REGISTRY)} or a format file path "
                        "(`guardprob formats` lists the formats, including those found on GUARDPROB_FORMAT_PATH)")
