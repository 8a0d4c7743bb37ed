"""The resumable runner and the whole evaluate() pipeline on the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from guardprob import InputError
from guardprob.evaluation import evaluate, score_example_batch
from guardprob.evaluation.datasets import read_dataset
from helpers import LABELLED_ROWS

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


class Killed(Exception):
    pass


def test_resume_after_kill_equals_uninterrupted_run(tmp_path, data, tiny_classifier):
    # max_nodes cuts these searches; where a cut falls depends on the answers a search holds,
    # and with guesses from earlier searches (prior) on what ran before: off here, byte for byte
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
    assert lines_without_timing(results) == lines_without_timing(tmp_path / "full" / "results.jsonl")


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
    """--ray calls guardprob.distributed.ray_map with the spec and top-level batch function;
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

    fake = types.ModuleType("guardprob.distributed")
    fake.ray_map = ray_map
    fake.check_address = lambda address: address
    monkeypatch.setitem(sys.modules, "guardprob.distributed", fake)
    monkeypatch.setattr(guardprob, "distributed", fake, raising=False)
    # exact equality across two runs of one classifier: no guesses from the first run in the second
    common = dict(batch_size=4, params={**FAST, "prior": 0.0}, progress=False, show=False, methods=["greedy", "marginal", "prefill"])
    spec = ClassifierSpec(taxonomy="llama-guard-3")
    remote = evaluate(data, out=tmp_path / "ray", classifier=tiny_classifier, spec=spec, ray="ray://head:10001", ray_workers=3,
                      ray_batch_timeout=300, **common)
    local = evaluate(data, out=tmp_path / "local", classifier=tiny_classifier, **common)
    assert calls == {"spec": spec, "address": "ray://head:10001", "workers": 3, "batch_timeout": 300, "n": 3}
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(remote.records) == strip(local.records)
    first_indices = [json.loads(x)["index"] for x in (tmp_path / "ray" / "results.jsonl").read_text().splitlines()[1:4]]
    assert first_indices == [8, 9, 10]


def test_corrupt_results_file_is_refused(tmp_path, data, tiny_classifier):
    out = tmp_path / "o"
    evaluate(data, out=out, classifier=tiny_classifier, batch_size=6, params=FAST, progress=False, show=False, methods=["greedy"])
    lines = (out / "results.jsonl").read_text().splitlines()
    lines[3] = "garbage"
    (out / "results.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="line 4: not a results record"):
        evaluate(data, out=out, classifier=tiny_classifier, resume=True, progress=False, show=False, methods=["greedy"],
                 batch_size=6, params=FAST)
