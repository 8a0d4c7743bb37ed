"""No file crashes a command: every file reader turns bad bytes and wrong shapes into the
package's own errors, naming the file, the field and the fix."""

from __future__ import annotations

import json
import math
import unicodedata
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardprob import GuardprobError, InputError, TaxonomyError, TemplateError, load_taxonomy
from guardprob.evaluation.calibration import Calibration, Calibrator, load_calibration
from guardprob.evaluation.datasets import read_dataset
from guardprob.server.config import ServerConfig, load_config, resolve_thresholds
from helpers import with_field

GARBAGE = b"\xff\xfe\x00\x81garbage\xc3\x28\n\x9f"
LG3 = load_taxonomy("llama-guard-3")


def _write(directory: Path, name: str, content: bytes | str) -> Path:
    path = directory / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    return path


def _read_input(path: Path) -> object:
    from guardprob.commands.score import read_input  # the `score --input` reader

    return read_input(str(path))


# reader, the file names it reads, the error type it raises
READERS = {
    "taxonomy": (load_taxonomy, ("t.yaml", "t.json"), TaxonomyError),
    "server config": (load_config, ("c.yaml", "c.json"), InputError),
    "calibration": (load_calibration, ("calibration.json",), InputError),
    "dataset": (read_dataset, ("d.jsonl", "d.csv"), InputError),
    "score input": (_read_input, ("in.jsonl",), InputError),
}
CASES = [(kind, name) for kind, (_, names, _) in READERS.items() for name in names]


# -- undecodable bytes ----------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "name"), CASES)
def test_binary_garbage_is_refused_naming_the_file(tmp_path, kind, name):
    read, _, error = READERS[kind]
    path = _write(tmp_path, name, GARBAGE)
    with pytest.raises(error, match="UTF-8") as info:
        read(path)
    assert str(path) in str(info.value)


# -- wrong shapes ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("numbers.yaml", "[1, 2, 3]\n", "category 0: expected a mapping"),
        ("scalar.yaml", "just words\n", "non-empty list of categories"),
        ("number.json", "7", "non-empty list of categories"),
        ("no_id.yaml", "- {name: Violence}\n", "field 'id'"),
        ("no_name.yaml", "categories: [{id: V}]\n", "field 'name'"),
        ("name_list.yaml", "- {id: V, name: [a]}\n", "field 'name'"),
        ("description_map.yaml", "- {id: V, name: v, description: {a: 1}}\n", "field 'description'"),
        ("categories_map.yaml", "categories: {id: V}\n", "non-empty list of categories"),
        ("name_map.yaml", "name: {a: 1}\ncategories: [{id: V, name: v}]\n", "field 'name'"),
        ("surrogate.json", '[{"id": "V", "name": "a\\ud800b"}]', "field 'name'"),
    ],
)
def test_taxonomy_file_shapes(tmp_path, name, text, match):
    path = _write(tmp_path, name, text)
    with pytest.raises(TaxonomyError, match=match) as info:
        load_taxonomy(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("list.yaml", "- max_batch: 2\n", "expected a mapping"),
        ("scalar.json", "3", "expected a mapping"),
        ("cors.yaml", "cors_origins: {a: 1}\n", "field 'cors_origins'"),
        ("nan.yaml", "default_threshold: .nan\n", "default_threshold"),
        ("inf.json", '{"thresholds": {"S1": Infinity}}', "threshold 'S1'"),
        ("text.yaml", "thresholds: {S1: high}\n", "threshold 'S1'"),
        ("null.yaml", "thresholds: {S1: null}\n", "threshold 'S1'"),
        ("seven.yaml", "thresholds: {S1: 7.0}\n", "threshold 'S1'"),
        ("huge.json", '{"batch_wait_ms": 1' + "0" * 400 + "}", "batch_wait_ms"),  # too large for a float
        ("search.yaml", "search: {1: 2, eps: 0.1, beam: 3}\n", "unknown key"),
    ],
)
def test_server_config_file_shapes(tmp_path, name, text, match):
    path = _write(tmp_path, name, text)
    with pytest.raises(InputError, match=match) as info:
        load_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("[1, 2]", "expected a JSON object"),
        ('"text"', "expected a JSON object"),
        ('{"text": "a\\ud800b", "labels": []}', "not valid Unicode"),
        ("[" * 5000 + "]" * 5000, "nested too deeply|not valid JSON"),
        ('{"text": "hi", "labels": [' + "9" * 5000 + "]}", "not valid JSON"),
        ('{"messages": "[' + "1" * 5000 + ']", "labels": []}', "not a readable JSON list"),
    ],
)
def test_dataset_lines_that_are_not_examples(tmp_path, line, match):
    path = _write(tmp_path, "d.jsonl", '{"text": "fine", "labels": []}\n' + line + "\n")
    with pytest.raises(InputError, match=match) as info:
        read_dataset(path)
    assert f"{path}:2" in str(info.value)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("[1, 2]", "expected an object"),
        ('{"messages": [{"role": "user", "content": 5}]}', "content of type int"),
        ('{"messages": "[' + "1" * 5000 + ']"}', "not a readable JSON list"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "role 'robot'"),
        ('{"text": "a\\ud800b"}', "not valid Unicode"),
        ("[" * 5000 + "]" * 5000, "nested too deeply|not valid JSON"),
    ],
)
def test_score_input_lines_are_checked_before_the_model_loads(tmp_path, line, match):
    path = _write(tmp_path, "in.jsonl", '{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(InputError, match=match) as info:
        _read_input(path)
    assert f"{path}, line 3" in str(info.value)


def test_score_input_reads_every_shape_it_documents(tmp_path):
    path = _write(tmp_path, "in.jsonl", '{"text": "a"}\n{"prompt": "p", "response": "r"}\n{"unsafe_query": "q"}\n')
    assert _read_input(path) == ["a", [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}], "q"]


