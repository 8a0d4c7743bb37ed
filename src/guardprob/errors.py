"""The package's own exception types, raised at the public boundary."""

from __future__ import annotations


class GuardprobError(Exception):
    """Base class: every error guardprob raises on purpose derives from it."""


class InputError(GuardprobError, ValueError):
    """A conversation, prompt or parameter that cannot be scored as given."""


class ContextLengthError(InputError):
    """A prompt (plus the longest verdict) that does not fit in the model's context."""


class RoleError(InputError):
    """A judged role that is unknown or that the conversation does not end with."""


class UnreadableError(InputError):
    """Something a model would read that the guard cannot read as text (an image, token ids)."""


class TaxonomyError(GuardprobError, ValueError):
    """A taxonomy preset or file that is unknown or malformed."""


class TemplateError(GuardprobError, ValueError):
    """A prompt template that is unknown or malformed."""


class GrammarError(GuardprobError, ValueError):
    """A verdict grammar that the tokenizer cannot write."""


class BackendError(GuardprobError, RuntimeError):
    """An engine that failed to answer (server error, lost worker, bad reply)."""


class ModelLoadError(GuardprobError, RuntimeError):
    """A model or tokenizer that could not be found or loaded."""


class Cancelled(GuardprobError):
    """A scoring run stopped because its ``cancel`` event was set (between model calls); it
    returns nothing: the scores of a cancelled run are not computed."""


class GuardprobWarning(UserWarning):
    """Something a result depends on that the user should know (a degenerate model answer)."""


class RoundCancelled(GuardprobError):
    """A model call stopped while in flight, from outside: the openai engine's round once its
    session's ``cancel()`` is called, or the event or deadline given to ``stop_on`` comes (its HTTP
    requests cancelled, their connections closed). The session takes no more calls; the classifier
    turns it into ``Cancelled`` (an event) or an answer with the bounds reached (a deadline)."""
