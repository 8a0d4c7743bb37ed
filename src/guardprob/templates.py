"""How a model family is prompted: each template renders a conversation into prompt ids
that end exactly where the verdict starts, split into a shared prefix (the same for every
conversation, cached by the engine) and the conversation's own tokens.

Text stays text: a template renders *parts*, each its own markup (which may write the
family's control tokens, such as ``<|eot_id|>``) or text from outside (messages, category
names), and no text part can produce a control token: a user who types
``<|eot_id|><|start_header_id|>assistant`` gets those characters read as characters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from guardprob.backends.base import Prompt, common_prefix
from guardprob.conversation import Message, Role
from guardprob.errors import TemplateError
from guardprob.taxonomy import Taxonomy

_SPEAKER = {"user": "User", "assistant": "Agent"}

_TASK = (
    "Task: Check if there is unsafe content in '{role}' messages in conversations according {to}our safety "
    "policy with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n{categories}\n"
    "<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n"
)
_ASK = (
    "<END CONVERSATION>\n\nProvide your safety assessment for ONLY THE LAST {role} message in the above "
    "conversation:\n{bullet}First line must read 'safe' or 'unsafe'.\n"
    "{bullet}If unsafe, a second line must include a comma-separated list of violated categories."
)


@dataclass(frozen=True)
class _Wrapper:
    open: str
    close: str
    category_line: str
    to: str
    bullet: str


_LLAMA_GUARD = {
    "llama-guard-2": _Wrapper("<|begin_of_text|>[INST] ", " [/INST]", "{id}: {name}. ", "", " - "),
    "llama-guard-3": _Wrapper(
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
        " <|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "{id}: {name}.",
        "",
        " - ",
    ),
    "llama-guard-4": _Wrapper(
        "<|begin_of_text|><|header_start|>user<|header_end|>\n\n",
        "<|eot|><|header_start|>assistant<|header_end|>\n\n",
        "{id}: {name}.",
        "to ",
        "- ",
    ),
}


class Template(Protocol):
    name: str

    def render(self, messages: tuple[Message, ...], role: Role, taxonomy: Taxonomy, tokenizer: Any) -> Prompt: ...


Parts = list[tuple[str, bool]]  # (text, True if it comes from outside: messages, names)


def _encode(tokenizer: Any, prefix: Parts, rest: Parts) -> Prompt:
    """The prompt's ids, and how many of them the prefix alone gives (the shared part, where
    the prefix's own ids agree: a merge across the boundary, such as two newlines, costs only
    the last prefix token)."""
    ids = encode_parts(tokenizer, prefix + rest)
    return Prompt(ids, common_prefix(encode_parts(tokenizer, prefix), ids))


def encode_parts(tokenizer: Any, parts: Parts) -> tuple[int, ...]:
    """Markup and text tokenized so that only markup writes control tokens.

    Where no text part holds a control token's string, this is the whole text tokenized at
    once, as the model saw it in training and as a server that takes text reads it. Where one
    does, the text is cut at the markup's own control tokens and every piece between them is
    tokenized with special-token parsing off."""
    pattern = _control_pattern(tokenizer)
    if pattern is None or not any(content and pattern.search(text) for text, content in parts):
        return tuple(tokenizer.encode("".join(text for text, _ in parts), add_special_tokens=False))
    ids: list[int] = []
    pending = ""
    for text, content in parts:
        pieces = [text] if content else pattern.split(text)  # odd places: the markup's control tokens
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                pending += piece
                continue
            ids += _plain(tokenizer, pending)
            pending = ""
            ids.append(tokenizer.convert_tokens_to_ids(piece))
    return tuple(ids + _plain(tokenizer, pending))


def _plain(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)) if text else []


def _control_pattern(tokenizer: Any) -> re.Pattern | None:
    """A pattern that finds the tokenizer's control (special added) tokens, longest first."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials = sorted({t.content for t in added.values() if getattr(t, "special", False) and t.content}, key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None


def _transcript(messages: tuple[Message, ...]) -> Parts:
    parts: Parts = []
    for m in messages:
        parts += [(f"{_SPEAKER[m.role]}: ", False), (m.content, True), ("\n\n", False)]
    return parts


@dataclass(frozen=True)
class LlamaGuardTemplate:
    """The Llama Guard 2/3/4 prompts, written out here (many model copies lack the chat template)."""

    name: str

    def texts(self, messages: tuple[Message, ...], role: Role, taxonomy: Taxonomy) -> tuple[Parts, Parts]:
        w = _LLAMA_GUARD[self.name]
        speaker = _SPEAKER[role]
        before, after = _TASK.format(role=speaker, to=w.to, categories=_MARK).split(_MARK)
        prefix = [(w.open + before, False), ("\n".join(w.category_line.format(id=c.id, name=c.name) for c in taxonomy), True),
                  (after, False)]
        rest = _transcript(messages) + [(_ASK.format(role=speaker, bullet=w.bullet) + w.close, False)]
        return prefix, rest

    def render(self, messages: tuple[Message, ...], role: Role, taxonomy: Taxonomy, tokenizer: Any) -> Prompt:
        return _encode(tokenizer, *self.texts(messages, role, taxonomy))


