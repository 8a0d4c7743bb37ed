"""The dataset readers on small files of each layout, malformed ones included."""

from __future__ import annotations

import json

import pytest

from guardprob import InputError, TaxonomyError, load_taxonomy
from guardprob.evaluation.datasets import Columns, read_dataset, sample_path


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_paper_jsonl(tmp_path):
    f = write(tmp_path / "p.jsonl", [{"unsafe_query": "q1", "llama_guard_3_categories": ["S4", "S10"]},
                                     {"unsafe_query": "q2", "llama_guard_3_categories": ["S1"]}])
    d = read_dataset(f)
    assert d.taxonomy == "llama-guard-3"
    assert [e.labels for e in d.examples] == [("S4", "S10"), ("S1",)]
    assert d.examples[0].messages == ({"role": "user", "content": "q1"},)
    assert not d.has_safe


def test_paper_taxonomy_mismatch_names_the_fix(tmp_path):
    f = write(tmp_path / "p.jsonl", [{"unsafe_query": "q", "llama_guard_2_categories": ["S9"]}])
    d = read_dataset(f)
    with pytest.raises(InputError, match="--taxonomy llama-guard-2"):
        d.check_taxonomy(load_taxonomy("llama-guard-3"))


def test_unknown_ids_named(tmp_path):
    f = write(tmp_path / "g.jsonl", [{"text": "hello", "labels": ["S1", "S99"]}])
    with pytest.raises(TaxonomyError, match=r"g.jsonl:1.*'S99'.*llama-guard-3"):
        read_dataset(f).check_taxonomy(load_taxonomy("llama-guard-3"))


def test_generic_jsonl_layouts_and_columns(tmp_path):
    f = write(tmp_path / "g.jsonl", [
        {"body": "hi", "cats": []},
        {"msgs": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "cats": "S1, S2"},
        {"q": "question", "a": "answer", "cats": ["S7"]},
    ])
    d = read_dataset(f, columns=Columns(text="body", messages="msgs", prompt="q", response="a", labels="cats"))
    assert [e.labels for e in d.examples] == [(), ("S1", "S2"), ("S7",)]
    assert [e.role for e in d.examples] == ["user", "assistant", "assistant"]
    assert d.has_safe and d.taxonomy is None


def test_csv(tmp_path):
    f = tmp_path / "g.csv"
    f.write_text('text,labels\n"how to bake bread",\n"hurt someone","S1,S2"\n', encoding="utf-8")
    d = read_dataset(f)
    assert [e.labels for e in d.examples] == [(), ("S1", "S2")]
    assert d.examples[1].source.endswith("g.csv:3")


def test_beavertails_mapping(tmp_path):
    cats = {"animal_abuse": False, "privacy_violation": True, "self_harm": True, "controversial_topics,politics": False}
    only_unmapped = {"controversial_topics,politics": True}
    f = write(tmp_path / "b.jsonl", [
        {"prompt": "p", "response": "r", "category": cats, "is_safe": False},
        {"prompt": "p", "response": "r", "category": {"animal_abuse": False}, "is_safe": True},
        {"prompt": "p", "response": "r", "category": only_unmapped, "is_safe": False},
    ])
    d3 = read_dataset(f)
    assert [e.labels for e in d3.examples] == [("S7", "S11"), ()]
    assert d3.unmapped == 1 and d3.taxonomy == "llama-guard-3"
    assert d3.examples[0].role == "assistant"
    d2 = read_dataset(f, taxonomy="llama-guard-2")
    assert d2.examples[0].labels == ("S6", "S10") and d2.taxonomy == "llama-guard-2"


def test_bad_line_stops_with_file_and_line(tmp_path):
    f = write(tmp_path / "g.jsonl", [{"text": "ok", "labels": []}, "{not json", {"text": "ok", "labels": []}])
    with pytest.raises(InputError, match=r"g.jsonl:2: not valid JSON.*--skip-invalid"):
        read_dataset(f)
    d = read_dataset(f, skip_invalid=True)
    assert len(d.examples) == 2 and len(d.skipped) == 1 and ":2:" in d.skipped[0]


@pytest.mark.parametrize("row, message", [
    ({"labels": ["S1"]}, "no conversation"),
    ({"text": "x"}, "no column 'labels'"),
    ({"text": "x", "labels": [1]}, "list of category ids"),
    ({"text": "   ", "labels": []}, "empty or whitespace"),
    ({"messages": [{"role": "robot", "content": "x"}], "labels": []}, "role 'robot'"),
    ({"text": "x", "labels": ["S1", "S1"]}, "repeats"),
])
def test_malformed_rows(tmp_path, row, message):
    f = write(tmp_path / "g.jsonl", [row])
    with pytest.raises(InputError, match=message):
        read_dataset(f)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_dataset(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(InputError, match="is empty"):
        read_dataset(tmp_path / "e.jsonl")


def test_shipped_sample():
    d = read_dataset(None)
    assert d.path == str(sample_path())
    assert len(d.examples) >= 24 and d.has_safe
    assert {e.role for e in d.examples} == {"user", "assistant"}
    d.check_taxonomy(load_taxonomy("llama-guard-3"))
