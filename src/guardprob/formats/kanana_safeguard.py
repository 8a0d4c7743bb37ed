"""Kanana Safeguard: one added token, ``<SAFE>`` or ``<UNSAFE-S4>`` (the violated category's code).

Source: the model cards of kakaocorp/kanana-safeguard-8b
(https://huggingface.co/kakaocorp/kanana-safeguard-8b), kakaocorp/kanana-safeguard-siren-8b and
kakaocorp/kanana-safeguard-prompt-2.1b: the verdict is a single token, ``<SAFE>`` or
``<UNSAFE-`` code ``>``, and the cards' code asks through the tokenizer's own chat template
(``apply_chat_template`` over the user message and the assistant's answer, an empty answer
when the user is judged, without a generation prompt) and reads the next token. The
instruction is the template's: the prompt is exactly that render, and the verdict is the next
token. The models judge one exchange (no multi-turn context): the last user message and, for
``kanana-safeguard``, the answer to it.

- ``kanana-safeguard``: harmful content in a user message or an answer, S1..S7.
- ``kanana-safeguard-siren``: legal and policy risks in a user message, I1..I4.
- ``kanana-safeguard-prompt``: prompt attacks in a user message, A1 and A2.

The verdict tokens are added tokens that look like markup, so the project's control-token
rule (controls.py) reads them as control tokens in a prompt; ``verdict_tokens`` names them so
that the grammar reads them as the verdict's text (the single-token verdict the model writes),
alongside any spelling of the same text in plain tokens. The verdict is whole once written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from guardprob.backends.base import Prompt
from guardprob.errors import InputError, TemplateError
from guardprob.formats.base import Format, encode
from guardprob.formats.language import UNSAFE, Branch, Language
from guardprob.formats.registry import register_format
from guardprob.inputs.conversation import Message, Role
from guardprob.taxonomy import Category, Taxonomy


def _taxonomy(name: str, rows: tuple[tuple[str, str, str], ...]) -> Taxonomy:
    return Taxonomy(name, tuple(Category(*row) for row in rows))


# The cards' risk tables: codes and names as the cards give them, descriptions summarised in English
# (the prompt does not list them: the chat template holds the instruction).
HARM = _taxonomy("kanana-safeguard", (
    ("S1", "Hate", "Demeaning or discriminating against people for their identity or protected characteristics."),
    ("S2", "Bullying", "Insulting, mocking, threatening or harassing an individual."),
    ("S3", "Sexual Content", "Sexual acts, explicit sexual descriptions or sexual exploitation."),
    ("S4", "Crime", "Planning, encouraging or helping with crimes, violence, weapons or drugs."),
    ("S5", "Child Sexual Abuse", "Sexualising or sexually exploiting minors."),
    ("S6", "Suicide & Self-Harm", "Encouraging, glorifying or explaining suicide or self-harm."),
    ("S7", "Misinformation", "False or misleading claims presented as fact."),
))
LEGAL = _taxonomy("kanana-safeguard-siren", (
    ("I1", "Adult Content", "Requests for information harmful to minors: alcohol, tobacco, gambling, adult-only content."),
    ("I2", "Professional Advice", "Requests for medical, legal, tax or financial advice."),
    ("I3", "Personal Information", "Requests for, or disclosure of, personal or sensitive information."),
    ("I4", "Intellectual Property", "Requests to use or reproduce copyrighted content without permission."),
))
ATTACK = _taxonomy("kanana-safeguard-prompt", (
    ("A1", "Prompt Injection", "Manipulating the model to ignore its instructions or change the system's behaviour."),
    ("A2", "Prompt Leaking", "Trying to extract the system prompt, training data or other hidden information."),
))
SAFE = "<SAFE>"


def token(category_id: str) -> str:
    return f"<UNSAFE-{category_id}>"


def verdict_language(taxonomy: Taxonomy) -> Language:
    """``<SAFE>`` or one ``<UNSAFE-id>``, whole once written."""
    branches = [Branch((SAFE,), frozenset(), open_end=True)]
    branches += [Branch((token(c),), frozenset({c, UNSAFE}), open_end=True) for c in taxonomy.ids]
    return Language(branches, (*taxonomy.ids, UNSAFE), first_words=("<UNSAFE-",))


@register_format("kanana-safeguard", markers=("kanana-safeguard",))
@register_format("kanana-safeguard-siren", markers=("kanana-safeguard-siren",), taxonomy=LEGAL, answers=False)
@register_format("kanana-safeguard-prompt", markers=("kanana-safeguard-prompt",), taxonomy=ATTACK, answers=False)
@dataclass(frozen=True)
class KananaSafeguardFormat(Format):
    name: str = "kanana-safeguard"
    taxonomy: Taxonomy = HARM
    answers: bool = True  # judges an assistant's answer too (siren and prompt judge user messages only)

    def verdict_tokens(self, taxonomy: Taxonomy) -> tuple[str, ...]:
        return (SAFE, *(token(c) for c in taxonomy.ids))

    def language(self, taxonomy: Taxonomy, role: Role) -> Language:
        return verdict_language(taxonomy)

    def render(self, messages: tuple[Message, ...], role: Role, taxonomy: Taxonomy, tokenizer: Any) -> Prompt:
        if role == "assistant" and not self.answers:
            raise InputError(f"the {self.name} format judges user messages only; judge the user's message, "
                             "or use kanana-safeguard for an assistant's answer")
        users = [m for m in messages if m.role == "user"]
        if not users:
            raise InputError(f"the {self.name} format judges a user message; the conversation has no user message")
        answer = messages[-1].content if role == "assistant" else ""
        before, between, after = _template(tokenizer)
        return encode(tokenizer, [(before, False)],
                      [(users[-1].content, True), (between, False), (answer, True), (after, False)], role)


def _template(tokenizer: Any) -> tuple[str, str, str]:
    """The chat template's render of a user message and an answer, cut where the two go."""
    if not tokenizer.chat_template:
        raise TemplateError("the kanana-safeguard formats ask through the model's own chat template (it holds the "
                            "instruction) and this tokenizer has none; use the model's own tokenizer")
    marks = ("\x00user\x00", "\x00answer\x00")
    text = tokenizer.apply_chat_template([{"role": "user", "content": marks[0]}, {"role": "assistant", "content": marks[1]}],
                                         tokenize=False)
    if text.count(marks[0]) != 1 or text.count(marks[1]) != 1 or text.index(marks[0]) > text.index(marks[1]):
        raise TemplateError("the tokenizer's chat template does not write the user message and then the answer once "
                            "each; use the model's own tokenizer")
    before, rest = text.split(marks[0])
    between, after = rest.split(marks[1])
    return before, between, after

