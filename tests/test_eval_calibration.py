"""Thresholds and calibrators: fitted on the development part only, saved and loaded."""

from __future__ import annotations

import numpy as np
import pytest

from guardprob import InputError
from guardprob.evaluation.analysis import analyse, split
from guardprob.evaluation.baselines import fit_switch_threshold, logtoku, selection_scores
from guardprob.evaluation.calibration import fit_calibration, fit_threshold, load_calibration

IDS = ("S1", "S2", "S3")


def fake_records(n: int, seed: int = 0) -> list[dict]:
    """Records as the runner writes them, with informative but noisy scores."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        labels = [cid for cid in IDS if rng.random() < 0.4]
        p = {cid: float(np.clip((0.6 if cid in labels else 0.2) + rng.normal(0, 0.2), 0, 1)) for cid in IDS}
        first = {cid: v / sum(p.values()) for cid, v in p.items()}
        unsafe = bool(labels) or rng.random() < 0.2
        scores = {m: {"p_unsafe": float(max(p.values())), "p": p, "verdict": "unsafe\nS1" if unsafe else "safe"}
                  for m in ("greedy", "first_token", "marginal")}
        records.append({"index": i, "labels": labels, "scores": scores,
                        "first_id": {"p": first, "entropy": float(rng.random()), "max_prob": float(rng.random()),
                                     "logtoku": float(rng.random())}})
    return records


def test_fit_threshold_maximises_f1():
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([0.1, 0.3, 0.35, 0.8, 0.5, 0.6])
    t = fit_threshold(y, p)
    # every threshold in the list: 0.35 catches all 3 positives with one FP (0.5) -> F1 6/7, the best
    assert t == pytest.approx(0.35)
    assert fit_threshold(np.zeros(3, dtype=int), np.array([0.1, 0.2, 0.3])) == 0.5


def test_thresholds_never_touch_the_test_part():
    records = fake_records(80)
    methods = ("marginal", "entropy", "logtoku")
    a = analyse(records, IDS, methods, seed=3)
    flipped = [dict(r) for r in records]
    for i in a.test:  # flip every test label
        flipped[i] = {**records[i], "labels": [cid for cid in IDS if cid not in records[i]["labels"]]}
    b = analyse(flipped, IDS, methods, seed=3)
    assert np.array_equal(a.dev, b.dev)
    assert a.results["marginal"].calibration == b.results["marginal"].calibration
    assert a.results["marginal"].calibration.thresholds == b.results["marginal"].calibration.thresholds
    for m in ("entropy", "logtoku"):
        assert a.results[m].switch_threshold == b.results[m].switch_threshold
    # and the test metrics do see the flip, so the check above is not vacuous
    assert a.results["marginal"].after.micro_f1 != b.results["marginal"].after.micro_f1
    # while flipping a development label does move the fitted thresholds
    dev_flipped = [dict(r) for r in records]
    for i in a.dev:
        dev_flipped[i] = {**records[i], "labels": [cid for cid in IDS if cid not in records[i]["labels"]]}
    c = analyse(dev_flipped, IDS, methods, seed=3)
    assert c.results["marginal"].calibration.thresholds != a.results["marginal"].calibration.thresholds


@pytest.mark.parametrize("kind", ["isotonic", "temperature", "none"])
def test_calibration_roundtrip(tmp_path, kind):
    rng = np.random.default_rng(1)
    y = (rng.random((60, 3)) < 0.4).astype(int)
    s = np.clip(y * 0.3 + rng.random((60, 3)) * 0.6, 0, 1)
    cal = fit_calibration(y, s, IDS, kind, method="marginal", taxonomy="t", model="m")
    loaded = load_calibration(cal.save(tmp_path / "c.json"))
    assert loaded == cal
    assert set(loaded.thresholds) == set(IDS)
    for cid in IDS:
        for p in (0.0, 0.2, 0.55, 1.0):
            assert loaded.calibrate(cid, p) == pytest.approx(cal.calibrate(cid, p))
            assert 0.0 <= loaded.calibrate(cid, p) <= 1.0
    probe = np.linspace(0, 1, 11)
    assert np.all(np.diff([loaded.calibrate("S1", p) for p in probe]) >= -1e-12)  # monotone


def test_temperature_softens_overconfident_scores():
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.5).astype(int)
    # right only 70% of the time but always 0.99 sure
    right = rng.random(400) < 0.7
    p = np.where(right == y.astype(bool), 0.99, 0.01)
    cal = fit_calibration(y[:, None], p[:, None], ("S1",), "temperature")
    assert cal.calibrators["S1"].temperature > 2
    assert 0.6 < cal.calibrate("S1", 0.99) < 0.8


def test_load_calibration_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_calibration(tmp_path / "x.json")
    (tmp_path / "bad.json").write_text('{"version": 2}', encoding="utf-8")
    with pytest.raises(InputError, match="not a version-1"):
        load_calibration(tmp_path / "bad.json")


def test_split_is_seeded_and_complete():
    d1, t1 = split(20, 0.3, seed=5)
    d2, t2 = split(20, 0.3, seed=5)
    assert np.array_equal(d1, d2) and np.array_equal(t1, t2)
    assert sorted([*d1, *t1]) == list(range(20)) and len(d1) == 6
    with pytest.raises(InputError, match="dev_fraction"):
        split(20, 1.0, 0)
    with pytest.raises(InputError, match="at least 2"):
        split(1, 0.5, 0)


def test_selection_and_switch_threshold():
    probs = np.array([[0.6, 0.3, 0.1], [0.5, 0.45, 0.05], [0.2, 0.7, 0.1]])
    u = np.array([0.1, 0.9, 0.2])
    unsafe = np.array([True, True, False])
    s = selection_scores(probs, u, unsafe, 0.5)
    assert s.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]
    y = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]])
    t = fit_switch_threshold(y, probs, u, unsafe)
    assert 0.1 <= t < 0.9  # switches for row 1 only
    y_top1 = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 0]])
    assert fit_switch_threshold(y_top1, probs, u, unsafe) == float("inf")


def test_logtoku_by_hand():
    eu, au = logtoku(np.array([3.0, 1.0, -2.0]))  # top-2 evidence 3 and 1
    assert eu == pytest.approx(2 / (4 + 2))
    from scipy.special import digamma

    expected = -(0.75 * (digamma(4) - digamma(5)) + 0.25 * (digamma(2) - digamma(5)))
    assert au == pytest.approx(expected)
