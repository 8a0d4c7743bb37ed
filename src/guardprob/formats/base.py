"""What a format is, and the prompt-building every format shares.

A *format* is one guard family's way of being asked and of answering: it renders a
conversation into prompt ids that end exactly where the verdict starts (split into a shared
prefix and the conversation's own tokens), and it gives the verdict language the model
answers in (``formats/language.py``). Everything else in guardprob talks to this protocol.

Text stays text: a format renders *parts*, each its own markup (which may write the
family's control tokens, such as ``<|eot_id|>``) or text from outside (messages, category
names), and no text part can produce a control token (``controls.py`` says which tokens are
control tokens): a user who types ``<|eot_id|><|start_header_id|>assistant`` gets those
characters read as characters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from guardprob.backends.base import Prompt, common_prefix
from guardprob.core.reasoning import Reasoning
from guardprob.errors import InputError, TemplateError
from guardprob.formats.language import Language
from guardprob.formats.registry import load_taxonomy
from guardprob.inputs.controls import controls, count_controls, text_ids
from guardprob.inputs.conversation import Message, Role
from guardprob.taxonomy import Taxonomy


class Format(ABC):
    """A guard family's prompt and verdict language: the base of every format.

    A format is a frozen dataclass that subclasses this and registers itself with
    ``@register_format`` (``formats/registry.py``; docs/formats.md, "Adding a format").

    name: how the registry and the results call it.
    taxonomy: the taxonomy its prompt is written for (the default): a preset name, or a
    ``Taxonomy`` written in the format's own file.

    Capabilities, each with its default here (a subclass sets the ones it has):

    per_category: the format asks one question per category (ShieldGemma, Granite Guardian);
    its ``language`` is then asked with a one-category taxonomy and ``render`` returns
    ``questions(...)``.
    reasoning: how the model reasons before its verdict (None: it answers at once).
    """

    name: str
    taxonomy: str | Taxonomy
    per_category: bool = False
    reasoning: Reasoning | None = None

    @abstractmethod
    def language(self, taxonomy: Taxonomy, role: Role) -> Language:
        """The verdicts the model may write when judging ``role``'s last message."""

    @abstractmethod
    def render(self, messages: tuple[Message, ...], role: Role, taxonomy: Taxonomy, tokenizer: Any) -> Prompt:
        """The prompt that ends where the verdict starts."""

    def verdict_tokens(self, taxonomy: Taxonomy) -> tuple[str, ...]:
        """Added tokens the verdict is written in, one token per verdict word (Kanana
        Safeguard's ``<SAFE>``): the grammar reads them as text even where the tokenizer
        flags them special. None by default."""
        return ()

    def default_taxonomy(self) -> Taxonomy:
        """The taxonomy the format's prompt is written for."""
        return load_taxonomy(self.taxonomy)  # the registered formats' own taxonomies included


Parts = list[tuple[str, bool]]  # (text, True if it comes from outside: messages, names)

SPEAKER = {"user": "User", "assistant": "Agent"}


def encode(tokenizer: Any, prefix: Parts, rest: Parts, role: Role = "user") -> Prompt:
    """The prompt's ids, and how many of them the prefix alone gives (the shared part, where
    the prefix's own ids agree: a merge across the boundary, such as two newlines, costs only
    the last prefix token)."""
    ids = encode_parts(tokenizer, prefix + rest)
    return Prompt(ids, common_prefix(encode_parts(tokenizer, prefix), ids), role)


