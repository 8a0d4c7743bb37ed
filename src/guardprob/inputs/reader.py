"""One reader of conversations: every request shape a user of guardprob's entry points can send
(the Python API, the CLI, the service, the LiteLLM guardrail, the NeMo Guardrails action), read
into the messages the guard judges (docs/integrations/shapes.md lists the shapes).

Every text a model would read is kept, in the party whose turn it is: the user's side (user,
system and developer messages, tool and function results) or the assistant's (its text, its
refusals, the tool calls it made, with their arguments). What the guard cannot read as text (an
image, audio, a file, token ids of another model, an item stored with the provider) is an
``Unread`` entry: the strict readers raise ``UnreadableError`` naming it; the request reader
returns it, for the integrations' ``on_unreadable`` setting to decide. A shape that is malformed
(a number for content, an unknown role) is an ``InputError`` either way. Nothing is dropped in
silence."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from guardprob.errors import InputError, UnreadableError

Party = Literal["user", "assistant"]

# Role names in any case, and the usual aliases: whose side of the conversation a message is on.
ROLES: Mapping[str, Party] = {
    **dict.fromkeys(("user", "human", "system", "developer", "tool", "function", "ipython"), "user"),
    **dict.fromkeys(("assistant", "ai", "bot", "model", "agent"), "assistant"),
}
TEXT_PARTS = ("text", "input_text", "output_text", "summary_text", "reasoning_text")
# Request fields that carry what a model reads, in the order they are read.
TEXT_FIELDS = ("system", "instructions", "system_instruction", "systemInstruction", "messages", "contents", "input",
               "prompt", "suffix", "query", "documents")


@dataclass(frozen=True)
class Message:
    role: Party
    content: str


@dataclass(frozen=True)
class Unread:
    """Something a model would read that the guard cannot: where it is and what it is."""

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where} ({self.what})"


@dataclass(frozen=True)
class Reading:
    """A request read: the conversations it holds (each judged on its own: a list of prompts is
    several requests in one), and what in it could not be read."""

    conversations: tuple[tuple[Message, ...], ...]
    unread: tuple[Unread, ...] = ()


def unreadable_error(unread: Sequence[Unread]) -> UnreadableError:
    """The error that names what could not be read, and the ways on."""
    shown = "; ".join(map(str, unread[:5])) + (f"; and {len(unread) - 5} more" if len(unread) > 5 else "")
    return UnreadableError(f"guardprob reads text only and cannot judge {shown}; send the text itself "
                           "(token ids as the text they encode, an image's text as text)")


class _Reader:
    """Reads one value at a time; ``unread`` collects what is not text (strict: raises at once)."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.unread: list[Unread] = []

    def skip(self, where: str, what: str) -> list[str]:
        found = Unread(where, what)
        if self.strict:
            raise unreadable_error([found])
        self.unread.append(found)
        return []

    # -- messages ---------------------------------------------------------------------------------
    def messages(self, raw: object, where: str) -> list[Message]:
        if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
            raise InputError(f"{where} is {_kind(raw)}; give a list of {{'role', 'content'}} messages")
        found = []
        for i, item in enumerate(raw):
            said = self.item(item, f"{where}[{i}]")
            if self.strict and not said:
                raise InputError(f"{where}[{i}].content is empty or whitespace only; give the text to judge")
            found.extend(said)
        return found

    def item(self, item: object, where: str) -> list[Message]:
        """A chat message, or an item of the Responses API's ``input`` (a message too, a tool call,
        a tool's output, a reasoning summary)."""
        if isinstance(item, Message):  # checked as any message is
            item = {"role": item.role, "content": item.content}
        if isinstance(item, str) and not self.strict:  # a bare text among items (moderation input)
            return _said("user", [item])
        if not isinstance(item, Mapping):
            raise InputError(f"{where} is {_kind(item)}; each message must be a mapping with 'role' and 'content'")
        kind = item.get("type")
        if "role" in item and kind in (None, "message"):
            party = party_of(item.get("role"), f"{where}.role")
            return _said(party, self.message_texts(item, where))
        if kind in ("function_call", "custom_tool_call", "mcp_call"):
            said = _said("assistant", [self.call(item, where)])
            if kind == "mcp_call" and item.get("output") is not None:
                said += _said("user", self.content(item.get("output"), f"{where}.output"))
            return said
        if kind in ("function_call_output", "custom_tool_call_output"):
            return _said("user", self.content(item.get("output"), f"{where}.output"))
        if kind == "reasoning":
            texts = self.content(item.get("summary"), f"{where}.summary") + self.content(item.get("content"),
                                                                                           f"{where}.content")
            if item.get("encrypted_content"):
                self.skip(f"{where}.encrypted_content", "encrypted reasoning")
            return _said("assistant", texts)
        if kind in TEXT_PARTS or kind is None and isinstance(item.get("text"), str):
            return _said("user", self.part(item, where))
        if "role" not in item and kind is None:
            raise InputError(f"{where} has no 'role'; give each message a role (user, assistant, system, tool)")
        return _said("user", self.skip(where, f"a {kind!r} item"))

    def message_texts(self, message: Mapping, where: str) -> list[str]:
        texts = self.content(message.get("content"), f"{where}.content")
        texts += self.content(message.get("parts"), f"{where}.parts")  # Gemini's contents
        if isinstance(message.get("refusal"), str):
            texts.append(message["refusal"])
        for key in ("reasoning_content", "thinking"):
            if isinstance(message.get(key), str):
                texts.append(message[key])
        calls = message.get("tool_calls")
        if calls is not None:
            if isinstance(calls, (str, bytes)) or not isinstance(calls, Sequence):
                raise InputError(f"{where}.tool_calls is {_kind(calls)}; give a list of tool calls")
            texts.extend(self.call(call, f"{where}.tool_calls[{i}]") for i, call in enumerate(calls))
        if message.get("function_call") is not None:
            texts.append(self.call(message["function_call"], f"{where}.function_call"))
        if message.get("audio") is not None:
            self.skip(f"{where}.audio", "audio")
        return texts

    def call(self, call: object, where: str) -> str:
        """A tool call as the model wrote it: ``name(arguments)``."""
        if not isinstance(call, Mapping):
            raise InputError(f"{where} is {_kind(call)}; a tool call is a mapping with its name and arguments")
        inner = call.get("function") or call.get("custom") or call
        if not isinstance(inner, Mapping):
            raise InputError(f"{where}.function is {_kind(inner)}; give {{'name', 'arguments'}}")
        name = inner.get("name")
        arguments = next((inner[k] for k in ("arguments", "input") if inner.get(k) is not None), "")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        return f"{name if isinstance(name, str) else ''}({arguments})"

    # -- content ----------------------------------------------------------------------------------
    def content(self, content: object, where: str) -> list[str]:
        """A message's content: a string, one part, or a list of parts (or strings)."""
        if content is None:
            return []
        if isinstance(content, str):
            return [content]
        if isinstance(content, Mapping):
            return self.part(content, where)
        if isinstance(content, Sequence) and not isinstance(content, bytes):
            return [text for i, part in enumerate(content) for text in self.part(part, f"{where}[{i}]")]
        raise InputError(f"{where} has content of type {type(content).__name__}; give text, a part such as "
                         "{'type': 'text', 'text': ...}, or a list of parts")

    def part(self, part: object, where: str) -> list[str]:
        if isinstance(part, str):
            return [part]
        if not isinstance(part, Mapping):
            raise InputError(f"{where} is {_kind(part)}; a content part is a mapping such as "
                             "{'type': 'text', 'text': ...}")
        kind = part.get("type", "text" if "text" in part else None)
        if kind in TEXT_PARTS:
            return [_text(part.get("text"), f"{where}.text")]
        if kind == "refusal":
            return [_text(part.get("refusal"), f"{where}.refusal")]
        if kind == "thinking":
            return [_text(part.get("thinking"), f"{where}.thinking")]
        if kind == "tool_use":  # Anthropic's tool call block
            return [self.call(part, where)]
        if kind == "tool_result":  # Anthropic's tool result block
            return self.content(part.get("content"), f"{where}.content")
        for key in ("function_call", "functionCall"):  # Gemini's parts
            if kind is None and isinstance(part.get(key), Mapping):
                return [self.call({"name": part[key].get("name"), "arguments": part[key].get("args")}, where)]
        for key in ("function_response", "functionResponse"):
            if kind is None and isinstance(part.get(key), Mapping):
                return [json.dumps(part[key].get("response"), ensure_ascii=False)]
        return self.skip(where, f"a {kind!r} part" if isinstance(kind, str) else "a part without a type")

    # -- prompts and texts ------------------------------------------------------------------------
    def prompts(self, raw: object, where: str) -> list[str]:
        """A completion's ``prompt`` (or embedding-style ``input``): a text, a list of texts, or
        token ids (one list or several), each its own request; token ids are not text."""
        if isinstance(raw, str):
            return [raw]
        if _is_ids(raw):
            return self.skip(where, "token ids")
        if isinstance(raw, Sequence) and not isinstance(raw, bytes):
            texts = []
            for i, item in enumerate(raw):
                if isinstance(item, str):
                    texts.append(item)
                elif _is_ids(item):
                    self.skip(f"{where}[{i}]", "token ids")
                else:
                    raise InputError(f"{where}[{i}] is {_kind(item)}; give a prompt as text or a list of texts")
            return texts
        raise InputError(f"{where} is {_kind(raw)}; give a prompt as text or a list of texts")


