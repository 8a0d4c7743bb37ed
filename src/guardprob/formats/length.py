"""Length before tokenizing: a conversation that cannot fit the model's context is refused by
its characters, before the tokenizer reads it (a tokenizer's time and memory grow with its
input: a 50 MB message took minutes and gigabytes to be found too long by its tokens).

The bound is sound: every character of a message lies in the text of some token of the
prompt, and no token writes more than the vocabulary's longest token text, so a prompt of at
most ``context`` tokens holds at most ``context x longest`` characters of messages. The
factor ``NORMALIZER_SLACK`` covers tokenizers whose normalizer composes characters (NFC
writes up to four code points, such as Greek with three diacritics, as one). A conversation
under the bound is tokenized and then checked by its tokens (``ContextLengthError`` either way).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from guardprob.errors import ContextLengthError
from guardprob.inputs.conversation import Message

NORMALIZER_SLACK = 4
# The context assumed where neither the engine nor the tokenizer knows one (an OpenAI-compatible
# server without --backend-option max_context): 2^20 tokens, past every guard model's context.
UNKNOWN_CONTEXT = 1 << 20
# transformers writes a huge number for "no limit" in model_max_length (int(1e30))
_NO_LIMIT = 1 << 40


def context_tokens(max_context: int | None, tokenizer: object = None) -> tuple[int, str]:
    """The context the character bound is derived from, and where it comes from (for errors)."""
    if max_context:
        return int(max_context), "the model's context"
    declared = getattr(tokenizer, "model_max_length", None)
    if isinstance(declared, int) and 0 < declared < _NO_LIMIT:
        return declared, "the tokenizer's model_max_length"
    return UNKNOWN_CONTEXT, "the longest context assumed when none is known"


def longest_token(texts: Iterable[str | None]) -> int:
    """The characters of the longest token text (at least 1)."""
    return max((len(t) for t in texts if t), default=1)


def character_limit(context: int, longest: int) -> int:
    """The most characters of messages a prompt of ``context`` tokens can hold."""
    return context * max(longest, 1) * NORMALIZER_SLACK


def check_characters(messages: Sequence[Message], context: int, longest: int, source: str = "the model's context") -> None:
    """Refuse, before tokenizing, messages with more characters than a prompt of ``context``
    tokens can hold (``ContextLengthError``, naming the limit)."""
    limit = character_limit(context, longest)
    total = 0
    for m in messages:
        total += len(m.content)
        if total > limit:
            raise ContextLengthError(
                f"the conversation has {sum(len(x.content) for x in messages):,} characters, more than the "
                f"{limit:,} that {source} of {context:,} tokens can hold (at most {longest} characters per token, "
                f"times {NORMALIZER_SLACK}); shorten the conversation"
            )
