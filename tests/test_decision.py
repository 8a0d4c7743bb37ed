"""Certified decisions (decide=True) against an independent brute force.

Over random taxonomies, tokenizers, models, thresholds (many placed next to the exact value,
where deciding is hard), calibrators and search settings: every flag the search certifies is
the flag of the exact probability; the bounds still hold; an uncut search on an enumerable
tree decides every threshold not within float noise of its exact value; deciding never expands
more nodes than the exhaustive search. (The brute forces are oracle.py's, cached per
process.) CI runs 60 random set-ups and settings, ``scripts/deep_check.sh`` 1000.
"""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardprob.core.decision import DecisionRule, side
from guardprob.errors import InputError
from guardprob.evaluation.calibration import Calibration, Calibrator
from helpers import budget
from oracle import POOL, brute, setup

EXAMPLES = budget(60, 1000)
SLACK = 2e-6  # float32 tree attention against float32 full forwards


def _calibration(rng: random.Random, ids, kind: str) -> Calibration | None:
    if kind == "none":
        return None
    calibrators = {}
    for cid in ids:
        if kind == "temperature":
            calibrators[cid] = Calibrator("temperature", temperature=rng.choice([0.3, 1.0, 2.5]))
        else:  # a random non-decreasing step function, as isotonic regression fits
            x = sorted(rng.random() for _ in range(4))
            y = sorted(rng.random() for _ in range(4))
            calibrators[cid] = Calibrator("isotonic", x=tuple(x), y=tuple(y))
    return Calibration({}, calibrators)


def _threshold(rng: random.Random, exact: float, calibrate) -> float:
    """Near the exact (calibrated) value half the time, where the search must work to decide."""
    value = calibrate(exact)
    if rng.random() < 0.5:
        return min(1.0, max(0.0, value + rng.choice([-1, 1]) * rng.choice([1e-4, 1e-3, 1e-2])))
    return rng.choice([0.0, rng.random(), 0.5, 1.0])


settings_strategy = st.fixed_dictionaries({
    "batch": st.sampled_from([1, 2, 64]),
    "speculate": st.sampled_from([0, 1, 3]),
    "constrained": st.booleans(),
    "max_nodes": st.sampled_from([None, None, None, 5, 40]),
    "calibration": st.sampled_from(["none", "none", "isotonic", "temperature"]),
    "unsafe": st.booleans(),
})


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, POOL - 1), knobs=settings_strategy, draw=st.integers(0, 10**6))
def test_certified_flags_are_the_exact_flags(seed, knobs, draw):
    s = setup(seed)
    bf = brute(seed, knobs["constrained"])
    clf = s.classifier
    rng = random.Random(draw)
    calibration = _calibration(rng, s.ids, knobs["calibration"])

    def calibrator(cid):
        return (lambda p: p) if calibration is None else (lambda p: calibration.calibrate(cid, p))

    exact = {cid: bf.outcome({cid}) for cid in s.ids}
    thresholds = {cid: _threshold(rng, exact[cid][0], calibrator(cid)) for cid in s.ids}
    unsafe_exact = bf.outcome(None)
    thresholds["unsafe"] = _threshold(rng, unsafe_exact[0], lambda p: p) if knobs["unsafe"] else 0.5
    for name, members in s.groups.items():
        thresholds[name] = _threshold(rng, bf.outcome(set(members))[0], lambda p: p)
    limit = knobs["max_nodes"] if not s.certified else min(knobs["max_nodes"] or 300, 300)
    prompt = clf._prompt_from_ids(s.prompt)
    search = dict(batch=knobs["batch"], speculate=knobs["speculate"], constrained=knobs["constrained"], max_nodes=limit)
    scores = clf.score_prompts([prompt], groups=s.groups or None, decide=True, thresholds=thresholds,
                               calibration=calibration, **search)[0]["marginal"]
    decision = scores.decision
    where = f"{s.describe()}; {knobs}; thresholds {thresholds}"

    def check(name, flag, truth, threshold, f, score=None):
        low, high = truth
        if score is not None:  # the bounds still hold
            assert score.lower - SLACK <= high and score.upper + SLACK >= low, (name, score, truth, where)
        exact_flags = {f(low) >= threshold, f(high) >= threshold}
        if flag is not None and len(exact_flags) == 1 and not _near(f, low, high, threshold):
            assert flag == exact_flags.pop(), (name, flag, truth, threshold, where)
        uncut = limit is None and not s.certified
        if uncut and not _near(f, low, high, threshold, 1e-5):
            assert flag is not None, (f"{name} undecided by an uncut search", truth, threshold, where)

    for cid in s.ids:
        check(cid, decision.categories[cid], exact[cid], thresholds[cid], calibrator(cid), scores.categories[cid])
    check("unsafe", decision.unsafe, unsafe_exact, thresholds["unsafe"], lambda p: p)
    for name, members in s.groups.items():
        check(name, decision.groups[name], bf.outcome(set(members)), thresholds[name], lambda p: p, scores.groups[name])
    assert decision.decided == all(v is not None for v in (*decision.categories.values(), decision.unsafe,
                                                            *decision.groups.values()))


