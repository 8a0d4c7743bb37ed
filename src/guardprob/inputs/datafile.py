"""Reading the files users write (taxonomies, server configs, calibrations, datasets, inputs):
every way a file can be unreadable becomes the caller's own error, naming the file and the fix."""

from __future__ import annotations

import json
import math
import os
import reprlib
import stat
from pathlib import Path

from guardprob.errors import GuardprobError

# Every way json.loads fails: bad syntax (JSONDecodeError), nesting past the recursion limit,
# an integer too long to convert (ValueError).
JSON_ERRORS = (ValueError, RecursionError)

# Bad values shown in messages are cut short: a file may hold a huge list where a number belongs.
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 40


def show(value: object) -> str:
    """A short repr of a bad value for an error message."""
    return _REPR.repr(value)


def json_reason(exc: Exception) -> str:
    """Why json.loads failed, in a few words."""
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc)


def path_problem(path: Path) -> str | None:
    """Why ``path`` is no regular file a command can read whole ("is a directory", "is a
    named pipe (FIFO)", ...), or None. A device such as /dev/zero or a FIFO would never end
    or block a read, so they are named before any read is tried."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except NotADirectoryError:
        return "does not exist (a part of the path is a file, not a directory)"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return "is " + next((name for test, name in kinds if test(mode)), "not a regular file") + ", not a regular file"


def check_file(path: Path, what: str, error: type[GuardprobError], fix: str) -> None:
    """Raise ``error`` naming ``what`` and ``fix`` where ``path`` is no regular file (see path_problem)."""
    problem = path_problem(path)
    if problem is not None:
        raise error(f"{what} {path} {problem}; {fix}")


def read_text(path: Path, what: str, error: type[GuardprobError]) -> str:
    """The UTF-8 text of a file; ``what`` names it in errors (e.g. "taxonomy file"), raised as ``error``."""
    check_file(path, what, error, "give the path of a regular file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise error(f"{what} {path} cannot be read ({exc.strerror or exc}); check the path and its permissions") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise error(
            f"{what} {path} is not UTF-8 text (byte {exc.start}, line {line}: {raw[exc.start:exc.start + 1]!r}); "
            "save it as UTF-8 text"
        ) from None


def read_data_file(path: Path, what: str, error: type[GuardprobError]) -> object:
    """The parsed content of a .yaml/.yml or .json file; ``what`` names the file in errors
    (e.g. "taxonomy file"), raised as ``error``."""
    check_file(path, what, error, "give the path of a .yaml or .json file")
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise error(f"{what} {path}: unknown extension {path.suffix!r}; use .yaml, .yml or .json")
    text = read_text(path, what, error)
    try:
        if suffix == ".json":
            return json.loads(text)
        import yaml  # only where a YAML file is read

        return yaml.safe_load(text)
    except Exception as exc:  # json's JSON_ERRORS, yaml.YAMLError, or a YAML value its constructor refuses
        kind = "JSON" if suffix == ".json" else "YAML"
        raise error(f"{what} {path} is not valid {kind}: {json_reason(exc)}") from None


def finite(value: object) -> float | None:
    """``value`` as a finite float, or None where it is no number (a bool, text, NaN, infinity,
    an integer too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def unicode_problem(text: str) -> str | None:
    """Why ``text`` cannot be written as UTF-8 (a lone surrogate, which JSON's \\ud800 escapes
    can produce), or None."""
    if text.isascii():
        return None
    # encoded a piece at a time, so a long text costs no copy of itself
    for start in range(0, len(text), _PIECE):
        try:
            text[start:start + _PIECE].encode("utf-8")
        except UnicodeEncodeError as exc:
            at = start + exc.start
            return f"not valid Unicode text (a lone surrogate {text[at]!r} at character {at})"
    return None


_PIECE = 1 << 20
