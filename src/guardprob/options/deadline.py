"""A request's deadline: one name and one clock.

``answer_by`` is an instant on ``now``'s clock (``time.monotonic``), after which a search stops
at the next model call and answers with the bounds it reached. The public ways to give one
keep their names: ``Classifier.score(deadline=seconds)``, the request field ``deadline_ms``, and
the service's ``timeout_s`` (past which the request is answered 504); each becomes an instant
on this clock once, where it enters (``answer_by``), and every layer below compares with ``now``.
"""

from __future__ import annotations

import math
import time
from typing import Any

from guardprob.errors import InputError

now = time.monotonic  # the one clock of deadlines: the classifier's, the service's and its scheduler's


def answer_by(seconds: float | None, start: float | None = None, name: str = "deadline") -> float | None:
    """The instant ``seconds`` after ``start`` (default: now) on ``now``'s clock; None: no deadline.
    ``name``: how the caller calls the seconds, for the error."""
    if seconds is None:
        return None
    check_seconds(seconds, name)
    return (now() if start is None else start) + seconds


def check_seconds(seconds: Any, name: str = "deadline") -> float:
    if isinstance(seconds, bool) or not (isinstance(seconds, (int, float)) and seconds > 0 and math.isfinite(seconds)):
        raise InputError(f"{name}={seconds!r}: give a number of seconds > 0")
    return float(seconds)


def passed(instant: float | None) -> bool:
    """True once ``instant`` (an ``answer_by``) has come; never for None."""
    return instant is not None and now() >= instant


def left(instant: float) -> float:
    """Seconds until ``instant``, 0 once it has passed."""
    return max(instant - now(), 0.0)
