"""A format's reasoning mode: the model may think in a ``<think>`` block, closed by ``</think>``,
before its verdict (Granite Guardian 3.3, Nemotron Content Safety Reasoning). Registered twice,
once with ``think=True``: the ``-think`` name asks for the reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass

from guardprob.core.reasoning import Reasoning


@dataclass(frozen=True, kw_only=True)
class Thinking:
    """Mixed in before ``Format``: ``think`` turns the reasoning on; ``max_reasoning`` is the
    tokens of reasoning before a trace is closed for the model. Both are keyword-only, so the
    format's own fields keep their places (``GraniteGuardian33Format("name", think=True)``)."""

    think: bool = False
    max_reasoning: int = 512

    @property
    def reasoning(self) -> Reasoning | None:
        return Reasoning("</think>", self.max_reasoning) if self.think else None
