"""Conversations to judge: validated messages with the roles the guard prompts know."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from guardprob.errors import InputError, RoleError
from guardprob.inputs.datafile import check_file, unicode_problem
from guardprob.inputs.reader import Message, Party, read_messages

__all__ = ["ConversationLike", "Message", "Role", "judged_role", "to_messages"]

Role = Party
# The judged role's names: the two parties, in any case
_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "agent": "assistant", "model": "assistant",
            "ai": "assistant", "bot": "assistant"}

ConversationLike = str | Sequence[Mapping[str, object]] | Sequence[Message]


def to_messages(conversation: ConversationLike) -> tuple[Message, ...]:
    """A string is one user message; a list holds chat messages in any shape the reader takes
    (guardprob.inputs.reader: roles in any case and their aliases, content as text, one part or a list
    of parts, tool calls and results, Responses API items). What is not text is refused."""
    if isinstance(conversation, str):
        conversation = [{"role": "user", "content": conversation}]
    if not isinstance(conversation, Sequence) or not conversation:
        raise InputError("the conversation is empty; pass a non-empty string or a list of {'role', 'content'} messages")
    messages = read_messages(conversation, "messages")
    for i, message in enumerate(messages):
        problem = unicode_problem(message.content)
        if problem:  # JSON's \ud800 escapes can carry one; no tokenizer can read it
            raise InputError(f"message {i} ({message.role}) is {problem}; send valid Unicode text")
    return messages


def judged_role(messages: Sequence[Message], role: str | None) -> Role:
    """The role whose last message is judged: the last message's role unless one is asked for."""
    last = messages[-1].role
    if role is None:
        return last
    wanted = _ALIASES.get(role.lower()) if isinstance(role, str) else None
    if wanted is None:
        raise RoleError(f"role {role!r} is unknown; judge 'user' or 'assistant' (agent)")
    if wanted != last:
        raise RoleError(
            f"the conversation ends with a {last} message but the {wanted} role is judged; "
            f"end the conversation with the {wanted} message to judge, or judge role={last!r}"
        )
    return wanted


def row_conversation(row: dict, messages: str = "messages", text: str = "text", prompt: str = "prompt",
                     response: str = "response") -> ConversationLike | None:
    """A data row's conversation, or None: ``messages`` (a list, or that list as a JSON string),
    else ``prompt`` with ``response`` (the response is judged), else ``text``. Empty values
    count as absent; the column names can be renamed."""

    def present(key: str) -> bool:
        return row.get(key) not in (None, "")

    if present(messages):
        raw = row[messages]
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError:
                raise InputError(f"column {messages!r} is not a JSON list of messages") from None
        return raw
    if present(prompt) and present(response):
        return [{"role": "user", "content": row[prompt]}, {"role": "assistant", "content": row[response]}]
    return row[text] if present(text) else None


def conversation_from_row(row: object, where: str) -> ConversationLike:
    """One JSON row to score: as ``row_conversation`` reads it, else ``unsafe_query`` (the
    paper's files) or ``prompt`` alone."""
    if isinstance(row, dict):
        found = row_conversation(row)
        if found is None:
            found = next((row[k] for k in ("unsafe_query", "prompt") if row.get(k) not in (None, "")), None)
        if found is not None:
            return found
    raise InputError(f"{where}: expected an object with 'messages', 'text', 'unsafe_query' or 'prompt'")


def read_conversations(path: str | Path) -> Iterator[ConversationLike]:
    """The conversations of a JSONL file ('-': standard input), one per non-empty line."""
    if str(path) != "-":
        check_file(Path(path), "conversations file", InputError, "give a .jsonl file with one conversation per line")
    stream = sys.stdin if str(path) == "-" else open(path, encoding="utf-8")
    with stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}, line {number}: not valid JSON ({exc.msg}); write one JSON object per line") from None
            yield conversation_from_row(row, f"{path}, line {number}")