def _near(f, low: float, high: float, threshold: float, tol: float = SLACK) -> bool:
    """The exact value sits within float noise of the threshold: either flag is right."""
    return any(abs(f(min(1.0, max(0.0, v + d))) - threshold) <= tol for v in (low, high) for d in (-tol, 0.0, tol))


def test_side_reads_calibrated_bounds():
    assert side(0.2, 0.3, 0.5) is False
    assert side(0.6, 0.7, 0.5) is True
    assert side(0.4, 0.6, 0.5) is None
    assert side(0.5, 0.5, 0.5) is True  # reaching the threshold flags, as everywhere else
    assert side(0.2, 0.3, 0.5, lambda p: 2 * p) is None
    assert side(0.3, 0.4, 0.5, lambda p: 2 * p) is True


@pytest.mark.parametrize("seed", [1, 3, 4])
def test_decision_stops_early_and_matches_the_full_search(seed):
    s = setup(seed)
    if s.certified:
        pytest.skip("a tree too large to search exhaustively")
    clf, prompt = s.classifier, s.classifier._prompt_from_ids(s.prompt)
    full = clf.score_prompts([prompt], eps=0.0, max_nodes=None)[0]["marginal"]
    for threshold in (0.02, 0.2, 0.5, 0.9):
        decided = clf.score_prompts([prompt], decide=True, thresholds=threshold)[0]["marginal"]
        assert decided.decision.decided
        for cid, c in full.categories.items():
            if abs(c.p - threshold) > 1e-6:
                assert decided.decision.categories[cid] == (c.p >= threshold), (cid, c.p, threshold)
        assert decided.expanded_nodes <= full.expanded_nodes
    easy = clf.score_prompts([prompt], decide=True, thresholds=1.0 - 1e-9)[0]["marginal"]
    assert easy.expanded_nodes < full.expanded_nodes  # the first rounds' bounds decide it


def test_decision_in_as_dict(tiny_classifier):
    row = tiny_classifier.score("bake a cake", decide=True, thresholds={"S1": 0.3, "unsafe": 0.9}, max_nodes=50).as_dict()
    assert set(row["decision"]) >= {"decided", "flagged", "categories", "unsafe", "thresholds", "flagged_categories"}
    assert row["decision"]["thresholds"]["S1"] == 0.3 and row["decision"]["thresholds"]["unsafe"] == 0.9
    assert row["decision"]["thresholds"]["S2"] == 0.5


def test_calibration_file_thresholds_apply(tmp_path):
    s = setup(3)
    clf, prompt = s.classifier, s.classifier._prompt_from_ids(s.prompt)
    ids = clf.taxonomy.ids
    calibration = Calibration({cid: 0.3 for cid in ids}, {ids[0]: Calibrator("temperature", temperature=3.0)})
    path = calibration.save(tmp_path / "cal.json")
    scores = clf.score_prompts([prompt], decide=True, calibration=str(path))[0]["marginal"]
    full = clf.score_prompts([prompt], eps=0.0, max_nodes=None)[0]["marginal"]
    for cid in ids:
        assert scores.decision.thresholds[cid] == 0.3
        assert scores.decision.categories[cid] == (calibration.calibrate(cid, full.categories[cid].p) >= 0.3)


@pytest.mark.parametrize("kwargs, words", [
    ({"decide": True, "thresholds": {"S99": 0.5}}, "S99"),
    ({"decide": True, "thresholds": 1.5}, "between 0 and 1"),
    ({"decide": True, "thresholds": {"S1": math.nan}}, "between 0 and 1"),
    ({"decide": True, "thresholds": "high"}, "mapping"),
    ({"thresholds": 0.3}, "decide=True"),
    ({"decide": "yes"}, "True or False"),
    ({"decide": True, "method": "greedy"}, "method='marginal'"),
])
def test_bad_decision_settings_are_refused(tiny_classifier, kwargs, words):
    with pytest.raises(InputError, match=words.replace("(", r"\(").replace(")", r"\)")):
        tiny_classifier.score("hello", **kwargs)


def test_rule_defaults(tiny_classifier):
    rule = DecisionRule.build(tiny_classifier.taxonomy)
    assert set(rule.categories.values()) == {0.5} and rule.unsafe == 0.5
    rule = DecisionRule.build(tiny_classifier.taxonomy, 0.2, groups=("g",))
    assert set(rule.categories.values()) == {0.2} and rule.unsafe == 0.2 and rule.groups == {"g": 0.2}
