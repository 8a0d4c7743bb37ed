"""Datasets kept as tables (Parquet, Arrow, Feather, saved ``datasets`` directories, hub ids),
read with named columns and a label map: through ``read_dataset`` and the real ``guardprob eval``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow import feather

from guardprob import InputError
from guardprob.evaluation.datasets import Columns, read_dataset
from guardprob.evaluation.labels import LabelMap, load_label_map, parse_map_options
from helpers import LABELLED_ROWS

SRC = Path(__file__).resolve().parents[1] / "src"
NAMES = {"S1": "violence", "S2": "theft"}  # the tables' own label names for the JSONL file's ids


def as_table_row(row: dict) -> dict:
    """A LABELLED_ROWS row as a table keeps it: a question, maybe an answer, label names and flags."""
    if "messages" in row:
        question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
    else:
        question, answer = row["text"], None
    return {"question": question, "answer": answer, "harms": [NAMES[i] for i in row["labels"]],
            "violent": "S1" in row["labels"], "crime": int("S2" in row["labels"])}


TABLE_ROWS = [as_table_row(r) for r in LABELLED_ROWS]
NAMED = Columns(text="question", response="answer", labels="harms")
FLAGGED = Columns(text="question", response="answer", labels=("violent", "crime"))
NAME_MAP = parse_map_options(["violence=S1", "theft=S2"])
FLAG_MAP = parse_map_options(["violent=S1", "crime=S2"])


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def save_dataset(path: Path, rows, splits: tuple[str, ...] = ()) -> Path:
    data = datasets.Dataset.from_list(rows)
    (datasets.DatasetDict({s: data for s in splits}) if splits else data).save_to_disk(str(path))
    return path


def content(dataset) -> list[tuple]:
    return [(tuple(tuple(sorted(m.items())) for m in e.messages), e.labels) for e in dataset.examples]


# -- the same rows in every kind of file ---------------------------------------------------------
def test_every_table_kind_reads_as_the_jsonl_rows(tmp_path):
    expected = content(read_dataset(write_jsonl(tmp_path / "d.jsonl", LABELLED_ROWS)))
    table = pa.Table.from_pylist(TABLE_ROWS)
    pq.write_table(table, tmp_path / "d.parquet")
    feather.write_feather(table, tmp_path / "d.feather")
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    save_dataset(tmp_path / "saved", TABLE_ROWS)
    for name in ("d.parquet", "d.feather", "d.arrow", "saved"):
        assert content(read_dataset(tmp_path / name, columns=NAMED, label_map=NAME_MAP)) == expected, name
        assert content(read_dataset(tmp_path / name, columns=FLAGGED, label_map=FLAG_MAP)) == expected, name
    rows = read_dataset(tmp_path / "d.parquet", columns=NAMED, label_map=NAME_MAP).examples
    assert rows[5].role == "assistant" and rows[5].source == f"{tmp_path / 'd.parquet'}, row 5"


def test_saved_splits_are_picked_by_name(tmp_path):
    path = save_dataset(tmp_path / "dd", TABLE_ROWS, splits=("train", "test"))
    with pytest.raises(InputError, match="several splits; pick one of train, test with --split"):
        read_dataset(path, columns=NAMED, label_map=NAME_MAP)
    with pytest.raises(InputError, match="no split 'dev'; pick one of train, test"):
        read_dataset(path, columns=NAMED, label_map=NAME_MAP, split="dev")
    test = read_dataset(path, columns=NAMED, label_map=NAME_MAP, split="test")
    assert len(test.examples) == len(TABLE_ROWS) and test.path.endswith("dd test")
    with pytest.raises(InputError, match="one file, with no splits"):
        read_dataset(write_parquet(tmp_path / "d.parquet", TABLE_ROWS), columns=NAMED, label_map=NAME_MAP, split="test")


# -- the real command: same metrics from JSONL, Parquet and a saved directory ----------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_model, char_tok):
    path = tmp_path_factory.mktemp("tiny")
    tiny_model.save_pretrained(path)
    char_tok.save_pretrained(path)
    return path


def run_eval(tiny_dir: Path, out: Path, *data_args: str) -> tuple[str, list[dict]]:
    from guardprob.cli import main

    code = main(["eval", *data_args, "--out", str(out), "--model", str(tiny_dir), "--format", "llama-guard-3",
                 "--taxonomy", "llama-guard-3", "--methods", "greedy,marginal", "--max-nodes", "24", "--no-progress"])
    assert code == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()[1:]]
    return (out / "metrics.csv").read_text(), [{k: r[k] for k in ("index", "labels", "role", "scores")} for r in records]


def test_eval_command_gives_the_same_metrics_from_every_kind_of_file(tmp_path, tiny_dir, capsys):
    jsonl = write_jsonl(tmp_path / "d.jsonl", LABELLED_ROWS)
    parquet = write_parquet(tmp_path / "d.parquet", TABLE_ROWS)
    saved = save_dataset(tmp_path / "saved", TABLE_ROWS, splits=("test",))
    base = run_eval(tiny_dir, tmp_path / "jsonl", "--data", str(jsonl))
    named = run_eval(tiny_dir, tmp_path / "parquet", "--data", str(parquet), "--text-column", "question",
                     "--response-column", "answer", "--labels-column", "harms", "--map", "violence=S1", "--map", "theft=S2")
    flags = tmp_path / "flags.json"
    flags.write_text(json.dumps({"violent": "S1", "crime": ["S2"]}))
    flagged = run_eval(tiny_dir, tmp_path / "saved-out", "--data", str(saved), "--split", "test", "--text-column",
                       "question", "--response-column", "answer", "--labels-column", "violent", "--labels-column",
                       "crime", "--label-map", str(flags))
    assert named == base and flagged == base
    assert "marginal" in base[0] and len(base[1]) == len(LABELLED_ROWS)
    assert "report:" in capsys.readouterr().out


# -- columns, labels and their errors ------------------------------------------------------------
def test_missing_columns_name_the_columns_present_and_the_flag(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", TABLE_ROWS)
    with pytest.raises(InputError, match=r"no conversation column 'messages', 'text', 'prompt' \(its columns: question, "
                                         r"answer, harms, violent, crime\); name it with --text-column"):
        read_dataset(path)
    with pytest.raises(InputError, match=r"no label column 'labels' \(its columns: question.*--labels-column"):
        read_dataset(path, columns=Columns(text="question"))
    with pytest.raises(InputError, match=r"no column 'reply' \(its columns: .*--response-column"):
        read_dataset(path, columns=Columns(text="question", response="reply", labels="harms"))
    with pytest.raises(InputError, match=r"no column 'is_bad' \(its columns: .*--unsafe-column"):
        read_dataset(path, columns=NAMED.over(Columns(unsafe="is_bad")), label_map=NAME_MAP)
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"question": "hi", "harms": []}])
    with pytest.raises(InputError, match=r"d.jsonl:1: no column 'labels' with the labels \(this row's columns: "
                                         r"question, harms\); name it with --labels-column"):
        read_dataset(jsonl, columns=Columns(text="question"))


def test_unknown_labels_are_named_with_the_labels_seen_and_the_fix(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", TABLE_ROWS)
    with pytest.raises(InputError) as info:
        read_dataset(path, columns=NAMED, label_map=parse_map_options(["violence=S1"]))
    message = str(info.value)
    assert "unknown label(s) 'theft'" in message and "column 'harms': 'violence' (5), 'theft' (5)" in message
    assert "--map 'theft=S1'" in message and "--label-map" in message
    # no map: the names are taken as ids, and the taxonomy check names them and the fix
    data = read_dataset(path, columns=NAMED)
    from guardprob import TaxonomyError, load_taxonomy

    with pytest.raises(TaxonomyError, match=r"row 0: unknown category id\(s\) 'violence', 'theft'.*--map"):
        data.check_taxonomy(load_taxonomy("llama-guard-3"))


def test_label_map_files_and_options(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("violence: S1\nbenign: []\npolitics: null\n'harm:weapons': [S1, S9]\n")
    assert load_label_map(path).entries == {"violence": ("S1",), "benign": (), "politics": None, "harm:weapons": ("S1", "S9")}
    assert parse_map_options(["a,b=S1,S2", "ok=", "other=-"]).entries == {"a,b": ("S1", "S2"), "ok": (), "other": None}
    for bad, match in ((["S1"], "write NAME=ID"), (["x=S1,,S2"], "empty category id")):
        with pytest.raises(InputError, match=match):
            parse_map_options(bad)
    for text, match in (("[1, 2]\n", "expected a mapping"), ("x: 3\n", "no category id"), ("x: [S1, 2]\n", "no category id")):
        path.write_text(text)
        with pytest.raises(InputError, match=match):
            load_label_map(path)


def test_unsafe_column_unmapped_and_unlabelled_rows(tmp_path):
    rows = [
        {"q": "a", "verdict": "unsafe", "cats": "Violence, Threat"},
        {"q": "b", "verdict": "safe", "cats": "Violence"},  # the column calls it safe: its labels are ignored
        {"q": "c", "verdict": "unsafe", "cats": "Politics"},  # no category: left out, counted
        {"q": "d", "verdict": "unsafe", "cats": None},  # unsafe, no label: left out, counted
        {"q": "e", "verdict": None, "cats": None},  # no verdict at all: left out as unlabelled
        {"q": "f", "verdict": "harmful", "cats": "Threat"},
    ]
    path = write_parquet(tmp_path / "d.parquet", rows)
    labels = LabelMap({"Violence": ("S1",), "Threat": ("S1",), "Politics": None})
    data = read_dataset(path, columns=Columns(text="q", labels="cats", unsafe="verdict"), label_map=labels)
    assert [(e.messages[0]["content"], e.labels) for e in data.examples] == [("a", ("S1",)), ("b", ()), ("f", ("S1",))]
    assert (data.unmapped, data.unlabelled) == (1, 2)
    numbers = write_parquet(tmp_path / "n.parquet", [{"q": "a", "flag": 1.0}, {"q": "b", "flag": float("nan")},
                                                     {"q": "c", "flag": 0.0}])  # NaN: pandas' missing number
    data = read_dataset(numbers, columns=Columns(text="q", labels="flag"), label_map=parse_map_options(["flag=S1"]))
    assert [e.labels for e in data.examples] == [("S1",), ()] and data.unlabelled == 1
    bad = write_parquet(tmp_path / "bad.parquet", [{"q": "a", "verdict": "maybe", "cats": ""}])
    with pytest.raises(InputError, match=r"row 0: column 'verdict' holds 'maybe', which says neither.*--skip-invalid"):
        read_dataset(bad, columns=Columns(text="q", labels="cats", unsafe="verdict"), label_map=labels)


def test_unreadable_tables_are_named(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not a parquet file at all")
    with pytest.raises(InputError, match=r"d.parquet is not a readable Parquet file"):
        read_dataset(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no saved dataset"):
        read_dataset(tmp_path / "empty")
    with pytest.raises(InputError, match=r"nope.parquet does not exist; give a .jsonl, .csv, .parquet"):
        read_dataset(tmp_path / "nope.parquet")
    with pytest.raises(InputError, match="--subset.*hub dataset"):
        read_dataset(write_parquet(tmp_path / "d2.parquet", TABLE_ROWS), subset="x")


# -- hub ids on a machine that cannot reach the hub -------------------------------------------------
def read_hub_in_subprocess(tmp_path: Path, **env: str) -> tuple[str, float]:
    """``guardprob eval --data owner/name`` in a fresh process (the hub settings are read at import)."""
    environ = {**os.environ, "PYTHONPATH": str(SRC), "HF_HOME": str(tmp_path / "hf"), **env}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "guardprob.cli", "eval", "--data", "lmsys/toxic-chat", "--subset",
                           "toxicchat0124", "--split", "test", "--out", str(tmp_path / "out")],
                          env=environ, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    return done.stderr, time.monotonic() - started


def test_hub_id_offline_says_so(tmp_path):
    err, _ = read_hub_in_subprocess(tmp_path, HF_HUB_OFFLINE="1")
    assert "cannot load hub dataset lmsys/toxic-chat" in err and "offline mode is on and no copy is cached" in err
    assert "save_to_disk" in err and "--data" in err and "so it was read as a hub id" in err


def test_hub_id_unreachable_fails_at_once(tmp_path):
    import socket

    with socket.socket() as closed:  # a loopback port nobody listens on: connections are refused at once
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    err, seconds = read_hub_in_subprocess(tmp_path, HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="0", NO_PROXY="127.0.0.1",
                                          no_proxy="127.0.0.1")
    # the probe's message: the loader, with its half a minute of retries, was never called
    assert f"cannot reach the Hugging Face hub ({endpoint} does not answer" in err and "save_to_disk" in err
    assert seconds < 60
