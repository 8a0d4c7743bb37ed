"""Conversations to judge: validated messages with the roles the guard prompts know."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from guardprob.errors import InputError

Role = Literal["user", "assistant"]
_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "agent": "assistant", "model": "assistant"}


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


ConversationLike = str | Sequence[Mapping[str, object]] | Sequence[Message]


def to_messages(conversation: ConversationLike) -> tuple[Message, ...]:
    """A string is one user message; a list holds ``{"role", "content"}`` mappings."""
    if isinstance(conversation, str):
        conversation = [{"role": "user", "content": conversation}]
    if not isinstance(conversation, Sequence) or not conversation:
        raise InputError("the conversation is empty; pass a non-empty string or a list of {'role', 'content'} messages")
    messages = []
    for i, raw in enumerate(conversation):
        if isinstance(raw, Message):
            role, content = raw.role, raw.content
        elif isinstance(raw, Mapping):
            role, content = raw.get("role"), raw.get("content")
        else:
            raise InputError(f"message {i} is a {type(raw).__name__}; each message must be a mapping with 'role' and 'content'")
        if not isinstance(role, str) or role.lower() not in _ALIASES:
            raise InputError(
                f"message {i} has role {role!r}; use 'user' or 'assistant' (aliases: {', '.join(sorted(_ALIASES))})"
            )
        if not isinstance(content, str):
            raise InputError(f"message {i} has content of type {type(content).__name__}; content must be a string")
        if not content.strip():
            raise InputError(f"message {i} ({role}) is empty or whitespace only; give the text to judge")
        messages.append(Message(_ALIASES[role.lower()], content))  # type: ignore[arg-type]
    return tuple(messages)


def judged_role(messages: Sequence[Message], role: str | None) -> Role:
    """The role whose last message is judged: the last message's role unless one is asked for."""
    last = messages[-1].role
    if role is None:
        return last
    wanted = _ALIASES.get(role.lower()) if isinstance(role, str) else None
    if wanted is None:
        raise InputError(f"role {role!r} is unknown; judge 'user' or 'assistant' (agent)")
    if wanted != last:
        raise InputError(
            f"the conversation ends with a {last} message but the {wanted} role is judged; "
            f"end the conversation with the {wanted} message to judge, or judge role={last!r}"
        )
    return wanted
