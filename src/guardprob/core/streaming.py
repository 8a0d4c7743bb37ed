"""Streaming moderation: an assistant answer judged while it is written.

Each chunk extends the answer, and the conversation with the answer so far is scored as the
assistant's turn. The prompt of one chunk begins with the prompt of the one before up to the
end of the answer so far, so an engine with a prefix cache (the transformers engine's, see
docs/engines.md) computes only the new tokens and the template's closing text, plus the
verdict search; the scores are exactly those of scoring that prefix afresh.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from guardprob.errors import Cancelled, InputError
from guardprob.inputs.conversation import ConversationLike, Message, to_messages
from guardprob.result import Scores


class AnswerStream:
    """The answer to ``conversation`` as it grows: ``feed(chunk)`` scores the answer so far.

    ``conversation`` ends with the user's message (the answer starts empty) or with the
    assistant's answer begun. ``score_kwargs`` are ``Classifier.score``'s (method, decide,
    thresholds, eps, ...); the judged role is always the assistant's.
    """

    def __init__(self, classifier: Any, conversation: ConversationLike, **score_kwargs: Any):
        if "role" in score_kwargs:
            raise InputError("a stream judges the assistant's answer; leave role out")
        messages = to_messages(conversation)
        if messages[-1].role == "assistant":
            self._before, self.answer = messages[:-1], messages[-1].content
        else:
            self._before, self.answer = messages, ""
        if not any(m.role == "user" for m in self._before):
            raise InputError("a stream judges an answer to a user's message; begin the conversation with one")
        self._classifier = classifier
        self._kwargs = score_kwargs
        self.chunks = 0

    def feed(self, chunk: str) -> Scores | None:
        """Add ``chunk`` to the answer and score the conversation with the answer so far (None
        while the answer holds no text yet: a stream may begin with whitespace)."""
        if not isinstance(chunk, str):
            raise InputError(f"a chunk is a {type(chunk).__name__}; feed the answer's text as strings")
        self.answer += chunk
        self.chunks += 1
        if not self.answer.strip():
            return None
        return self._classifier.score(self.conversation, role="assistant", **self._kwargs)

    @property
    def conversation(self) -> tuple[Message, ...]:
        return (*self._before, Message("assistant", self.answer))


def stream(
    classifier: Any, conversation: ConversationLike, chunks: Iterable[str], **score_kwargs: Any,
) -> Iterator[Scores | None]:
    """The scores after each chunk of the answer (see ``AnswerStream``). ``cancel`` (a
    ``threading.Event``, one of ``score``'s arguments): once set, no further chunk is read and
    the chunk being scored stops at its next model call; both raise ``guardprob.Cancelled``."""
    answer = AnswerStream(classifier, conversation, **score_kwargs)
    cancel = score_kwargs.get("cancel")
    if cancel is not None and not callable(getattr(cancel, "is_set", None)):
        raise InputError(f"cancel={cancel!r}: give a threading.Event (set it to stop the stream)")
    for chunk in chunks:
        if cancel is not None and cancel.is_set():
            raise Cancelled("the stream was cancelled (its cancel event is set); no further chunk is scored")
        yield answer.feed(chunk)
