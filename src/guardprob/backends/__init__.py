"""Engines behind the search. Each engine lives in its own module and imports its SDK lazily."""

from guardprob.backends.base import Backend, NextToken, Prompt, Query, Session, Usage

__all__ = ["Backend", "NextToken", "Prompt", "Query", "Session", "Usage"]
