"""Which conversation a request belongs to, for routing it to the replica that scored the
conversation's earlier turns (and so holds its prompt's prefix in its cache).

The key is a hash of the conversation's leading messages: every message up to and including
the first user message. Turn by turn, a conversation grows at its end, so all its turns share
that key; conversations that only share a system prompt do not. A request this module cannot
read (not JSON, another endpoint) has no key and is routed by load alone.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

_ROUTED = ("/v1/classify", "/v1/moderations")


def conversation_key(path: str, body: bytes) -> str | None:
    """A short hex key for the request's conversation, or None where it names none."""
    if path not in _ROUTED or not body:
        return None
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(request, dict):
        return None
    lead = _leading(request.get("messages")) if path == "/v1/classify" else None
    if lead is None:
        lead = _first_text(request.get("input"))
    if lead is None:
        return None
    return hashlib.blake2b(json.dumps(lead, sort_keys=True).encode(), digest_size=8).hexdigest()


def _leading(messages: Any) -> list | None:
    """The messages up to and including the first user message (all of them if none is the user's)."""
    if not isinstance(messages, list) or not messages:
        return None
    for i, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return messages[: i + 1]
    return messages


def _first_text(value: Any) -> Any:
    """A text input, or the first of a list of inputs."""
    if isinstance(value, list):
        return value[0] if value else None
    return value