# -- calibration files --------------------------------------------------------------------------
GOOD_CALIBRATION = {
    "version": 1, "method": "marginal", "taxonomy": "llama-guard-3", "model": "m", "kind": "isotonic",
    "thresholds": {"S1": 0.3, "S2": 0.5},
    "calibrators": {"S1": {"kind": "isotonic", "x": [0.0, 0.5, 1.0], "y": [0.0, 0.4, 1.0]},
                    "S2": {"kind": "temperature", "temperature": 1.7}, "S3": {"kind": "none"}},
}


def _with(path: str, value: object) -> dict:
    """GOOD_CALIBRATION with the dotted field set to value (or removed, for ...)."""
    return with_field(GOOD_CALIBRATION, path, value)


BAD_CALIBRATIONS = [
    (_with("thresholds.S1", "high"), "thresholds.S1"),
    (_with("thresholds.S1", None), "thresholds.S1"),
    (_with("thresholds.S1", [0.5]), "thresholds.S1"),
    (_with("thresholds.S1", math.nan), "thresholds.S1"),
    (_with("thresholds.S1", math.inf), "thresholds.S1"),
    (_with("thresholds.S1", 7.0), "thresholds.S1"),
    (_with("thresholds.S1", -0.1), "thresholds.S1"),
    (_with("thresholds.S1", True), "thresholds.S1"),
    (_with("thresholds", [0.5]), "'thresholds'"),
    (_with("calibrators", [1, 2]), "'calibrators'"),
    (_with("calibrators.S1", 3), "calibrators.S1"),
    (_with("calibrators.S1.x", [0.0, 1.0]), "calibrators.S1.x"),  # 2 x for 3 y
    (_with("calibrators.S1.y", []), "calibrators.S1"),
    (_with("calibrators.S1.x", []), "calibrators.S1"),
    (_with("calibrators.S1.x", [0.0, "a", 1.0]), "calibrators.S1.x"),
    (_with("calibrators.S1.x", [0.0, math.nan, 1.0]), "calibrators.S1.x"),
    (_with("calibrators.S1.y", [0.0, math.inf, 1.0]), "calibrators.S1.y"),
    (_with("calibrators.S1.y", [0.0, 0.5, 2.0]), "calibrators.S1.y"),
    (_with("calibrators.S1.x", [0.0, 0.7, 0.5]), "calibrators.S1.x.*non-decreasing"),
    (_with("calibrators.S1.x", "0, 1, 2"), "calibrators.S1.x"),
    (_with("calibrators.S1.x", ...), "calibrators.S1.x"),
    (_with("calibrators.S2.temperature", 0), "calibrators.S2.temperature"),
    (_with("calibrators.S2.temperature", -1.5), "calibrators.S2.temperature"),
    (_with("calibrators.S2.temperature", math.nan), "calibrators.S2.temperature"),
    (_with("calibrators.S2.temperature", "1.7"), "calibrators.S2.temperature"),
    (_with("calibrators.S2.temperature", 10**400), "calibrators.S2.temperature"),
    (_with("calibrators.S2.temperature", ...), "calibrators.S2.temperature"),
    # parameters outside a sane range: numpy overflowed on a temperature of 1e-320
    (_with("calibrators.S2.temperature", 1e-320), "calibrators.S2.temperature.*between 0.001 and 1000"),
    (_with("calibrators.S2.temperature", 9e-4), "calibrators.S2.temperature.*between 0.001 and 1000"),
    (_with("calibrators.S2.temperature", 1001.0), "calibrators.S2.temperature.*between 0.001 and 1000"),
    (_with("calibrators.S2.temperature", math.inf), "calibrators.S2.temperature"),
    (_with("calibrators.S1.x", [0.0, 0.5, 1.5]), "calibrators.S1.x.*between 0 and 1"),
    (_with("calibrators.S1.x", [-0.5, 0.5, 1.0]), "calibrators.S1.x.*between 0 and 1"),
    (_with("calibrators.S1.y", [0.0, 0.6, 0.4]), "calibrators.S1.y.*decreases"),
    (_with("calibrators.S2.temprature", 2.0), "calibrators.S2.*temprature"),
    (_with("calibrators.S2.kind", "platt"), "calibrators.S2.kind"),
    (_with("kind", "platt"), "'kind'"),
    (_with("method", "best"), "'method'"),
    (_with("method", 3), "'method'"),
    (_with("model", ["m"]), "'model'"),
    (_with("version", True), "version-1"),
    (_with("threshold", {}), "unknown field.*threshold"),
    ([GOOD_CALIBRATION], "version-1"),
]


