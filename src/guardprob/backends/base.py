"""The engine protocol: next-token log-probabilities for token paths after a prompt.

Backends know nothing of taxonomies or grammars. They own batching and key/value-cache
reuse: a ``Session`` holds the prompts of one run and answers many rounds of queries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from guardprob.errors import ContextLengthError, InputError
from guardprob.inputs.controls import (
    control_ids as control_ids,  # re-exported: the ids only a format's markup may write
)


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt. ``shared_prefix`` leading tokens are common to many prompts
    (the taxonomy block of a template) and may be computed once and reused; ``role`` is the
    judged role, which some formats' verdicts depend on, and ``questions`` the per-category
    questions that follow a shared conversation (the classifier sends them as paths; engines
    see only ``ids``)."""

    ids: tuple[int, ...]
    shared_prefix: int = 0
    role: str = "user"
    # a format that asks one question per category: (category id, the question's tokens after ids)
    questions: tuple[tuple[str, tuple[int, ...]], ...] = ()


@dataclass(frozen=True)
class Query:
    """Ask for the next-token distribution after ``prompts[prompt] + path``.

    candidates: [n] int64 token ids whose log-probabilities are wanted.
    """

    prompt: int
    path: tuple[int, ...]
    candidates: np.ndarray


@dataclass(frozen=True)
class NextToken:
    """The answer to one Query.

    logprobs: [n] float64 raw log-softmax over the whole vocabulary at each candidate;
      NaN where the engine did not report that candidate (top-k truncation).
    top_logprob: the largest log-probability over the whole vocabulary (for greedy decoding
      in unconstrained mode), NaN if unknown.
    unreported: an upper bound on the total raw probability of the candidates left NaN.
    logits: [n] raw logits at each candidate where the engine exposes them (baselines such as
      LogTokU need them), else None.
    """

    logprobs: np.ndarray
    top_logprob: float
    unreported: float = 0.0
    logits: np.ndarray | None = None


@dataclass
class Usage:
    """What a session has run through the model."""

    model_calls: int = 0
    tokens: int = 0
    prompt_tokens: int = 0


@runtime_checkable
class Session(Protocol):
    """The prompts of one run, answering rounds of queries.

    A session that prefills in steps (opened with ``Backend.begin``) also has ``prefilling``
    (the prompts whose prefill has not finished: they take no queries yet) and
    ``prefill_step()`` (one chunk of it: one model call of at most the engine's
    ``prefill_chunk`` tokens), so that a scheduler can run other work between the chunks of a
    long prompt and stop it at any of them (``release``). Engines without it prefill on opening
    or in their first call, in one step (``prefilling`` reads as empty: see ``pending``).
    """

    usage: Usage

    def next_tokens(self, queries: Sequence[Query]) -> list[NextToken]: ...

    def close(self) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """An engine. ``max_context`` is the longest prompt + path it accepts (None: unknown).

    An engine may also set ``tree_calls = True`` when one call runs its queries as one tree
    (a path's ancestors computed once for all the queries below them): then asking paths
    ahead from a TreePrior costs their own tokens only, and the search does it. It sets
    ``joinable = True`` when its sessions take prompts between rounds: ``session.add(prompts)``
    prefills them and returns the index of the first (continuous batching, search.SearchRun).
    """

    name: str
    max_context: int | None

    def open(self, prompts: Sequence[Prompt]) -> Session: ...


def begin(backend: Backend, prompts: Sequence[Prompt]) -> Session:
    """A session whose prefill runs in steps where the engine offers that (``backend.begin``);
    else ``backend.open``'s, prefilled in one step."""
    start = getattr(backend, "begin", None)
    return start(prompts) if start is not None else backend.open(prompts)


def pending(session: Session) -> frozenset[int]:
    """The prompts of ``session`` whose prefill has not finished (none for an engine that
    prefills in one step)."""
    return getattr(session, "prefilling", frozenset())


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int | None = None) -> int:
    """How many leading ids ``a`` and ``b`` share (at most ``limit``)."""
    n = min(len(a), len(b)) if limit is None else min(len(a), len(b), limit)
    return next((i for i in range(n) if a[i] != b[i]), n)


def check_prompts(prompts: Sequence[Prompt], vocab_size: int, max_context: int | None = None) -> None:
    """What every engine refuses before any work: no prompts, an empty prompt, ids outside the
    vocabulary, or a prompt that leaves no room in the context."""
    if not prompts:
        raise InputError("no prompts to score")
    for p in prompts:
        if not p.ids:
            raise InputError("a prompt has no tokens; render a conversation first (see Classifier.render)")
        bad = [i for i in p.ids if not 0 <= i < vocab_size]
        if bad:
            raise InputError(f"prompt ids {bad[:5]} are outside the vocabulary (0..{vocab_size - 1}); use this model's tokenizer")
        if max_context and len(p.ids) >= max_context:
            raise ContextLengthError(f"a prompt of {len(p.ids)} tokens does not fit the model's context of {max_context}")
