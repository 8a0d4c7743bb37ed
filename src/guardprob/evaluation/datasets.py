"""Labelled conversations for evaluation: the paper's JSONL, generic JSONL/CSV, BeaverTails.

Every reader yields ``Example`` values; a bad row stops the read with its file and line
number, or (``skip_invalid=True``) is counted in ``Dataset.skipped`` and left out.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from guardprob.conversation import row_conversation, to_messages
from guardprob.datafile import JSON_ERRORS, json_reason, read_text, unicode_problem
from guardprob.errors import GuardprobError, InputError
from guardprob.taxonomy import Taxonomy

FORMATS = ("auto", "paper", "jsonl", "csv", "beavertails")

# The paper's files: the label key names the taxonomy the labels belong to.
PAPER_KEYS = {"llama_guard_3_categories": "llama-guard-3", "llama_guard_2_categories": "llama-guard-2"}

# BeaverTails harm categories -> Llama Guard ids (docs/evaluation.md shows this table).
# None: the category has no counterpart in the taxonomy; a row flagged only with such
# categories is unsafe with no mappable label and is counted as unmapped and left out.
BEAVERTAILS_MAP: dict[str, dict[str, str | None]] = {
    "llama-guard-3": {
        "animal_abuse": "S1",
        "child_abuse": "S1",
        "controversial_topics,politics": None,
        "discrimination,stereotype,injustice": "S10",
        "drug_abuse,weapons,banned_substance": "S2",
        "financial_crime,property_crime,theft": "S2",
        "hate_speech,offensive_language": "S10",
        "misinformation_regarding_ethics,laws_and_safety": None,
        "non_violent_unethical_behavior": None,
        "privacy_violation": "S7",
        "self_harm": "S11",
        "sexually_explicit,adult_content": "S12",
        "terrorism,organized_crime": "S1",
        "violence,aiding_and_abetting,incitement": "S1",
    },
    "llama-guard-2": {
        "animal_abuse": "S1",
        "child_abuse": "S1",
        "controversial_topics,politics": None,
        "discrimination,stereotype,injustice": "S9",
        "drug_abuse,weapons,banned_substance": "S2",
        "financial_crime,property_crime,theft": "S2",
        "hate_speech,offensive_language": "S9",
        "misinformation_regarding_ethics,laws_and_safety": None,
        "non_violent_unethical_behavior": None,
        "privacy_violation": "S6",
        "self_harm": "S10",
        "sexually_explicit,adult_content": "S11",
        "terrorism,organized_crime": "S1",
        "violence,aiding_and_abetting,incitement": "S1",
    },
}


@dataclass(frozen=True)
class Example:
    """One labelled conversation. ``messages`` is a tuple of {"role", "content"} dicts whose
    last message is judged; ``labels`` are category ids (empty: safe)."""

    index: int
    messages: tuple[Mapping[str, str], ...]
    labels: tuple[str, ...]
    source: str = ""  # "file:line", for messages about this row

    @property
    def role(self) -> str:
        return str(self.messages[-1]["role"])

    def as_dict(self) -> dict:
        return {"index": self.index, "messages": [dict(m) for m in self.messages], "labels": list(self.labels)}


@dataclass(frozen=True)
class Columns:
    """Column names of a generic JSONL or CSV file. A row holds ``text`` (one user message), or
    ``messages`` (a conversation), or ``prompt`` plus ``response`` (the response is judged)."""

    text: str = "text"
    messages: str = "messages"
    prompt: str = "prompt"
    response: str = "response"
    labels: str = "labels"


@dataclass(frozen=True)
class Dataset:
    """Examples plus what the reader learned: the taxonomy the labels belong to (if the
    format says), rows skipped as invalid, and rows left out as unmappable."""

    path: str
    examples: tuple[Example, ...]
    taxonomy: str | None = None
    skipped: tuple[str, ...] = field(default_factory=tuple)  # "file:line: reason"
    unmapped: int = 0

    @property
    def has_safe(self) -> bool:
        return any(not e.labels for e in self.examples)

    def check_taxonomy(self, taxonomy: Taxonomy) -> None:
        """Raise if the data is labelled for another taxonomy or holds ids the taxonomy lacks."""
        if self.taxonomy is not None and self.taxonomy != taxonomy.name:
            raise InputError(
                f"{self.path} is labelled with the {self.taxonomy} taxonomy but the model uses {taxonomy.name}; "
                f"pass --taxonomy {self.taxonomy} (or use the file labelled for {taxonomy.name})"
            )
        for e in self.examples:
            taxonomy.check_ids(e.labels, f"{e.source or self.path}")


def sample_path() -> Path:
    """The small sample dataset shipped with the package (the default of ``guardprob eval``)."""
    return Path(str(resources.files("guardprob") / "data" / "sample.jsonl"))


def read_dataset(
    path: str | Path | None = None,
    *,
    format: str = "auto",
    columns: Columns = Columns(),
    taxonomy: str | None = None,
    skip_invalid: bool = False,
) -> Dataset:
    """Read a labelled dataset (None: the shipped sample).

    format: auto (by extension and first row), paper, jsonl, csv, beavertails.
    taxonomy: for BeaverTails, the taxonomy to map to (llama-guard-2 or -3, default -3).
    """
    if format not in FORMATS:
        raise InputError(f"unknown dataset format {format!r}; use one of {', '.join(FORMATS)}")
    path = sample_path() if path is None else Path(path)
    if not path.is_file():
        raise InputError(f"dataset {path} does not exist; give the path of a .jsonl or .csv file")
    rows = list(_rows(path))
    if not rows:
        raise InputError(f"dataset {path} is empty; it needs one labelled example per line")
    if format == "auto":
        format = _detect(path, rows)
    target = taxonomy if format == "beavertails" else None
    parse = _parser(format, columns, target or "llama-guard-3")
    examples: list[Example] = []
    skipped: list[str] = []
    unmapped = 0
    found_taxonomy: str | None = target or ("llama-guard-3" if format == "beavertails" else None)
    for line, row in rows:
        where = f"{path}:{line}"
        try:
            if isinstance(row, _BadLine):
                raise InputError(row.reason)
            messages, labels, row_taxonomy = parse(row)
        except _Unmapped:
            unmapped += 1
            continue
        except GuardprobError as exc:
            if not skip_invalid:
                raise InputError(f"{where}: {exc} (or pass --skip-invalid to count and skip bad rows)") from None
            skipped.append(f"{where}: {exc}")
            continue
        if row_taxonomy is not None:
            if found_taxonomy is not None and found_taxonomy != row_taxonomy:
                raise InputError(f"{where}: labels for {row_taxonomy} in a file labelled for {found_taxonomy}; use one taxonomy per file")
            found_taxonomy = row_taxonomy
        examples.append(Example(len(examples), messages, labels, where))
    if not examples:
        raise InputError(f"dataset {path} has no usable example ({len(skipped)} invalid, {unmapped} unmapped)")
    return Dataset(str(path), tuple(examples), found_taxonomy, tuple(skipped), unmapped)


# -- reading rows -----------------------------------------------------------------------
@dataclass(frozen=True)
class _BadLine:
    reason: str


class _Unmapped(Exception):
    pass


def _rows(path: Path) -> Iterator[tuple[int, object]]:
    text = read_text(path, "dataset", InputError)
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))  # newline="": quoted fields may span lines
        try:
            for row in reader:
                yield reader.line_num, row
        except csv.Error as exc:
            raise InputError(f"dataset {path}:{reader.line_num}: not valid CSV ({exc}); check the quoting") from None
        return
    # split on "\n" only: str.splitlines would also split inside a JSON string holding U+2028
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except JSON_ERRORS as exc:
            yield number, _BadLine(f"not valid JSON ({json_reason(exc)}); write one JSON object per line")


def _detect(path: Path, rows: list[tuple[int, object]]) -> str:
    if path.suffix.lower() == ".csv":
        return "csv"
    first = next((row for _, row in rows if isinstance(row, dict)), {})
    if any(key in first for key in PAPER_KEYS):
        return "paper"
    if isinstance(first.get("category"), dict) and "is_safe" in first:
        return "beavertails"
    return "jsonl"


def _parser(format: str, columns: Columns, beavertails_taxonomy: str):
    if format == "paper":
        return _paper_row
    if format == "beavertails":
        if beavertails_taxonomy not in BEAVERTAILS_MAP:
            raise InputError(
                f"BeaverTails maps to {', '.join(BEAVERTAILS_MAP)}, not {beavertails_taxonomy!r}; pass --taxonomy with one of them"
            )
        table = BEAVERTAILS_MAP[beavertails_taxonomy]
        return lambda row: _beavertails_row(row, table)
    return lambda row: _generic_row(row, columns)


def _object(row: object) -> dict:
    if not isinstance(row, dict):
        raise InputError(f"expected a JSON object, got {type(row).__name__}")
    return row


def _paper_row(row: object):
    row = _object(row)
    keys = [k for k in PAPER_KEYS if k in row]
    if len(keys) != 1:
        raise InputError(f"expected exactly one of {', '.join(PAPER_KEYS)}; found {len(keys)}")
    query = row.get("unsafe_query")
    if not isinstance(query, str) or not query.strip():
        raise InputError("field 'unsafe_query' is missing or empty")
    return _messages(query), _labels(row[keys[0]], keys[0]), PAPER_KEYS[keys[0]]


def _generic_row(row: object, c: Columns):
    row = _object(row)
    try:
        conversation = row_conversation(row, c.messages, c.text, c.prompt, c.response)
    except GuardprobError:
        raise
    except JSON_ERRORS as exc:  # a messages column holding JSON that json.loads cannot take
        raise InputError(f"column {c.messages!r} is not a readable JSON list of messages ({json_reason(exc)})") from None
    if conversation is None:
        raise InputError(
            f"no conversation: give column {c.text!r}, {c.messages!r}, or {c.prompt!r} plus {c.response!r} "
            "(rename them with --text-column, --messages-column, --prompt-column, --response-column)"
        )
    messages = _messages(conversation)
    if c.labels not in row:
        raise InputError(f"no column {c.labels!r} with the category ids (rename it with --labels-column)")
    return messages, _labels(row[c.labels], c.labels), None


def _beavertails_row(row: object, table: dict[str, str | None]):
    row = _object(row)
    prompt, response, flags = row.get("prompt"), row.get("response"), row.get("category")
    if not isinstance(flags, dict) or not isinstance(row.get("is_safe"), bool):
        raise InputError("a BeaverTails row needs 'prompt', 'response', 'category' (a mapping) and 'is_safe'")
    unknown = [k for k in flags if k not in table]
    if unknown:
        raise InputError(f"unknown BeaverTails categories {', '.join(unknown)}; known: {', '.join(table)}")
    messages = _messages([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
    labels = sorted({table[k] for k, on in flags.items() if on and table[k]}, key=lambda s: int(s[1:]))
    if not row["is_safe"] and not labels:
        raise _Unmapped()
    return messages, tuple(labels), None


def _messages(raw: object) -> tuple[dict[str, str], ...]:
    messages = to_messages(raw)  # type: ignore[arg-type]
    for i, m in enumerate(messages):
        problem = unicode_problem(m.content)
        if problem:  # a tokenizer would fail on it later, far from this row
            raise InputError(f"message {i} is {problem}; fix the text's encoding")
    return tuple({"role": m.role, "content": m.content} for m in messages)


def _labels(raw: object, key: str) -> tuple[str, ...]:
    if isinstance(raw, str):
        raw = [part.strip() for part in raw.replace(";", ",").split(",") if part.strip()]
    if not isinstance(raw, Sequence) or not all(isinstance(x, str) and x.strip() for x in raw):
        raise InputError(f"field {key!r} must be a list of category ids (or a comma-separated string), got {raw!r}")
    labels = tuple(x.strip() for x in raw)
    if len(set(labels)) != len(labels):
        raise InputError(f"field {key!r} repeats a category id: {list(labels)}")
    return labels
