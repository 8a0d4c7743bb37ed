"""A prompt of the user's own, as a text file, answered in Llama Guard's verdict language.

The file holds ``{{categories}}``, ``{{conversation}}`` and ``{{role}}``; the verdict
follows its end. For other verdict languages, write a declarative format file instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guardprob.backends.base import Prompt
from guardprob.errors import TemplateError
from guardprob.formats.base import SPEAKER, Format, Parts, encode, transcript
from guardprob.formats.language import Language
from guardprob.formats.llama_guard import verdict_language
from guardprob.inputs.conversation import Message, Role
from guardprob.inputs.datafile import check_file, read_text
from guardprob.taxonomy import Taxonomy

_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_KNOWN = {"categories", "conversation", "role"}
_MARK = "\x00conversation\x00"
_NAMES = "\x00categories\x00"


@dataclass(frozen=True)
class PromptFileFormat(Format):
    name: str
    text: str
    taxonomy: str = "llama-guard-3"

    @classmethod
    def load(cls, path: str | Path) -> PromptFileFormat:
        path = Path(path)
        check_file(path, "template file", TemplateError, "give a format name (`guardprob formats` lists them) or "
                   "the path of a template file")
        text = read_text(path, "template file", TemplateError)
        found = _PLACEHOLDER.findall(text)
        unknown = sorted(set(found) - _KNOWN)
        if unknown:
            raise TemplateError(
                f"template file {path}: unknown placeholder(s) {', '.join(unknown)}; use {{{{categories}}}}, "
                "{{conversation}} and {{role}}"
            )
        if found.count("conversation") != 1:
            raise TemplateError(f"template file {path}: put {{{{conversation}}}} exactly once where the messages go")
        return cls(str(path), text)

    def language(self, taxonomy: Taxonomy, role: Role) -> Language:
        return verdict_language(taxonomy.ids)

    def render(self, messages: tuple[Message, ...], role: Role, taxonomy: Taxonomy, tokenizer: Any) -> Prompt:
        values = {"categories": _NAMES, "conversation": _MARK, "role": SPEAKER[role]}
        filled = _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.text)
        names = "\n".join(f"{c.id}: {c.name}." for c in taxonomy)
        prefix, rest = (_split_names(side, names) for side in filled.split(_MARK))
        lines = transcript(messages)
        if lines:  # the file's own text follows the last message directly
            lines[-1] = (lines[-1][0].rstrip("\n"), False)
        return encode(tokenizer, prefix, lines + rest, role)


def _split_names(text: str, names: str) -> Parts:
    """A file's text as markup, with each {{categories}} as text from outside."""
    pieces = text.split(_NAMES)
    parts: Parts = [(pieces[0], False)]
    for piece in pieces[1:]:
        parts += [(names, True), (piece, False)]
    return parts
