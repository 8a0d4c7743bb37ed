"""Any instruction-tuned model as a multi-label classifier, from a YAML (or JSON) file.

The paper's instruction-tuned case and beyond safety (topics, intents): the file names the
labels, how the answer lists them and the word for none, and the instruction; the prompt goes
through the model's own chat template, and the verdict is the answer it writes::

    name: topics
    taxonomy:                       # a preset, a taxonomy file, or the categories inline
      - {id: billing, name: Billing, description: payments, invoices, refunds}
      - {id: outage, name: Outage, description: the service is down or slow}
    write: name                     # each label as its name (or: id)
    list: comma                     # comma (", "), comma-tight (","), lines, or json (["a", "b"])
    none: none                      # the answer when no label applies
    instruction: |
      Which of these topics does the last user message raise?
      {{categories}}

      Conversation:
      {{conversation}}

      Answer with the matching topics as a comma-separated list, or none.

P(unsafe) is P(the answer names any label). ``{{categories}}`` is one line per label
(``- <label>: <description>``), ``{{conversation}}`` the messages as ``User: ...`` lines.

A model that reasons before it answers (a thinking model, a policy model asked to explain
first) gets ``reasoning``: the text that closes its reasoning, what it writes between that and
the answer, and a token budget (reasoning.py)::

    reasoning: {close: "</think>", then: "\n\n", max_tokens: 512}
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guardprob.backends.base import Prompt
from guardprob.core.reasoning import Reasoning
from guardprob.errors import TemplateError
from guardprob.formats.base import SPEAKER, Format, Parts, chat_parts, encode, transcript
from guardprob.formats.language import UNSAFE, Branch, Labels, Language
from guardprob.inputs.conversation import Message, Role
from guardprob.inputs.datafile import read_data_file, show
from guardprob.taxonomy import Taxonomy, load_taxonomy, taxonomy_from_data

LISTS = {"comma": ("", ", ", ""), "comma-tight": ("", ",", ""), "lines": ("", "\n", ""), "json": ('["', '", "', '"]')}
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_KEYS = {"name", "taxonomy", "write", "list", "none", "instruction", "system", "reasoning"}
_REASONING_KEYS = {"close", "then", "max_tokens"}


@dataclass(frozen=True)
class DeclarativeFormat(Format):
    name: str
    taxonomy: str | Taxonomy
    instruction: str
    write: str = "name"
    list: str = "comma"
    none: str = "none"
    system: str | None = None
    reasoning: Reasoning | None = None
    then: str = ""  # what the model writes after its reasoning, before the answer

    @classmethod
    def load(cls, path: str | Path) -> DeclarativeFormat:
        path = Path(path)
        where = f"format file {path}"
        data = read_data_file(path, "format file", TemplateError)
        if not isinstance(data, dict):
            raise TemplateError(f"{where}: expected a mapping with 'taxonomy' and 'instruction' (see docs/formats.md), "
                                f"got {show(data)}")
        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise TemplateError(f"{where}: unknown key(s) {', '.join(unknown)}; use {', '.join(sorted(_KEYS))}")
        for key in ("taxonomy", "instruction"):
            if key not in data:
                raise TemplateError(f"{where}: '{key}' is missing; see docs/formats.md for the smallest example")
        taxonomy = data["taxonomy"]
        if isinstance(taxonomy, (list, dict)):
            taxonomy = taxonomy_from_data(taxonomy, path, where)
        elif isinstance(taxonomy, str):
            relative = path.parent / taxonomy
            taxonomy = str(relative) if relative.suffix and relative.is_file() else taxonomy
            load_taxonomy(taxonomy)  # fail at load, naming the file
        else:
            raise TemplateError(f"{where}: 'taxonomy' is {show(taxonomy)}; give a preset name, a file or a list of categories")
        texts = {k: data.get(k, d) for k, d in (("write", "name"), ("list", "comma"), ("none", "none"))}
        if texts["write"] not in ("name", "id"):
            raise TemplateError(f"{where}: 'write' is {show(texts['write'])}; use name or id")
        if texts["list"] not in LISTS:
            raise TemplateError(f"{where}: 'list' is {show(texts['list'])}; use one of {', '.join(LISTS)}")
        for key in ("instruction", "none", "system"):
            value = data.get(key, "none" if key == "none" else None)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise TemplateError(f"{where}: '{key}' is {show(value)}; write it as non-empty text")
        found = _PLACEHOLDER.findall(data["instruction"])
        if sorted(set(found) - {"categories", "conversation"}):
            raise TemplateError(f"{where}: the instruction uses {sorted(set(found) - {'categories', 'conversation'})}; "
                                "its placeholders are {{categories}} and {{conversation}}")
        if found.count("conversation") != 1:
            raise TemplateError(f"{where}: put {{{{conversation}}}} exactly once in the instruction")
        none = data.get("none", "none")
        if texts["list"] == "json":
            none = "[]"
        reasoning, then = _reasoning(data.get("reasoning"), where)
        return cls(str(data.get("name", path.stem)), taxonomy, data["instruction"], texts["write"], texts["list"], none,
                   data.get("system"), reasoning, then)

    def words(self, taxonomy: Taxonomy) -> tuple[str, ...]:
        return tuple(c.name if self.write == "name" else c.id for c in taxonomy)

    def language(self, taxonomy: Taxonomy, role: Role) -> Language:
        open_, sep, close = LISTS[self.list]
        words = self.words(taxonomy)
        if self.none in words:
            raise TemplateError(f"format {self.name!r}: the word for none, {self.none!r}, is also a label; pick another")
        branches = [Branch((self.then, self.none)),
                    Branch((self.then, open_, Labels(words, taxonomy.ids, sep), close), frozenset({UNSAFE}))]
        first = tuple(self.then + open_ + w for w in words) if not open_ else (self.then + open_,)
        return Language(branches, (*taxonomy.ids, UNSAFE), first_words=first)

    def render(self, messages: tuple[Message, ...], role: Role, taxonomy: Taxonomy, tokenizer: Any) -> Prompt:
        lines = "\n".join(f"- {w}" + (f": {c.description}" if c.description else "") for w, c in zip(self.words(taxonomy), taxonomy))
        before, after = _PLACEHOLDER.sub(lambda m: "\x00c\x00" if m.group(1) == "categories" else "\x00m\x00",
                                         self.instruction).split("\x00m\x00")
        conversation = transcript(messages, SPEAKER, "\n")
        if conversation:
            conversation[-1] = (conversation[-1][0].rstrip("\n"), False)

        def parts(text: str) -> Parts:
            out: Parts = []
            for i, piece in enumerate(text.split("\x00c\x00")):
                out += ([(lines, True)] if i else []) + [(piece, False)]
            return out

        marker = "\x00conversation\x00"
        whole = chat_parts(tokenizer, parts(before) + [(marker, False)] + parts(after), system=self.system)
        at = next(i for i, (text, _) in enumerate(whole) if text == marker)
        return encode(tokenizer, whole[:at], conversation + whole[at + 1:], role)


def _reasoning(value: object, where: str) -> tuple[Reasoning | None, str]:
    """The ``reasoning`` setting: None, or a mapping with ``close`` (and ``then``, ``max_tokens``)."""
    if value is None:
        return None, ""
    hint = 'write it as {close: "</think>", then: "\\n\\n", max_tokens: 512}'
    if not isinstance(value, dict):
        raise TemplateError(f"{where}: 'reasoning' is {show(value)}; {hint}")
    unknown = sorted(set(value) - _REASONING_KEYS)
    if unknown:
        raise TemplateError(f"{where}: unknown reasoning key(s) {', '.join(map(str, unknown))}; use close, then, max_tokens")
    close, then, budget = value.get("close"), value.get("then", ""), value.get("max_tokens", 512)
    if not isinstance(close, str) or not close:
        raise TemplateError(f"{where}: reasoning needs 'close', the text that ends the reasoning; {hint}")
    if not isinstance(then, str):
        raise TemplateError(f"{where}: reasoning 'then' is {show(then)}; write it as text (may be empty)")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise TemplateError(f"{where}: reasoning 'max_tokens' is {show(budget)}; use a positive number of tokens")
    return Reasoning(close, budget), then