@pytest.mark.parametrize(("data", "field"), BAD_CALIBRATIONS)
def test_calibration_files_are_validated_whole(tmp_path, data, field):
    path = _write(tmp_path, "calibration-marginal.json", json.dumps(data))
    with pytest.raises(InputError, match=field) as info:
        load_calibration(path)
    message = str(info.value)
    assert str(path) in message and ";" in message  # the file, then the fix


def test_a_good_calibration_file_loads_and_round_trips(tmp_path):
    path = _write(tmp_path, "calibration-marginal.json", json.dumps(GOOD_CALIBRATION))
    loaded = load_calibration(path)
    assert loaded.thresholds == {"S1": 0.3, "S2": 0.5}
    assert loaded.calibrate("S1", 0.25) == pytest.approx(0.2)
    assert load_calibration(loaded.save(tmp_path / "again.json")) == loaded
    # a pre-existing file without calibrators or metadata still loads
    minimal = _write(tmp_path, "minimal.json", json.dumps({"version": 1, "thresholds": {"S1": 1.0}}))
    assert load_calibration(minimal).thresholds == {"S1": 1.0}


def test_calibration_temperatures_at_the_edges_load_and_fits_stay_inside(tmp_path):
    import numpy as np

    from guardprob.evaluation.calibration import fit_calibrator

    for t in (1e-3, 1e3):
        path = _write(tmp_path, "calibration-marginal.json", json.dumps(_with("calibrators.S2.temperature", t)))
        assert load_calibration(path).calibrators["S2"].temperature == t
    y = np.array([0, 0, 0, 1, 1, 1])
    for p in (np.array([0.4999, 0.49995, 0.49999, 0.50001, 0.50005, 0.5001]),  # separable at once: 1/T huge
              np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])):  # reversed: 1/T below zero
        t = fit_calibrator(y, p, "temperature").temperature
        assert 1e-3 <= t <= 1e3


