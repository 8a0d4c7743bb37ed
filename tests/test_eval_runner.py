"""The resumable runner and the whole evaluate() pipeline on the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from guardprob import InputError
from guardprob.evaluation import evaluate, score_example_batch
from guardprob.evaluation.datasets import read_dataset
from helpers import LABELLED_ROWS, with_field

ROWS = LABELLED_ROWS
FAST = {"max_nodes": 40}


@pytest.fixture()
def data(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


def lines_without_timing(path):
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        row.pop("seconds", None)
        out.append(row)
    return out


def same_up_to_rounding(a, b, tol: float = 1e-6) -> bool:
    """Equal JSON values, floats within ``tol``: the prefix cache reuses keys computed for an
    earlier prompt, which moves the last bits of a score (engines.md), never anything else."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= tol
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_up_to_rounding(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same_up_to_rounding(x, y, tol) for x, y in zip(a, b))
    return a == b


class Killed(Exception):
    pass


def test_resume_after_kill_equals_uninterrupted_run(tmp_path, data, tiny_classifier):
    # max_nodes cuts these searches; where a cut falls depends on the answers a search holds,
    # and with guesses from earlier searches (prior) on what ran before: off here, the same nodes
    common = dict(classifier=tiny_classifier, batch_size=3, params={**FAST, "prior": 0.0}, progress=False, show=False)
    evaluate(data, out=tmp_path / "full", **common)

    def kill(done):
        if done >= 6:
            raise Killed()

    with pytest.raises(Killed):
        evaluate(data, out=tmp_path / "cut", after_batch=kill, **common)
    results = tmp_path / "cut" / "results.jsonl"
    assert len(results.read_text().splitlines()) == 1 + 6
    with results.open("a") as f:  # the kill also cut a record in half
        f.write('{"index": 6, "labels": ["S2"], "sco')
    with pytest.raises(InputError, match="--resume"):
        evaluate(data, out=tmp_path / "cut", **common)
    evaluate(data, out=tmp_path / "cut", resume=True, **common)
    assert same_up_to_rounding(lines_without_timing(results), lines_without_timing(tmp_path / "full" / "results.jsonl"))


def test_resume_refuses_another_run(tmp_path, data, tiny_classifier):
    common = dict(classifier=tiny_classifier, batch_size=6, params=FAST, progress=False, show=False, methods=["greedy"])
    evaluate(data, out=tmp_path / "o", limit=4, **common)
    with pytest.raises(InputError, match="another run.*examples"):
        evaluate(data, out=tmp_path / "o", resume=True, **common)
    evaluate(data, out=tmp_path / "o", force=True, **common)  # --force starts again
    assert len((tmp_path / "o" / "results.jsonl").read_text().splitlines()) == 1 + len(ROWS)


def test_resume_takes_another_speculation_not_another_search(tmp_path, data, tiny_classifier):
    """speculate and prior change what a search costs, not what it finds; eps changes the results."""
    common = dict(classifier=tiny_classifier, batch_size=3, progress=False, show=False, methods=["marginal"])

    def kill(done):
        if done >= 3:
            raise Killed()

    with pytest.raises(Killed):
        evaluate(data, out=tmp_path / "o", params=FAST, after_batch=kill, **common)
    with pytest.raises(InputError, match="another run"):
        evaluate(data, out=tmp_path / "o", resume=True, params={**FAST, "eps": 0.05}, **common)
    evaluate(data, out=tmp_path / "o", resume=True, params={**FAST, "speculate": 0, "prior": 0.0}, **common)
    assert len((tmp_path / "o" / "results.jsonl").read_text().splitlines()) == 1 + len(ROWS)


def test_report_files(tmp_path, data, tiny_classifier):
    rep = evaluate(data, out=tmp_path / "r", classifier=tiny_classifier, batch_size=6, params=FAST, progress=False, show=False)
    for key in ("reliability", "roc", "pr", "f1", "overview"):
        png = rep.files[key].read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
        import matplotlib.image

        assert matplotlib.image.imread(rep.files[key]).ndim == 3
    page = rep.files["html"].read_text()
    assert all(f'src="{rep.files[k].name}"' in page for k in ("reliability", "roc", "pr", "f1"))
    assert "<table>" in page and "marginal" in page
    csv_lines = rep.files["csv"].read_text().splitlines()
    assert csv_lines[0].startswith("estimator,stage,micro_f1") and len(csv_lines) == 1 + 2 * 9
    assert "| marginal | raw |" in rep.files["markdown"].read_text()
    from guardprob.evaluation import load_calibration

    cal = load_calibration(rep.files["calibration-marginal"])
    assert set(cal.thresholds) == set(tiny_classifier.taxonomy.ids)
    # the split note: no S3..S14 positives anywhere
    assert any("AUC is skipped" in n for n in rep.analysis.notes)


