"""The bounds against an independent brute force, over random taxonomies, tokenizers, models and settings.

For every category, P(unsafe), every group and every greedy-path estimator:
``lower <= exact <= upper`` and ``lower <= p <= upper``; no interval wider than the
unexplored mass; exhaustive searches equal the brute force; the greedy-path estimators are
exact whenever no node limit, depth limit or tolerance cuts the search. Set-ups with too
many verdicts to enumerate (30 ids) are checked against the brute force's own certified
interval. ``GUARDPROB_ORACLE_EXAMPLES`` sets how many configurations run (default 200;
``scripts/bounds_oracle.sh`` runs a longer seeded search).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardprob.estimators import METHODS
from oracle import brute, setup

POOL = int(os.environ.get("GUARDPROB_ORACLE_POOL", "28"))  # random set-ups (cached; settings vary freely)
EXAMPLES = int(os.environ.get("GUARDPROB_ORACLE_EXAMPLES", "200"))
SLACK = 2e-6  # float32 tree attention against float32 full forwards, summed over a tree

METHOD_SETS = [METHODS, ("marginal",), ("conditional",), ("first_token", "joint"), ("greedy", "marginal")]

configurations = st.fixed_dictionaries({
    "eps": st.sampled_from([0.0, 1e-4, 1e-3, 0.01, 0.05, 0.2, 1.0]),
    "top_p": st.sampled_from([1.0, 1.0, 0.99, 0.9, 0.5]),
    "max_nodes": st.sampled_from([None, None, 1, 3, 10, 50]),
    "max_depth": st.sampled_from([None, None, 2, 4, 8]),
    "tolerance": st.sampled_from([0.0, 0.0, 0.01, 0.3]),
    "batch": st.sampled_from([1, 2, 64]),
    "speculate": st.sampled_from([0, 1, 3]),
    "prior": st.sampled_from([0.0, 2.0, 8.0]),
    "constrained": st.booleans(),
    "stop_after": st.sampled_from([None, None, None, 1, 2, 4]),  # model calls before a deadline stops the run
})


def within(name: str, value: float, low: float, high: float) -> None:
    assert low - SLACK <= value <= high + SLACK, f"{name}: {value} outside [{low}, {high}]"


def check_interval(name: str, score, exact: tuple[float, float]) -> None:
    """The reported interval must contain the exact value (an interval itself for cut brute forces)."""
    assert score.lower <= score.p <= score.upper, f"{name}: p={score.p} outside its own bounds [{score.lower}, {score.upper}]"
    assert score.lower <= exact[1] + SLACK and score.upper >= exact[0] - SLACK, (
        f"{name}: bounds [{score.lower}, {score.upper}] miss the exact value {exact}"
    )


def run(seed: int, config: dict, methods: tuple[str, ...]) -> None:
    s = setup(seed)
    bf = brute(seed, config["constrained"])
    if s.certified:  # keep the search finite where the tree is astronomically large
        config = {**config, "eps": max(config["eps"], 1e-3), "max_nodes": min(config["max_nodes"] or 300, 300)}
    clf = s.classifier
    prompt = clf._prompt_from_ids(s.prompt)
    stop_after = config.pop("stop_after", None)
    results = _scored(clf, prompt, methods, s.groups or None, config, stop_after)
    stopped = not next(iter(results.values())).complete
    uncut = config["max_nodes"] is None and config["max_depth"] is None and config["tolerance"] == 0 and not stopped
    exhaustive = uncut and config["eps"] == 0 and config["top_p"] == 1.0
    exact = not s.certified
    ids = s.ids
    unsafe = bf.outcome(None)
    for method, scores in results.items():
        where = f"{method} ({s.describe()}; {config})"
        within(f"p_unsafe {where}", scores.p_unsafe, scores.p_unsafe_lower, scores.p_unsafe_upper)
        check_interval(f"P(unsafe) {where}", _Bound(scores.p_unsafe, scores.p_unsafe_lower, scores.p_unsafe_upper), unsafe)
        assert scores.p_unsafe_upper - scores.p_unsafe_lower <= scores.unexplored_mass + SLACK
        for c in scores.categories.values():
            assert 0 - SLACK <= c.lower <= c.upper <= 1 + SLACK, (where, c)
        if method == "marginal":
            for k in ids:
                c = scores.categories[k]
                check_interval(f"marginal {k} {where}", c, bf.outcome({k}))
                assert c.upper - c.lower <= scores.unexplored_mass + SLACK, (where, c, scores.unexplored_mass)
                if exhaustive and exact:
                    assert abs(c.p - bf.outcome({k})[0]) <= 1e-6 and c.upper - c.lower <= 1e-9, (where, c)
            for name, members in s.groups.items():
                check_interval(f"group {name} {where}", scores.groups[name], bf.outcome(set(members)))
                if exhaustive and exact:
                    assert abs(scores.groups[name].p - bf.outcome(set(members))[0]) <= 1e-6
            if exhaustive and exact:
                assert abs(scores.p_unsafe - unsafe[0]) <= 1e-6 and scores.unexplored_mass <= 1e-9
        elif method == "greedy":
            verdict = bf.greedy_verdict()
            named = set(verdict[1]) if verdict else set()
            if stopped:  # the greedy path may be unfinished: each category's bounds must hold the truth
                for k in ids:
                    truth = float(k in named)
                    check_interval(f"greedy {k} {where}", scores.categories[k], (truth, truth))
            else:
                assert {k for k, c in scores.categories.items() if c.p == 1.0} == named, where
        elif method == "first_token":
            first = bf.first_word()
            for k in ids:
                check_interval(f"first_token {where}", scores.categories[k], first)
                if uncut and exact:
                    assert abs(scores.categories[k].p - first[0]) <= 1e-6 and scores.categories[k].upper - scores.categories[k].lower <= 1e-9, where
        else:
            verdict = bf.greedy_verdict()
            slots = dict((k, j) for j, k in enumerate(verdict[1])) if verdict else {}
            for k in ids:
                c = scores.categories[k]
                if k not in slots:
                    if stopped:  # an unfinished greedy path leaves the verdict, so this 0, unknown
                        check_interval(f"{method} {k} {where}", c, (0.0, 0.0))
                    else:
                        assert c.p == c.lower == c.upper == 0.0, (where, k)
                    continue
                mass, low, high = bf.slot(slots[k], k)
                truth = (low / mass, high / mass) if method == "conditional" else (low, high)
                check_interval(f"{method} {k} {where}", c, truth)
                if uncut and exact:
                    assert abs(c.p - truth[0]) <= 1e-6 and c.upper - c.lower <= 1e-6, (where, c, truth)


def _scored(clf, prompt, methods, groups, config, stop_after):
    """Every method's Scores, the run stopped after ``stop_after`` model calls (a deadline) if given."""
    if stop_after is None:
        return clf.score_prompts([prompt], methods, groups=groups, **config)[0]
    run = clf.start([prompt], methods, groups=groups, **config)
    calls = 0
    while run.step():
        calls += 1
        if calls == stop_after:
            run.stop_all()
    run.close()
    return run.results()[0]


class _Bound:
    def __init__(self, p: float, lower: float, upper: float):
        self.p, self.lower, self.upper = p, lower, upper


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, POOL - 1), config=configurations, methods=st.sampled_from(METHOD_SETS))
def test_bounds_hold_against_brute_force(seed, config, methods):
    run(seed, config, methods)


@pytest.mark.parametrize("seed", range(POOL))
@pytest.mark.parametrize("constrained", [True, False])
def test_exhaustive_search_equals_brute_force(seed, constrained):
    config = dict(eps=0.0, top_p=1.0, max_nodes=None, max_depth=None, tolerance=0.0, batch=64, speculate=1,
                  prior=2.0, constrained=constrained)
    run(seed, config, METHODS)
