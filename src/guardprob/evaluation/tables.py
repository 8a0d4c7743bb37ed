"""Datasets kept as tables: Parquet, Arrow and Feather files, directories written by
``datasets``' ``save_to_disk``, and hub ids, read as rows (one dict per row).

pyarrow and datasets (the ``datasets`` extra) are imported here only, when such a source is read.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guardprob.errors import InputError

TABLE_SUFFIXES = {".parquet": "Parquet", ".pq": "Parquet", ".arrow": "Arrow", ".feather": "Feather", ".ipc": "Arrow"}
# owner/name as the hub spells repository ids
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_INSTALL = "pip install 'guardprob[datasets]'"
_PROBE_TIMEOUT_S = 5.0  # one quick request says whether the hub answers at all, before datasets' own retries
_BATCH_ROWS = 1024


@dataclass(frozen=True)
class Table:
    """A table's rows: ``source`` names it in messages, ``columns`` are its column names."""

    source: str
    columns: tuple[str, ...]
    data: Any  # a pyarrow.Table

    def rows(self) -> Iterator[dict]:
        for batch in self.data.to_batches(max_chunksize=_BATCH_ROWS):
            yield from batch.to_pylist()


def is_table(path: Path) -> bool:
    """A file with a table suffix, or a directory (a saved ``datasets`` dataset)."""
    return path.is_dir() or path.suffix.lower() in TABLE_SUFFIXES


def is_hub_id(text: str) -> bool:
    """``owner/name`` with no file suffix that guardprob reads."""
    return bool(_HUB_ID.fullmatch(text)) and Path(text).suffix.lower() not in (*TABLE_SUFFIXES, ".jsonl", ".json", ".csv")


def read_table(path: Path, split: str | None = None, default_split: str | None = None) -> Table:
    """A Parquet/Arrow/Feather file, or a directory saved with ``save_to_disk``: ``split`` picks
    one split of a saved ``DatasetDict`` (``default_split`` where it has that split and none is asked)."""
    if path.is_dir():
        return _read_saved(path, split, default_split)
    if split is not None:
        raise InputError(f"--split {split}: {path} is one file, with no splits; leave --split out")
    kind = TABLE_SUFFIXES[path.suffix.lower()]
    pa = _import("pyarrow", f"reading {kind} files")
    try:
        data = _read_parquet(path) if kind == "Parquet" else _read_arrow(path, pa)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"dataset {path} is not a readable {kind} file ({exc}); check the file, or its suffix") from None
    return Table(str(path), tuple(data.column_names), data)


def read_hub(hub_id: str, subset: str | None = None, split: str | None = None) -> Table:
    """A dataset from the Hugging Face hub (or its local cache when HF_HUB_OFFLINE is set)."""
    datasets = _import("datasets", "reading a hub dataset")
    from huggingface_hub import constants

    name = hub_id + (f" ({subset})" if subset else "")
    if not constants.HF_HUB_OFFLINE:
        _check_reachable(constants.ENDPOINT, hub_id)
    try:
        loaded = datasets.load_dataset(hub_id, subset, split=split)
    except ConnectionError as exc:  # offline mode and no cached copy (datasets' own error type)
        raise InputError(_unreachable(hub_id, f"offline mode is on and no copy is cached: {exc}")) from None
    except datasets.exceptions.DatasetNotFoundError as exc:
        raise InputError(f"hub dataset {hub_id} was not found or is not open to you ({exc}); check the id, and for a "
                         "gated dataset accept its terms on the hub and log in (hf auth login)") from None
    except ValueError as exc:  # an unknown subset or split: datasets names the ones it has
        raise InputError(f"hub dataset {name}: {exc}; choose with --subset and --split") from None
    except Exception as exc:  # anything else the hub or the loader raises, named for the user
        raise InputError(f"hub dataset {name} could not be loaded ({type(exc).__name__}: {exc})") from None
    return _from_datasets(loaded, hub_id, subset, split)


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    return pq.read_table(path)


def _read_arrow(path: Path, pa):
    """The Arrow IPC file format (Feather v2, and v1 too), else the stream format ``datasets`` writes."""
    from pyarrow import feather

    try:
        return feather.read_table(str(path))
    except pa.ArrowInvalid:
        with pa.OSFile(str(path)) as stream:
            return pa.ipc.open_stream(stream).read_all()


def _read_saved(path: Path, split: str | None, default_split: str | None) -> Table:
    datasets = _import("datasets", "reading a saved dataset directory")
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise InputError(
            f"dataset {path} is a directory but holds no saved dataset (save_to_disk writes state.json and "
            "dataset_info.json, or dataset_dict.json for several splits); give that directory, or a data file"
        ) from None
    if split is None and hasattr(loaded, "keys") and default_split in loaded:
        split = default_split
    return _from_datasets(loaded, str(path), None, split)


def _from_datasets(loaded, source: str, subset: str | None, split: str | None) -> Table:
    """A ``Dataset``, or one split of a ``DatasetDict``, as a Table."""
    if hasattr(loaded, "keys"):  # a DatasetDict
        splits = list(loaded.keys())
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in splits:
            asked = f"has no split {split!r}" if split is not None else "has several splits"
            raise InputError(f"dataset {source} {asked}; pick one of {', '.join(splits)} with --split")
        loaded = loaded[split]
    elif split is not None and str(loaded.split or "") != split:
        raise InputError(f"--split {split}: {source} holds one split ({loaded.split or 'unnamed'}); leave --split out")
    label = source + "".join(f" {part}" for part in (subset, split) if part)
    data = loaded.with_format("arrow")[:]  # the rows as selected, one pyarrow table
    return Table(label, tuple(data.column_names), data)


def _check_reachable(endpoint: str, hub_id: str) -> None:
    """Fail at once, naming the way out, where the hub does not answer (no network, a firewall):
    the loader itself would retry for half a minute before saying the same."""
    request = urllib.request.Request(f"{endpoint.rstrip('/')}/api/datasets/{hub_id}", method="GET")
    try:
        with urllib.request.urlopen(request, timeout=_PROBE_TIMEOUT_S):
            return
    except urllib.error.HTTPError:  # the hub answered (a gated or missing dataset is the loader's to say)
        return
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise InputError(_unreachable(hub_id, f"{endpoint} does not answer: {reason}")) from None


def _unreachable(hub_id: str, why: str) -> str:
    return (f"cannot load hub dataset {hub_id}: this machine cannot reach the Hugging Face hub ({why}). On a machine "
            f"that can, save it with datasets.load_dataset(...).save_to_disk(DIR) or export it with .to_parquet(FILE), "
            "and pass that directory or file to --data; with a copy in the local hub cache, set HF_HUB_OFFLINE=1")


def _import(module: str, purpose: str):
    try:
        return __import__(module)
    except ImportError:
        raise InputError(f"{purpose} needs the {module} package; install it with {_INSTALL}") from None
