"""Old public names that still work for one release, with a DeprecationWarning naming the new one
(CHANGELOG.md lists every rename)."""

from __future__ import annotations

import warnings
from typing import TypeVar

from guardprob.errors import InputError

T = TypeVar("T")


def renamed_keyword(where: str, old: str, old_value: T | None, new: str, new_value: T, default: T) -> T:
    """The value of keyword ``new``, or of its older name ``old`` (with a DeprecationWarning) where
    only the old one was given; both given is an error, since they would disagree."""
    if old_value is None:
        return new_value
    if new_value != default:
        raise InputError(f"{where}: {old}= is the older name of {new}=; give {new}= only")
    warnings.warn(f"{where}: {old}= is deprecated, use {new}= (the same values); {old}= will be removed in a future release",
                  DeprecationWarning, stacklevel=3)
    return old_value
