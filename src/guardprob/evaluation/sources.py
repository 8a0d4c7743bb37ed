"""Where a dataset's rows come from: a JSON-lines or CSV file, a table (Parquet, Arrow, Feather,
a saved ``datasets`` directory) or a hub id. Each row comes with where it is, for messages."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from guardprob.errors import InputError
from guardprob.evaluation.tables import Table, is_hub_id, is_table, read_hub, read_table
from guardprob.inputs.datafile import JSON_ERRORS, check_file, json_reason, read_text

KINDS = ".jsonl, .csv, .parquet, .arrow or .feather file, a directory saved with datasets' save_to_disk, or a hub id (owner/name)"


@dataclass(frozen=True)
class BadLine:
    """A line that is no JSON: a row that reports its own problem when parsed."""

    reason: str


@dataclass(frozen=True)
class Source:
    """A dataset's rows as (where, row) pairs; ``columns``: a table's column names (None for
    JSON lines, whose rows may each have their own); ``csv``: read from a CSV file."""

    name: str
    rows: tuple[tuple[str, object], ...]
    columns: tuple[str, ...] | None = None
    csv: bool = False


def open_source(
    path: str | Path,
    *,
    split: str | None = None,
    subset: str | None = None,
    default_split: str | None = None,
) -> Source:
    """The rows at ``path``: a file or directory that exists, else a hub id. ``split`` and ``subset``
    pick a saved or hub dataset's part; ``default_split`` where a saved dataset has it and none is asked."""
    local = Path(path)
    if local.exists():
        if subset is not None:
            raise InputError(f"--subset {subset}: names a configuration of a hub dataset, not of {path}; leave it out")
        if not local.is_dir():  # a saved dataset is a directory; anything else must be a regular file
            check_file(local, "dataset", InputError, f"give a {KINDS}")
        if is_table(local):
            return _table_source(read_table(local, split, default_split))
        if split is not None:
            raise InputError(f"--split {split}: {path} is one file, with no splits; leave --split out")
        return _lines_source(local)
    if is_hub_id(str(path)):
        try:
            return _table_source(read_hub(str(path), subset, split))
        except InputError as exc:  # it may have been meant as a local path
            raise InputError(f"{exc} ({path} is no file or directory here, so it was read as a hub id)") from None
    raise InputError(f"dataset {path} does not exist; give a {KINDS}")


def _table_source(table: Table) -> Source:
    rows = tuple((f"{table.source}, row {i}", row) for i, row in enumerate(table.rows()))
    return Source(table.source, rows, table.columns)


def _lines_source(path: Path) -> Source:
    is_csv = path.suffix.lower() == ".csv"
    rows = _csv_rows(path) if is_csv else _json_rows(path)
    return Source(str(path), tuple((f"{path}:{line}", row) for line, row in rows), csv=is_csv)


def _csv_rows(path: Path) -> Iterator[tuple[int, object]]:
    reader = csv.DictReader(io.StringIO(read_text(path, "dataset", InputError), newline=""))  # quoted fields may span lines
    try:
        for row in reader:
            yield reader.line_num, row
    except csv.Error as exc:
        raise InputError(f"dataset {path}:{reader.line_num}: not valid CSV ({exc}); check the quoting") from None


def _json_rows(path: Path) -> Iterator[tuple[int, object]]:
    text = read_text(path, "dataset", InputError)
    # split on "\n" only: str.splitlines would also split inside a JSON string holding U+2028
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except JSON_ERRORS as exc:
            yield number, BadLine(f"not valid JSON ({json_reason(exc)}); write one JSON object per line")