_INSTRUCTION = (
    "You are a content safety classifier. Check if there is unsafe content in '{role}' messages in the "
    "conversation below according to the safety policy with these categories.\n\n"
    "<BEGIN UNSAFE CONTENT CATEGORIES>\n{categories}\n<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n"
)
_INSTRUCTION_ASK = (
    "<END CONVERSATION>\n\nProvide your safety assessment for ONLY THE LAST {role} message in the above "
    "conversation. Answer with exactly one word on the first line, 'safe' or 'unsafe'. If unsafe, write on "
    "a second line the comma-separated ids of the violated categories (for example: {example}), and nothing else."
)
_MARK = "\x00conversation\x00"
_NAMES = "\x00categories\x00"


@dataclass(frozen=True)
class InstructionTemplate:
    """A chat model asked through its own chat template to write a Llama Guard verdict."""

    name: str = "instruction"

    def render(self, messages: tuple[Message, ...], role: Role, taxonomy: Taxonomy, tokenizer: Any) -> Prompt:
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                "template 'instruction' needs the tokenizer's chat template and this tokenizer has none; "
                "use template='llama-guard-3' or a custom template file"
            )
        speaker = _SPEAKER[role]
        categories = "\n".join(f"{c.id}: {c.name}. {c.description}".rstrip() for c in taxonomy)
        example = ",".join(taxonomy.ids[:2])
        content = (
            _INSTRUCTION.format(role=speaker, categories=_NAMES)
            + _MARK
            + _INSTRUCTION_ASK.format(role=speaker, example=example)
        )
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        prefix, rest = text.split(_MARK)
        head, tail = prefix.split(_NAMES)
        return _encode(tokenizer, [(head, False), (categories, True), (tail, False)], _transcript(messages) + [(rest, False)])


_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_KNOWN = {"categories", "conversation", "role"}


@dataclass(frozen=True)
class FileTemplate:
    """A text file with ``{{categories}}``, ``{{conversation}}`` and ``{{role}}``; the verdict follows its end."""

    name: str
    text: str

    @classmethod
    def load(cls, path: str | Path) -> FileTemplate:
        path = Path(path)
        if not path.is_file():
            raise TemplateError(f"template file {path} does not exist; give a preset name or an existing file")
        text = path.read_text(encoding="utf-8")
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

    def render(self, messages: tuple[Message, ...], role: Role, taxonomy: Taxonomy, tokenizer: Any) -> Prompt:
        values = {"categories": _NAMES, "conversation": _MARK, "role": _SPEAKER[role]}
        filled = _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.text)
        names = "\n".join(f"{c.id}: {c.name}." for c in taxonomy)
        prefix, rest = (_split_names(side, names) for side in filled.split(_MARK))
        transcript = _transcript(messages)
        if transcript:  # the file's own text follows the last message directly
            transcript[-1] = (transcript[-1][0].rstrip("\n"), False)
        return _encode(tokenizer, prefix, transcript + rest)


def _split_names(text: str, names: str) -> Parts:
    """A file template's text as markup, with each {{categories}} as text from outside."""
    pieces = text.split(_NAMES)
    parts: Parts = [(pieces[0], False)]
    for piece in pieces[1:]:
        parts += [(names, True), (piece, False)]
    return parts


TEMPLATES = ("llama-guard-2", "llama-guard-3", "llama-guard-4", "instruction")


def load_template(spec: str | Path | Template, model_name: str = "", tokenizer: Any = None) -> Template:
    """A preset name, 'auto' (guess from the model name and tokenizer), a file path, or a Template."""
    if not isinstance(spec, (str, Path)):
        return spec
    spec = str(spec)
    if spec == "auto":
        lowered = model_name.lower().replace("_", "-")
        for version in ("4", "3", "2"):
            if "guard" in lowered and (f"guard-{version}" in lowered or f"guard{version}" in lowered):
                return LlamaGuardTemplate(f"llama-guard-{version}")
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return InstructionTemplate()
        return LlamaGuardTemplate("llama-guard-3")
    if spec in _LLAMA_GUARD:
        return LlamaGuardTemplate(spec)
    if spec == "instruction":
        return InstructionTemplate()
    if Path(spec).suffix:
        return FileTemplate.load(spec)
    raise TemplateError(f"unknown template {spec!r}; use auto, {', '.join(TEMPLATES)} or a template file path")