def test_taxonomy_mismatch_stops(tmp_path, tiny_classifier):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"unsafe_query": "q", "llama_guard_2_categories": ["S1"]}) + "\n")
    with pytest.raises(InputError, match="llama-guard-2"):
        evaluate(path, out=tmp_path / "o", classifier=tiny_classifier, show=False, progress=False)


def test_prefill_matches_conditional_on_greedy_first_id(tiny_classifier, data):
    """With one token per character, P(first id | unsafe\\nS) is the conditional score of the
    greedy verdict's first id (both condition on the greedy prefix before slot 0)."""
    examples = read_dataset(data).examples[:6]
    records = score_example_batch(tiny_classifier, examples, ("conditional", "prefill"), {"eps": 1e-6})
    checked = 0
    for r in records:
        verdict = r["scores"]["conditional"]["verdict"]
        assert sum(r["first_id"]["p"].values()) == pytest.approx(1.0)
        if verdict and verdict.startswith("unsafe"):
            first = verdict.split("\n")[1].split(",")[0]
            assert r["first_id"]["p"][first] == pytest.approx(r["scores"]["conditional"]["p"][first], abs=1e-4)
            checked += 1
    assert checked >= 1
    assert all(np.isfinite(r["first_id"]["logtoku"]) for r in records)


def test_ray_option_streams_batches_into_the_same_file(tmp_path, data, tiny_classifier, monkeypatch):
    """--ray calls guardprob.evaluation.distributed.ray_map with the spec and top-level batch function;
    results arriving in any order land in the resumable file like a local run's."""
    import pickle
    import sys
    import types

    import guardprob
    from guardprob.spec import ClassifierSpec

    calls = {}

    def ray_map(spec, items, fn, *, address, workers, batch_timeout=None, on_stats=None):
        calls.update(spec=spec, address=address, workers=workers, batch_timeout=batch_timeout, n=len(items))
        pickle.dumps(fn)  # what a real cluster needs
        for batch in reversed(items):  # any order
            yield fn(tiny_classifier, batch)

    fake = types.ModuleType("guardprob.evaluation.distributed")
    fake.ray_map = ray_map
    fake.check_address = lambda address: address
    monkeypatch.setitem(sys.modules, "guardprob.evaluation.distributed", fake)
    monkeypatch.setattr(guardprob.evaluation, "distributed", fake, raising=False)
    # exact equality across two runs of one classifier: no guesses from the first run in the second
    common = dict(batch_size=4, params={**FAST, "prior": 0.0}, progress=False, show=False, methods=["greedy", "marginal", "prefill"])
    spec = ClassifierSpec(taxonomy="llama-guard-3")
    remote = evaluate(data, out=tmp_path / "ray", classifier=tiny_classifier, spec=spec, ray="ray://head:10001", ray_workers=3,
                      ray_batch_timeout=300, **common)
    local = evaluate(data, out=tmp_path / "local", classifier=tiny_classifier, **common)
    assert calls == {"spec": spec, "address": "ray://head:10001", "workers": 3, "batch_timeout": 300, "n": 3}
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    # The same searches; the batches ran in another order, so the prefix cache split the prefills
    # elsewhere and float32 rounding differs (seen: 2e-8): equal within 1e-6.
    assert _close(strip(remote.records), strip(local.records), 1e-6)
    first_indices = [json.loads(x)["index"] for x in (tmp_path / "ray" / "results.jsonl").read_text().splitlines()[1:4]]
    assert first_indices == [8, 9, 10]