def test_calibration_types_refuse_what_a_file_would_be_refused_for():
    with pytest.raises(InputError, match="x' has 2 values but 'calibrator.y' has 1"):
        Calibrator("isotonic", x=(0.0, 1.0), y=(0.5,))
    with pytest.raises(InputError, match="temperature"):
        Calibrator("temperature", temperature=0.0)
    with pytest.raises(InputError, match="kind"):
        Calibrator("platt")
    with pytest.raises(InputError, match="thresholds.S1"):
        Calibration({"S1": math.nan})
    with pytest.raises(InputError, match="calibrators.S1"):
        Calibration({}, {"S1": "isotonic"})  # type: ignore[dict-item]


def test_calibration_ids_are_checked_against_the_taxonomy(tmp_path):
    path = _write(tmp_path, "calibration-marginal.json", json.dumps(_with("calibrators.S99", {"kind": "none"})))
    assert "S99" in load_calibration(path).calibrators  # no taxonomy known: loads
    with pytest.raises(InputError, match=r"calibrators\.S99.*llama-guard-3") as info:
        load_calibration(path, LG3)
    assert str(path) in str(info.value)
    with pytest.raises(InputError, match=r"calibrators\.S99") as info:
        resolve_thresholds(ServerConfig(), LG3, load_calibration(path))
    assert str(path) in str(info.value)
    wrong = _write(tmp_path, "c2.json", json.dumps(_with("thresholds.S99", 0.5)))
    with pytest.raises(InputError, match=r"thresholds\.S99"):
        resolve_thresholds(ServerConfig(), LG3, load_calibration(wrong))


# -- category ids ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad_id",
    ["S\t1", "S1\t", "S\u00a01", "S\u20281", "S\u20291", "S\u200b1", "S\ufeff1", "S\x851", "S\x001", "S\u30001",
     "S\u180e1", "S\ue0001", "S1\r", "S1 2", " S1", "S,1"],
)
def test_category_ids_refuse_every_whitespace_and_control_character(tmp_path, bad_id):
    path = _write(tmp_path, "t.json", json.dumps([{"id": bad_id, "name": "n"}]))
    with pytest.raises(TaxonomyError, match="contains whitespace|field 'id'") as info:
        load_taxonomy(path)
    assert str(path) in str(info.value)


def test_category_ids_keep_what_a_verdict_can_spell(tmp_path):
    path = _write(tmp_path, "t.json", json.dumps([{"id": i, "name": "n"} for i in ("S1", "hate-2", "Ω_3", "数")]))
    assert load_taxonomy(path).ids == ("S1", "hate-2", "Ω_3", "数")


