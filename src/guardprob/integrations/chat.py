"""Chat messages in the OpenAI shape (as LiteLLM and NeMo Guardrails pass them) as the
conversations guardprob judges."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

Turn = dict[str, str]  # {"role": "user" | "assistant", "content": text}


def message_text(content: object) -> str:
    """A message's text: the string itself, or its text parts joined by newlines (a list of
    parts such as ``{"type": "text", "text": ...}``; image and audio parts carry none)."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = [part["text"] for part in content if isinstance(part, Mapping) and isinstance(part.get("text"), str)]
        return "\n".join(texts)
    return ""


def turns(messages: Sequence[Mapping[str, object]] | None) -> list[Turn]:
    """The user and assistant messages that carry text, in order.

    System, developer and tool messages are left out: the guard's prompt knows two parties,
    the user and the agent, and those messages are neither. An assistant message that only
    calls tools has no text and is left out too."""
    kept = []
    for message in messages or ():
        role = message.get("role") if isinstance(message, Mapping) else None
        if role not in ("user", "assistant"):
            continue
        text = message_text(message.get("content"))
        if text.strip():
            kept.append({"role": role, "content": text})
    return kept


def prompt_turns(messages: Sequence[Mapping[str, object]] | None) -> list[Turn]:
    """The conversation up to and including its last user message ([] without one): what
    the model is asked to answer, so the user's role is judged."""
    kept = turns(messages)
    last_user = max((i for i, t in enumerate(kept) if t["role"] == "user"), default=-1)
    return kept[: last_user + 1]


def with_answer(messages: Sequence[Mapping[str, object]] | None, answer: str) -> list[Turn]:
    """The prompt with the model's answer after it, so the assistant's role is judged."""
    return [*prompt_turns(messages), {"role": "assistant", "content": answer}]