def encode_parts(tokenizer: Any, parts: Parts) -> tuple[int, ...]:
    """Markup and text tokenized so that only markup writes control tokens (``controls.py``:
    special tokens, the tokenizer's named tokens, added tokens that are markup or placeholders).

    Where the whole text tokenized at once holds exactly the markup's own control tokens and no
    text part spells one out, that is the prompt: the text as the model saw it in training and as
    a server that takes text reads it. Otherwise the text is cut at the markup's control tokens
    and every piece between them is read as text (``text_ids``), so that no control token can
    come from a message; if one still does (a tokenizer whose vocabulary spells a control token
    from plain characters), the prompt is refused rather than scored."""
    found = controls(tokenizer)
    own: dict[int, int] = {}  # the markup's control tokens, by id
    for text, content in parts:
        if not content and found.pattern is not None:
            for piece in found.pattern.findall(text):
                own[found.strings[piece]] = own.get(found.strings[piece], 0) + 1
    spelled = found.pattern is not None and any(content and found.pattern.search(text) for text, content in parts)
    if not spelled:
        whole = tuple(tokenizer.encode("".join(text for text, _ in parts), add_special_tokens=False))
        if count_controls(whole, found) == own:
            return whole
    ids: list[int] = []
    pending = ""
    for text, content in parts:
        pieces = [text] if content or found.pattern is None else found.pattern.split(text)  # odd places: controls
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                pending += piece
                continue
            ids += text_ids(tokenizer, pending)
            pending = ""
            ids.append(found.strings[piece])
    ids += text_ids(tokenizer, pending)
    # the unknown token is the model's reading of a character it cannot spell, never its spelled-out text here
    if count_controls(ids, found, unknown=False) != {i: n for i, n in own.items() if i != found.unknown}:
        raise InputError(
            "this tokenizer reads part of the conversation's text as control tokens even when it is read as plain "
            "text, which could talk past the guard; remove the spelled-out control tokens from the conversation"
        )
    return tuple(ids)


def transcript(messages: tuple[Message, ...], speakers: dict[str, str] = SPEAKER, between: str = "\n\n") -> Parts:
    """``Speaker: text`` per message, each followed by ``between``."""
    parts: Parts = []
    for m in messages:
        parts += [(f"{speakers[m.role]}: ", False), (m.content, True), (between, False)]
    return parts


def chat_parts(tokenizer: Any, content: Parts, *, system: str | Parts | None = None, **kwargs: Any) -> Parts:
    """``content`` as one user turn through the tokenizer's own chat template, ready for the
    answer: the template's markup stays markup and the content's text parts stay text.

    system: a system message before it, as markup (a string) or as parts (text parts in it,
    such as category names, stay text)."""
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            "this format asks through the tokenizer's chat template and this tokenizer has none; "
            "use a tokenizer with a chat template, or a format that writes its own prompt (such as llama-guard-3)"
        )
    system_parts: Parts = [(system, False)] if isinstance(system, str) else list(system or [])
    parts = system_parts + list(content)
    marks = [f"\x00{i}\x00" for i in range(len(parts))]
    messages = [{"role": "user", "content": "".join(marks[len(system_parts):])}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": "".join(marks[:len(system_parts)])})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    out: Parts = []
    for mark, part in zip(marks, parts):
        if mark not in text:
            raise TemplateError("the tokenizer's chat template leaves out part of the prompt (a system message?); "
                                "use a tokenizer whose template writes every message")
        before, text = text.split(mark, 1)
        out += [(before, False), part]
    return out + [(text, False)]


def questions(tokenizer: Any, fixed: Parts, conversation: Parts, asks: list[tuple[str, Parts]], role: Role = "user") -> Prompt:
    """A prompt that asks one question per category after a shared conversation.

    Each question's whole prompt is tokenized as the family's own code would tokenize it,
    so its ids are exactly those of a prompt of its own; the prompt's ``ids`` are what all
    of them share and each question keeps the rest (the search's tree for that category
    starts after it, over one prefill of the shared part). ``fixed``: the text before the
    conversation, the same for every conversation (the engine's shared prefix)."""
    whole = [encode_parts(tokenizer, fixed + conversation + rest) for _, rest in asks]
    shared = whole[0]
    for ids in whole[1:]:
        shared = shared[: common_prefix(shared, ids)]
    shared = shared[: min(len(ids) for ids in whole) - 1]  # every question keeps at least one token
    head = common_prefix(encode_parts(tokenizer, fixed), shared)
    return Prompt(shared, head, role, tuple((cid, ids[len(shared):]) for (cid, _), ids in zip(asks, whole)))