# -- server configs that could never serve ---------------------------------------------------
@pytest.mark.parametrize(
    ("settings_", "names"),
    [
        ({"queue_size": 8}, ("queue_size", "max_inputs")),
        ({"queue_size": 31, "max_inputs": 32}, ("queue_size", "max_inputs")),
        ({"max_body_bytes": 12}, ("max_body_bytes",)),
        ({"batch_wait_ms": 60_000, "timeout_s": 60}, ("batch_wait_ms", "timeout_s")),
        ({"batch_wait_ms": 5_000, "timeout_s": 2}, ("batch_wait_ms", "timeout_s")),
        ({"timeout_s": 1e300}, ("timeout_s",)),
        ({"timeout_s": 0}, ("timeout_s",)),
        ({"batch_wait_ms": -1}, ("batch_wait_ms",)),
        ({"max_batch": 0}, ("max_batch",)),
        ({"max_inputs": 0}, ("max_inputs",)),
        ({"default_threshold": math.nan}, ("default_threshold",)),
        ({"thresholds": {"S1": math.inf}}, ("S1",)),
    ],
)
def test_server_configs_that_can_never_serve_are_refused(tmp_path, settings_, names):
    path = _write(tmp_path, "server.json", json.dumps(settings_))
    with pytest.raises(InputError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and all(name in message for name in names)


@pytest.mark.parametrize(
    "settings_",
    [
        {"queue_size": 32},  # one request of max_inputs fills the queue exactly
        {"queue_size": 4, "max_inputs": 4},
        {"max_body_bytes": 13},  # {"input":"x"}
        {"batch_wait_ms": 60_000, "timeout_s": 60, "max_batch": 1},  # no batch ever waits
        {"batch_wait_ms": 0, "timeout_s": 0.3},
    ],
)
def test_server_configs_at_the_edge_still_load(tmp_path, settings_):
    path = _write(tmp_path, "server.yaml", yaml.safe_dump(settings_))
    config = load_config(path)
    assert all(getattr(config, k) == v for k, v in settings_.items())


# -- property-based: random bytes and random shapes -------------------------------------------
# Keys the readers look for, so that random mappings reach the fields behind them.
KEYS = ("version", "method", "taxonomy", "model", "kind", "thresholds", "calibrators", "x", "y", "temperature",
        "S1", "S2", "categories", "id", "name", "description", "max_inputs", "queue_size", "max_batch",
        "batch_wait_ms", "timeout_s", "max_body_bytes", "search", "eps", "default_threshold", "cors_origins",
        "text", "messages", "role", "content", "prompt", "response", "labels", "unsafe_query",
        "llama_guard_3_categories", "category", "is_safe")
SCALARS = (st.none() | st.booleans() | st.integers(-3, 10**20) | st.just(10**400)  # too large for a float
           | st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False)
           | st.text(max_size=8) | st.sampled_from(["user", "assistant", "isotonic", "temperature", "none",
                                                    "marginal", "S1", "llama-guard-3", "\t", "\u00a0"]))
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=5),
    max_leaves=20,
)
PROPERTY = settings(max_examples=100, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _only_own_errors(kind: str, path: Path) -> None:
    read, _, _ = READERS[kind]
    try:
        read(path)
    except GuardprobError:
        pass  # anything else (UnicodeDecodeError, KeyError, TypeError, yaml errors...) fails the test


def _render(name: str, value: object) -> str:
    if name.endswith(".yaml"):
        return yaml.safe_dump(value)
    if name.endswith((".jsonl", ".csv")):  # one value per line; a list spreads over lines
        rows = value if isinstance(value, list) and value else [value]
        return "".join(json.dumps(row) + "\n" for row in rows)
    return json.dumps(value)


@pytest.mark.parametrize(("kind", "name"), CASES)
@PROPERTY
@given(content=st.binary(max_size=300) | st.builds(lambda a, b: a + b, st.sampled_from([b"", b'{"', b"- ", b"[{"]),
                                                   st.binary(max_size=100)))
def test_random_bytes_raise_only_guardprob_errors(tmp_path, kind, name, content):
    _only_own_errors(kind, _write(tmp_path, name, content))


@pytest.mark.parametrize(("kind", "name"), CASES)
@PROPERTY
@given(value=VALUES)
def test_random_shapes_raise_only_guardprob_errors(tmp_path, kind, name, value):
    _only_own_errors(kind, _write(tmp_path, name, _render(name, value)))


# Valid documents, for each reader one, that a strategy below breaks at a few random places: a
# random value at random depth reaches the checks behind the first few fields.
VALID = {
    "taxonomy": {"name": "t", "categories": [{"id": "S1", "name": "a", "description": "d"}, {"id": "S2", "name": "b"}]},
    "server config": {"method": "marginal", "thresholds": {"S1": 0.5}, "default_threshold": 0.5, "max_inputs": 4,
                      "queue_size": 8, "max_batch": 2, "batch_wait_ms": 1, "timeout_s": 5, "max_body_bytes": 1000,
                      "max_chars": 100, "search": {"eps": 0.1, "max_nodes": 10}, "cors_origins": ["https://a"]},
    "calibration": GOOD_CALIBRATION,
    "dataset": [{"text": "a", "labels": ["S1"]}, {"messages": [{"role": "user", "content": "x"}], "labels": []},
                {"prompt": "p", "response": "r", "labels": "S1,S2"}],
    "score input": [{"text": "a"}, {"messages": [{"role": "user", "content": "x"}]}, {"prompt": "p", "response": "r"}],
}


@st.composite
def broken(draw, document):
    """``document`` with 1-3 random places set to a random value or removed."""
    document = json.loads(json.dumps(document))
    for _ in range(draw(st.integers(1, 3))):
        target = document
        while isinstance(target, (dict, list)) and target:
            key = draw(st.sampled_from(list(target) if isinstance(target, dict) else list(range(len(target)))))
            child = target[key]
            if isinstance(child, (dict, list)) and child and draw(st.booleans()):
                target = child  # go deeper
                continue
            if draw(st.booleans()):
                del target[key]
            else:
                target[key] = draw(VALUES)
            break
    return document


@pytest.mark.parametrize(("kind", "name"), [c for c in CASES if not c[1].endswith(".csv")])
@PROPERTY
@given(data=st.data())
def test_broken_documents_raise_only_guardprob_errors(tmp_path, kind, name, data):
    _only_own_errors(kind, _write(tmp_path, name, _render(name, data.draw(broken(VALID[kind])))))


# ids and names: arbitrary Unicode, lone surrogates (JSON escapes) and the whitespace that hides in it
UNICODE = st.text(st.characters(exclude_categories=()) | st.sampled_from(" \t\n,\u00a0\u2028\u200b\ufeff\x85"), max_size=6)


@PROPERTY
@given(rows=st.lists(st.fixed_dictionaries({"id": UNICODE, "name": UNICODE}, optional={"description": UNICODE}),
                     min_size=1, max_size=4))
def test_random_taxonomies_load_or_raise_taxonomy_error(tmp_path, rows):
    path = _write(tmp_path, "t.json", json.dumps(rows))
    try:
        taxonomy = load_taxonomy(path)
    except TaxonomyError:
        return
    for category in taxonomy:
        assert category.id and not any(unicodedata.category(ch)[0] in "CZ" or ch.isspace() or ch == "," for ch in category.id)
        category.name.encode("utf-8")  # printable later: no lone surrogate


# -- the commands: exit 2 and one error line, no traceback -------------------------------------
def _main(capsys, argv: list[str]) -> tuple[int, str]:
    from guardprob.cli import main

    code = main(argv)
    return code, capsys.readouterr().err


def _assert_clean_error(code: int, err: str, path: Path) -> None:
    assert code == 2
    assert err.startswith("guardprob: error:") and str(path) in err and "Traceback" not in err


def test_score_input_garbage_exits_2(tmp_path, capsys):
    path = _write(tmp_path, "in.jsonl", GARBAGE)
    _assert_clean_error(*_main(capsys, ["score", "--input", str(path)]), path)


def test_score_calibration_garbage_exits_2(tmp_path, capsys):
    path = _write(tmp_path, "calibration-marginal.json", GARBAGE)
    _assert_clean_error(*_main(capsys, ["score", "hello", "--calibration", str(path)]), path)
    path.write_text(json.dumps(_with("thresholds.S1", 7.0)))
    _assert_clean_error(*_main(capsys, ["score", "hello", "--calibration", str(path)]), path)


@pytest.fixture()
def tiny_default_model(monkeypatch, tiny_model, char_tok):
    """The commands' model loads give the tiny model instead of the real default (seconds saved)."""
    import guardprob.models

    monkeypatch.setattr(guardprob.models, "load", lambda *args, **kwargs: (tiny_model, char_tok, "tiny"))


def test_score_taxonomy_garbage_exits_2(tmp_path, capsys, tiny_default_model):
    path = _write(tmp_path, "mine.yaml", GARBAGE)
    _assert_clean_error(*_main(capsys, ["score", "hello", "--template", "llama-guard-3", "--taxonomy", str(path)]), path)


def test_score_calibration_for_another_taxonomy_exits_2(tmp_path, capsys, tiny_default_model):
    path = _write(tmp_path, "calibration-marginal.json", json.dumps(_with("thresholds.S15", 0.5)))
    code, err = _main(capsys, ["score", "hello", "--template", "llama-guard-3", "--max-nodes", "5", "--calibration", str(path)])
    _assert_clean_error(code, err, path)
    assert "thresholds.S15" in err


def test_serve_config_garbage_exits_2(tmp_path, capsys):
    path = _write(tmp_path, "server.yaml", GARBAGE)
    _assert_clean_error(*_main(capsys, ["serve", "--config", str(path)]), path)
    path.write_text("queue_size: 8\n")
    code, err = _main(capsys, ["serve", "--config", str(path)])
    _assert_clean_error(code, err, path)
    assert "max_inputs" in err


def test_eval_resume_over_a_garbage_results_file_exits_2(tmp_path, capsys, tiny_default_model):
    data = _write(tmp_path, "d.jsonl", '{"text": "a", "labels": []}\n{"text": "b", "labels": ["S1"]}\n')
    (tmp_path / "out").mkdir()
    results = _write(tmp_path / "out", "results.jsonl", GARBAGE)
    argv = ["eval", "--data", str(data), "--out", str(tmp_path / "out"), "--resume", "--methods", "greedy",
            "--template", "llama-guard-3", "--max-nodes", "5", "--no-progress"]
    _assert_clean_error(*_main(capsys, argv), results)


# -- paths that are no regular file: named, with the fix (they said "does not exist", or blocked on a FIFO) ----
def _template(path: Path) -> object:
    from guardprob.formats.prompt_file import PromptFileFormat

    return PromptFileFormat.load(path)


def _conversations(path: Path) -> object:
    from guardprob.inputs.conversation import read_conversations

    return list(read_conversations(path))


ODD_READERS = {**READERS, "template": (_template, ("t.txt",), TemplateError),
               "conversations": (_conversations, ("c.jsonl",), InputError)}


def _odd_path(tmp_path: Path, kind: str) -> tuple[Path, str]:
    import os

    if kind == "directory":
        path = tmp_path / "folder.jsonl"
        path.mkdir()
        return path, "is a directory"
    if kind == "fifo":
        path = tmp_path / "pipe.jsonl"
        os.mkfifo(path)
        return path, r"is a named pipe \(FIFO\)"
    if kind == "device":
        return Path("/dev/zero"), "is a character device"
    return tmp_path / "missing.jsonl", "does not exist"


# a directory is a dataset saved with save_to_disk (test_eval_datasets reads those); /dev/zero, with no
# .yaml or .json suffix, names a taxonomy preset
ODD_CASES = [(kind, odd) for kind in ODD_READERS for odd in ("directory", "fifo", "device", "missing")
             if (kind, odd) not in (("dataset", "directory"), ("taxonomy", "device"))]


@pytest.mark.parametrize(("kind", "odd"), ODD_CASES)
def test_odd_paths_are_named_with_the_fix(tmp_path, kind, odd):
    read, _, error = ODD_READERS[kind]
    path, problem = _odd_path(tmp_path, odd)
    with pytest.raises(error, match=problem) as info:
        read(path)
    message = str(info.value)
    assert str(path) in message and "; give" in message  # the path, the problem, then the fix


@pytest.mark.parametrize("odd", ["directory", "fifo", "device"])
def test_score_input_on_an_odd_path_exits_2(tmp_path, capsys, odd):
    path, problem = _odd_path(tmp_path, odd)
    code, err = _main(capsys, ["score", "--input", str(path)])
    _assert_clean_error(code, err, path)
    assert "does not exist" not in err and "regular file" in err
