"""Labelled conversations for evaluation, in the paper's JSONL layout, a generic layout of
named columns (JSONL, CSV, Parquet, Arrow, Feather, a saved ``datasets`` directory or a hub
id; sources.py reads them) with a label map, or a public dataset's preset (presets.py).

Every reader yields ``Example`` values; a bad row stops the read naming its file and line
(or row), or (``skip_invalid=True``) is counted in ``Dataset.skipped`` and left out.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from guardprob.errors import GuardprobError, InputError, TaxonomyError
from guardprob.evaluation.labels import MAP_SYNTAX, LabelMap, Unlabelled, label_names, unsafe_flag
from guardprob.evaluation.layout import GENERIC_COLUMNS, Columns
from guardprob.evaluation.presets import PRESETS, Preset, get_preset
from guardprob.evaluation.sources import BadLine, Source, open_source
from guardprob.inputs.conversation import to_messages
from guardprob.inputs.datafile import JSON_ERRORS, json_reason, unicode_problem
from guardprob.taxonomy import Taxonomy

__all__ = ["FORMATS", "Columns", "Dataset", "Example", "read_dataset", "sample_path"]

FORMATS = ("auto", "paper", "jsonl", "csv", "beavertails")

# The paper's files: the label key names the taxonomy the labels belong to.
PAPER_KEYS = {"llama_guard_3_categories": "llama-guard-3", "llama_guard_2_categories": "llama-guard-2"}

_SHOWN_LABELS = 20  # labels listed per column in a message


@dataclass(frozen=True)
class Example:
    """One labelled conversation. ``messages`` is a tuple of {"role", "content"} dicts whose
    last message is judged; ``labels`` are category ids (empty: safe)."""

    index: int
    messages: tuple[Mapping[str, str], ...]
    labels: tuple[str, ...]
    source: str = ""  # "file:line" or "file, row N", for messages about this row

    @property
    def role(self) -> str:
        return str(self.messages[-1]["role"])

    def as_dict(self) -> dict:
        return {"index": self.index, "messages": [dict(m) for m in self.messages], "labels": list(self.labels)}


@dataclass(frozen=True)
class Dataset:
    """Examples plus what the reader learned: the taxonomy the labels belong to (if the
    format or preset says), rows skipped as invalid, unsafe rows left out because no label maps
    to a category, and rows left out because a label cell is empty (null)."""

    path: str
    examples: tuple[Example, ...]
    taxonomy: str | None = None
    skipped: tuple[str, ...] = field(default_factory=tuple)  # "file:line: reason"
    unmapped: int = 0
    unlabelled: int = 0

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
        unknown = Counter(i for e in self.examples for i in e.labels if i not in taxonomy.ids)
        if unknown:
            first = next(e for e in self.examples if any(i in unknown for i in e.labels))
            raise TaxonomyError(
                f"{first.source or self.path}: unknown category id(s) {', '.join(map(repr, unknown))} for taxonomy "
                f"{taxonomy.name!r} (ids {', '.join(taxonomy.ids)}), in {sum(unknown.values())} label(s); pick the "
                f"taxonomy that matches the data, or map the data's labels onto its ids with --map {MAP_SYNTAX}, "
                "or a --label-map file"
            )


def sample_path() -> Path:
    """The small sample dataset shipped with the package (the default of ``guardprob eval``)."""
    return Path(str(resources.files("guardprob") / "data" / "sample.jsonl"))


def read_dataset(
    path: str | Path | None = None,
    *,
    format: str = "auto",
    columns: Columns | None = None,
    taxonomy: str | None = None,
    skip_invalid: bool = False,
    label_map: LabelMap | None = None,
    preset: str | None = None,
    split: str | None = None,
    subset: str | None = None,
) -> Dataset:
    """Read a labelled dataset (None: the shipped sample, or the preset's hub dataset).

    format: auto (by extension and first row), paper, jsonl, csv, beavertails (the preset).
    columns: the columns to read, over the preset's or the generic ones (text, messages,
    prompt, response, labels). label_map: label name -> ids, over the preset's.
    taxonomy: the taxonomy a preset maps onto (default: the preset's first).
    split, subset: the part of a saved or hub dataset.
    """
    if format not in FORMATS:
        raise InputError(f"unknown dataset format {format!r}; use one of {', '.join(FORMATS)}")
    chosen = get_preset(preset) if preset is not None else None
    if chosen is not None and format not in ("auto", "jsonl", "csv"):
        raise InputError(f"--preset {chosen.name} reads {chosen.title}'s own columns; leave --data-format {format} out")
    source = _open(path, chosen, split, subset)
    if not source.rows:
        raise InputError(f"dataset {source.name} is empty; it needs one labelled example per line or row")
    if format == "auto":
        format = "jsonl" if chosen is not None else _detect(source)  # a preset knows the layout
    if format == "paper":
        if label_map:
            raise InputError(f"{source.name} is in the paper's layout, labelled with ids already; leave --map and --label-map out")
        return _read(source, _paper_row, None, skip_invalid)
    if format == "beavertails" and chosen is None:
        chosen = PRESETS["beavertails"]
    target, base, labels = None, GENERIC_COLUMNS, label_map
    if chosen is not None:
        target, layout = chosen.layout(taxonomy)
        base, labels = layout.columns, layout.labels.merged(label_map)
    given = columns or Columns()
    resolved = given.over(base)
    _check_table_columns(source, resolved, given)
    return _read(source, lambda row: _generic_row(row, resolved), labels or None, skip_invalid, target)


# -- reading rows -----------------------------------------------------------------------
@dataclass(frozen=True)
class _Row:
    """A parsed row: its conversation, the (column, label name) pairs it holds, and whether an
    "is unsafe" column calls it unsafe (None: no such column)."""

    where: str
    messages: tuple[dict[str, str], ...]
    names: tuple[tuple[str, str], ...]
    unsafe: bool | None = None
    taxonomy: str | None = None  # the paper's label key says it


def _open(path: str | Path | None, preset: Preset | None, split: str | None, subset: str | None) -> Source:
    if path is None and preset is not None:  # the preset's own hub dataset
        return open_source(preset.hub_id, split=split or preset.split, subset=subset or preset.subset)
    if path is None:
        return open_source(sample_path())
    same_hub = preset is not None and str(path) == preset.hub_id
    return open_source(path, split=split or (preset.split if same_hub else None),
                       subset=subset or (preset.subset if same_hub else None),
                       default_split=preset.split if preset is not None else None)


def _detect(source: Source) -> str:
    if source.csv:
        return "csv"
    first = next((row for _, row in source.rows if isinstance(row, dict)), {})
    if any(key in first for key in PAPER_KEYS):
        return "paper"
    if isinstance(first.get("category"), dict) and "is_safe" in first:
        return "beavertails"
    return "jsonl"


def _read(source: Source, parse, labels: LabelMap | None, skip_invalid: bool, target: str | None = None) -> Dataset:
    """Parse every row, then map the labels (all rows first, so that every unknown label is named at once)."""
    parsed: list[_Row] = []
    skipped: list[str] = []
    unlabelled = 0
    for where, row in source.rows:
        try:
            if isinstance(row, BadLine):
                raise InputError(row.reason)
            parsed.append(_Row(where, *parse(row)))
        except Unlabelled:
            unlabelled += 1
        except GuardprobError as exc:
            if not skip_invalid:
                raise InputError(f"{where}: {exc} (or pass --skip-invalid to count and skip bad rows)") from None
            skipped.append(f"{where}: {exc}")
    if labels is not None:
        _check_known(source.name, parsed, labels)
    examples: list[Example] = []
    unmapped = 0
    found = target
    for row in parsed:
        ids = _ids(row, labels)
        if ids is None:
            unmapped += 1
            continue
        if row.taxonomy is not None:
            if found is not None and found != row.taxonomy:
                raise InputError(f"{row.where}: labels for {row.taxonomy} in a file labelled for {found}; use one taxonomy per file")
            found = row.taxonomy
        examples.append(Example(len(examples), row.messages, ids, row.where))
    if not examples:
        raise InputError(f"dataset {source.name} has no usable example ({len(skipped)} invalid, {unmapped} unmapped, "
                         f"{unlabelled} without a label)")
    return Dataset(source.name, tuple(examples), found, tuple(skipped), unmapped, unlabelled)


def _ids(row: _Row, labels: LabelMap | None) -> tuple[str, ...] | None:
    """The row's category ids, or None for an unsafe row none of whose labels has a category."""
    if labels is None:
        ids = tuple(dict.fromkeys(name for _, name in row.names))
        return None if row.unsafe and not ids else ids
    mapped = [labels.entries[labels.key(column, name)] for column, name in row.names]
    ids = tuple(dict.fromkeys(i for m in mapped if m for i in m))
    if not ids and (row.unsafe or any(m is None for m in mapped)):
        return None
    return ids


def _check_known(source: str, rows: Sequence[_Row], labels: LabelMap) -> None:
    """Name every label the map lacks, with the labels seen and how to map them."""
    seen = Counter(pair for row in rows for pair in row.names)
    unknown = [pair for pair in seen if labels.key(*pair) is None]
    if not unknown:
        return
    names = ", ".join(sorted({repr(name) for _, name in unknown}))
    by_column: dict[str, list[str]] = {}
    for (column, name), count in seen.most_common():
        by_column.setdefault(column, []).append(f"{name!r} ({count})")
    listed = "; ".join(f"column {column!r}: {', '.join(found[:_SHOWN_LABELS])}{', ...' if len(found) > _SHOWN_LABELS else ''}"
                       for column, found in by_column.items())
    example = unknown[0][1]
    raise InputError(
        f"dataset {source}: unknown label(s) {names}, which the label map does not map. Labels seen: {listed}. "
        f"Map each with --map, e.g. --map '{example}=S1' (write {MAP_SYNTAX}; prefix the column, "
        f"'{unknown[0][0]}:{example}=S1', where columns share a word), or in a --label-map file"
    )


def _check_table_columns(source: Source, resolved: Columns, given: Columns) -> None:
    """A table's columns are known before any row: name a missing one with the columns present and the flag to use."""
    if source.columns is None:
        return
    present = set(source.columns)
    have = f"its columns: {', '.join(source.columns)}"
    if not any(c in present for c in resolved.conversation):
        wanted = ", ".join(repr(c) for c in resolved.conversation)
        raise InputError(f"dataset {source.name} has no conversation column {wanted} ({have}); name it with --text-column "
                         "(one user message; --response-column adds the answer judged) or --messages-column")
    for column in resolved.labels or ():
        if column not in present:
            raise InputError(f"dataset {source.name} has no label column {column!r} ({have}); name the label column(s) "
                             "with --labels-column (repeat it for one column per category), or use a --preset")
    flags = {"unsafe": "--unsafe-column", "text": "--text-column", "messages": "--messages-column",
             "prompt": "--prompt-column", "response": "--response-column"}
    for name, flag in flags.items():
        column = getattr(resolved if name == "unsafe" else given, name)
        if column is not None and column not in present:
            raise InputError(f"dataset {source.name} has no column {column!r} ({have}); name the right one with {flag}")


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
    names = tuple((keys[0], i) for i in label_names(row[keys[0]], keys[0]))
    return _messages(query), names, None, PAPER_KEYS[keys[0]]


def _generic_row(row: object, c: Columns):
    row = _object(row)
    conversation = _conversation(row, c)
    if conversation is None:
        wanted = ", ".join(repr(k) for k in c.conversation)
        raise InputError(f"no conversation: give column {wanted}{f' (with {c.response!r} for the answer judged)' if c.response else ''} "
                         "(rename them with --text-column, --messages-column, --prompt-column, --response-column)")
    messages = _messages(conversation)
    unsafe = None
    if c.unsafe is not None:
        unsafe = unsafe_flag(_column(row, c.unsafe, "says whether the row is unsafe", "--unsafe-column"), c.unsafe)
        if not unsafe:  # a safe row has no labels, whatever its label columns say
            return messages, (), False
    names = tuple((column, name) for column in c.labels or ()
                  for name in label_names(_column(row, column, "with the labels", "--labels-column"), column))
    return messages, names, unsafe


def _column(row: dict, column: str, what: str, flag: str) -> object:
    if column not in row:
        raise InputError(f"no column {column!r} {what} (this row's columns: {', '.join(map(str, row))}); name it with {flag}")
    return row[column]


def _conversation(row: dict, c: Columns) -> object | None:
    """``messages`` (a list, or that list as JSON text), else the user message in ``text`` or
    ``prompt``, followed by the answer in ``response`` where the row has one. Empty values are absent."""

    def value(column: str | None) -> object | None:
        return row.get(column) if column and row.get(column) not in (None, "") else None

    messages = value(c.messages)
    if messages is not None:
        if not isinstance(messages, str):
            return messages
        try:
            return json.loads(messages)
        except JSON_ERRORS as exc:
            raise InputError(f"column {c.messages!r} is not a readable JSON list of messages ({json_reason(exc)})") from None
    user = next((v for v in (value(c.text), value(c.prompt)) if v is not None), None)
    answer = value(c.response)
    if user is None or answer is None:
        return user
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _messages(raw: object) -> tuple[dict[str, str], ...]:
    messages = to_messages(raw)  # type: ignore[arg-type]
    for i, m in enumerate(messages):
        problem = unicode_problem(m.content)
        if problem:  # a tokenizer would fail on it later, far from this row
            raise InputError(f"message {i} is {problem}; fix the text's encoding")
    return tuple({"role": m.role, "content": m.content} for m in messages)