def party_of(role: object, where: str = "role") -> Party:
    """'User', 'human', 'system', 'tool' -> 'user'; 'Assistant', 'ai', 'bot', 'model' -> 'assistant'."""
    party = ROLES.get(role.strip().lower()) if isinstance(role, str) else None
    if party is None:
        raise InputError(f"{where}: role {role!r} is unknown; use user, assistant, system, developer or tool (any "
                         f"case; aliases: {', '.join(sorted(ROLES))})")
    return party


def read_messages(raw: object, where: str = "messages") -> tuple[Message, ...]:
    """A conversation given as chat messages (or Responses API items), strictly: what is not text
    raises ``UnreadableError``, an empty message ``InputError``."""
    found = _Reader(strict=True).messages(raw, where)
    if not found:
        raise InputError(f"{where} holds no text to judge; give at least one message with text")
    return tuple(found)


def read_texts(raw: object, where: str = "input") -> list[str]:
    """Moderation-style ``input``, strictly: a text, or a list whose items are each a text or a
    text part, one text per item; what is not text raises ``UnreadableError``."""
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, (bytes, Mapping)) or not isinstance(raw, Sequence):
        raise InputError(f"{where} is {_kind(raw)}; give a text or a list of texts")
    reader = _Reader(strict=True)
    return ["\n\n".join(reader.part(item, f"{where}[{i}]")) for i, item in enumerate(raw)]