def _close(a, b, tol: float) -> bool:
    """Equal structures whose floats agree within ``tol``."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tol or a == b
    return a == b


def test_corrupt_results_file_is_refused(tmp_path, data, tiny_classifier):
    out = tmp_path / "o"
    evaluate(data, out=out, classifier=tiny_classifier, batch_size=6, params=FAST, progress=False, show=False, methods=["greedy"])
    lines = (out / "results.jsonl").read_text().splitlines()
    lines[3] = "garbage"
    (out / "results.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="line 4: not a results record"):
        evaluate(data, out=out, classifier=tiny_classifier, resume=True, progress=False, show=False, methods=["greedy"],
                 batch_size=6, params=FAST)


# -- resume checks every record --------------------------------------------------------------
def _strip(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_resume_drops_records_it_cannot_use_and_scores_them_again(tmp_path, data, tiny_classifier):
    """A record with an index outside the data was counted (13 examples of 12) and moved the
    fitted thresholds; a last line with only an index crashed the report (KeyError 'labels')."""
    from guardprob import GuardprobWarning

    # one example per call: a record scored again is then bit for bit the first one
    common = dict(classifier=tiny_classifier, batch_size=1, params={**FAST, "prior": 0.0}, progress=False, show=False,
                  methods=["greedy"])
    full = evaluate(data, out=tmp_path / "o", **common)
    results = tmp_path / "o" / "results.jsonl"
    good = results.read_text().splitlines()
    record = json.loads(good[1 + 4])

    def resume_over(lines, match):
        results.write_text("\n".join(lines) + "\n")
        with pytest.warns(GuardprobWarning, match=match) as caught:
            again = evaluate(data, out=tmp_path / "o", resume=True, **common)
        assert len([w for w in caught if issubclass(w.category, GuardprobWarning)]) == 1
        assert len(again.records) == len(ROWS) and _strip(again.records) == _strip(full.records)
        assert again.analysis.results["greedy"].calibration == full.analysis.results["greedy"].calibration
        return [json.loads(x)["index"] for x in results.read_text().splitlines()[1:]]

    stray = [*good, json.dumps({**record, "index": 999}), good[3]]  # no example of the data; example 2 twice
    assert resume_over(stray, r"dropped 2 record\(s\).*line 14: index 999") == list(range(12))
    broken = list(good)
    broken[1 + 4] = json.dumps({k: v for k, v in record.items() if k != "labels"})
    broken.append('{"index": 7}')
    assert resume_over(broken, r"dropped 2 record\(s\).*line 6: labels") == [*range(4), *range(5, 12), 4]


def test_resume_rescores_records_whose_values_break_their_meaning(tmp_path, data, tiny_classifier):
    """Forged values (a probability of 5 or -3, lower above upper, a negative node count) survived a
    resume and moved the fitted calibration: now each such record is scored again, with one warning."""
    from guardprob import GuardprobWarning

    common = dict(classifier=tiny_classifier, batch_size=1, params={**FAST, "prior": 0.0}, progress=False, show=False,
                  methods=["greedy"])
    full = evaluate(data, out=tmp_path / "o", **common)
    results = tmp_path / "o" / "results.jsonl"
    lines = results.read_text().splitlines()
    forged = {1: {"scores.greedy.p.S1": 5.0}, 2: {"scores.greedy.p.S2": -3},
              3: {"scores.greedy.lower.S1": 0.9, "scores.greedy.upper.S1": 0.1}, 4: {"scores.greedy.nodes": -7}}
    for index, values in forged.items():
        record = json.loads(lines[1 + index])
        for dotted, value in values.items():
            record = with_field(record, dotted, value)
        lines[1 + index] = json.dumps(record)
    results.write_text("\n".join(lines) + "\n")
    with pytest.warns(GuardprobWarning, match=r"dropped 4 record\(s\)") as caught:
        again = evaluate(data, out=tmp_path / "o", resume=True, **common)
    assert len([w for w in caught if issubclass(w.category, GuardprobWarning)]) == 1
    # scored again: the forged values are gone (a search run again may move a score's last digits)
    assert same_up_to_rounding(_strip(again.records), _strip(full.records), tol=1e-3)
    order = [json.loads(x)["index"] for x in results.read_text().splitlines()[1:]]
    assert sorted(order) == list(range(12)) and order[-4:] == [1, 2, 3, 4]


def test_resume_over_a_header_that_is_no_mapping_is_refused(tmp_path, data, tiny_classifier):
    out = tmp_path / "o"
    out.mkdir()
    for header in ('{"run": 5}', "[1]", '"run"'):
        (out / "results.jsonl").write_text(header + "\n")
        with pytest.raises(InputError, match="not a guardprob results file"):
            evaluate(data, out=out, classifier=tiny_classifier, resume=True, progress=False, show=False,
                     methods=["greedy"], params=FAST)


@pytest.fixture(scope="module")
def scored(tiny_classifier):
    """Records of every kind of method (an estimator, greedy and a baseline) for two examples."""
    from guardprob.evaluation.runner import score_example_batch as score

    examples = read_dataset_rows(ROWS[:2])
    return examples, score(tiny_classifier, examples, ("greedy", "marginal", "prefill"), {"max_nodes": 20})


def read_dataset_rows(rows):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return read_dataset(path).examples


def _set(record, dotted, value):
    return with_field(record, dotted, value)


@pytest.mark.parametrize(
    ("dotted", "value"),
    [
        ("index", True), ("index", "0"), ("index", 0.0), ("index", -1), ("index", 999), ("index", ...),
        ("labels", ...), ("labels", ["S9"]), ("labels", "S1"), ("role", "robot"),
        ("scores", ...), ("scores", []), ("scores.marginal", ...), ("scores.first_token", ...),
        ("scores.marginal.p", ...), ("scores.marginal.p", [0.5]), ("scores.marginal.p.S1", "x"),
        ("scores.marginal.p.S1", float("nan")), ("scores.marginal.p.S1", ...), ("scores.marginal.p.S99", 0.1),
        ("scores.marginal.lower", ...), ("scores.marginal.upper.S2", float("inf")), ("scores.marginal.p_unsafe", None),
        ("scores.greedy.verdict", 5), ("scores.greedy.nodes", "many"), ("first_id", ...), ("first_id.p", 3),
        ("first_id.entropy", "x"), ("first_id.logtoku", None), ("seconds", "fast"), ("seconds", ...),
        # values out of their range: probabilities, bounds that cross, counts and times below zero
        ("scores.marginal.p.S1", 5.0), ("scores.marginal.p.S1", -3), ("scores.marginal.lower.S2", 1.5),
        ("scores.marginal.upper.S2", -0.1), ("scores.marginal.p_unsafe", 1.01), ("scores.marginal.nodes", -7),
        ("scores.marginal.fields", [0.5]), ("seconds", -1.0), ("first_id.p.S1", 2.0), ("first_id.max_prob", 1.5),
        ("first_id.entropy", -0.5), ("first_id.entropy", float("inf")), ("first_id.logtoku", 7.0),
        ("first_id.entropy", float("nan")),
    ],
)
def test_record_problems_are_found(scored, dotted, value):
    from guardprob.evaluation.runner import record_problem

    examples, records = scored
    by_index = {e.index: e for e in examples}
    ids = tuple(records[0]["scores"]["marginal"]["p"])
    methods = ("greedy", "marginal", "prefill")
    assert all(record_problem(r, by_index, methods, ids) is None for r in records)
    assert record_problem(_set(records[0], dotted, value), by_index, methods, ids) is not None


def test_record_problem_finds_bounds_that_cross(scored):
    from guardprob.evaluation.runner import record_problem

    examples, records = scored
    by_index = {e.index: e for e in examples}
    crossed = _set(_set(records[0], "scores.marginal.lower.S1", 0.9), "scores.marginal.upper.S1", 0.1)
    assert "does not hold" in record_problem(crossed, by_index, ("marginal",))
    p = records[0]["scores"]["marginal"]["p"]["S1"]
    above = _set(_set(records[0], "scores.marginal.lower.S1", min(p + 0.1, 1.0)), "scores.marginal.upper.S1", 1.0)
    assert p + 0.1 > 1.0 or "does not hold" in record_problem(above, by_index, ("marginal",))
    tight = _set(_set(records[0], "scores.marginal.lower.S1", p), "scores.marginal.upper.S1", p)
    assert record_problem(tight, by_index, ("marginal",)) is None  # an exact score: lower = p = upper


def test_record_problem_takes_nan_uncertainty_and_other_methods_absent(scored):
    from guardprob.evaluation.runner import record_problem

    examples, records = scored
    by_index = {e.index: e for e in examples}
    nan_logtoku = _set(records[1], "first_id.logtoku", float("nan"))  # an engine without logits
    assert record_problem(nan_logtoku, by_index, ("marginal", "prefill")) is None
    assert record_problem(_set(records[1], "scores.marginal", ...), by_index, ("greedy",)) is None
    assert record_problem([records[1]], by_index, ("greedy",)) is not None