def read_request(data: Mapping[str, Any]) -> Reading:
    """A request body as an OpenAI-compatible API (or LiteLLM's proxy) takes it: chat
    ``messages`` (with Anthropic's ``system``), the Responses API's ``input`` with its
    ``instructions``, a completion's ``prompt`` with its ``suffix``, moderation or embedding
    ``input``, Gemini's ``contents`` with its ``system_instruction``. Each field present is read; a list of prompts or texts is one conversation each.
    A request with none of these fields holds nothing the guard can read: one ``Unread``."""
    reader = _Reader(strict=False)
    head: list[Message] = []  # system text and instructions: read before every conversation
    for key in ("system", "instructions", "system_instruction", "systemInstruction"):
        given = data.get(key)
        if isinstance(given, Mapping) and "parts" in given:  # Gemini's {"parts": [...]}
            head.extend(_said("user", reader.content(given["parts"], f"{key}.parts")))
        elif given is not None:
            head.extend(_said("user", reader.content(given, key)))
    conversations: list[list[Message]] = []
    if data.get("messages") is not None:
        conversations.append(head + reader.messages(data["messages"], "messages"))
    contents = data.get("contents")  # Gemini's generateContent: {"role", "parts"} turns, or parts of one
    if contents is not None:
        if isinstance(contents, Sequence) and not isinstance(contents, (str, bytes)) and all(
                isinstance(c, Mapping) and "role" in c for c in contents):
            conversations.append(head + reader.messages(contents, "contents"))
        else:
            conversations.append(head + _said("user", reader.content(contents, "contents")))
    given = data.get("input")
    if given is not None:
        if isinstance(given, Sequence) and not isinstance(given, (str, bytes)) and any(
                isinstance(x, Mapping) for x in given):
            conversations.append(head + reader.messages(given, "input"))  # items or parts: one conversation
        else:
            conversations.extend(head + _said("user", [text]) for text in reader.prompts(given, "input"))
    if data.get("prompt") is not None:
        suffix = data.get("suffix")
        if suffix is not None and not isinstance(suffix, str):
            raise InputError(f"suffix is {_kind(suffix)}; give it as text")
        prompts = reader.prompts(data["prompt"], "prompt")
        for text in prompts or [""]:  # no text prompt (token ids): the suffix is still read
            conversations.append(head + _said("user", [text, suffix] if suffix else [text]))
    if data.get("query") is not None or data.get("documents") is not None:  # a rerank: the query and its documents
        query = _said("user", reader.content(data.get("query"), "query"))
        documents = _said("user", reader.content(data.get("documents"), "documents"))
        conversations.append(head + query + documents)
    if data.get("previous_response_id") is not None:
        reader.skip("previous_response_id", "a conversation stored with the provider")
    if not conversations and head:
        conversations.append(head)
    if not conversations and not reader.unread and not any(data.get(k) is not None for k in TEXT_FIELDS):
        reader.skip("the request", f"none of {', '.join(TEXT_FIELDS)}")
    kept = tuple(tuple(c) for c in conversations if c)
    return Reading(kept, tuple(reader.unread))


def read_answer(response: Any) -> Reading:
    """A model's answers, one conversation of one assistant message per choice: a chat
    completion's messages (text, refusal, tool calls), a text completion's texts, a Responses
    API answer's output items. No conversation for an answer that holds none of these (an
    embedding, an image)."""
    if hasattr(response, "model_dump"):
        response = response.model_dump()
    if not isinstance(response, Mapping):
        return Reading(())
    reader = _Reader(strict=False)
    answers: list[list[Message]] = []
    for i, choice in enumerate(response.get("choices") or ()):
        if isinstance(choice, Mapping):
            message = choice.get("message")
            texts = reader.message_texts(message, f"choices[{i}].message") if isinstance(message, Mapping) else []
            answers.append(_said("assistant", [*texts, *([choice["text"]] if isinstance(choice.get("text"), str) else [])]))
    output = response.get("output")
    if isinstance(output, Sequence) and not isinstance(output, (str, bytes)):
        said = [m for i, item in enumerate(output) if isinstance(item, Mapping) for m in reader.item(item, f"output[{i}]")]
        answers.append(_said("assistant", [m.content for m in said]))
    return Reading(tuple(tuple(a) for a in answers if a), tuple(reader.unread))


def judgements(conversation: Sequence[Message]) -> list[tuple[tuple[Message, ...], Party]]:
    """What a request's conversation is judged as: up to its last user-side message, in the
    user's role; and where assistant text follows (a prefilled answer), the whole of it in the
    assistant's role too, so no text a model reads goes unjudged."""
    whole = tuple(conversation)
    last_user = max((i for i, m in enumerate(whole) if m.role == "user"), default=-1)
    asked = [(whole[: last_user + 1], "user")] if last_user >= 0 else []
    return asked + ([(whole, "assistant")] if last_user < len(whole) - 1 else [])  # type: ignore[list-item]


def _said(party: Party, texts: Sequence[str]) -> list[Message]:
    """One message of ``party`` with the texts joined; none where they hold no text."""
    text = "\n\n".join(t for t in texts if t.strip())
    return [Message(party, text)] if text else []


def _text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{where} is {_kind(value)}; give the part's text as a string")
    return value


def _is_ids(value: object) -> bool:
    """A non-empty list of token ids."""
    return (isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and bool(value)
            and all(isinstance(x, int) and not isinstance(x, bool) for x in value))


def _kind(value: object) -> str:
    return "missing" if value is None else f"a {type(value).__name__}"
