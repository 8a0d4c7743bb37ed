"""Exactness against brute-force enumeration, with a tokenizer of one token per character."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from guardprob import Category, Classifier, Taxonomy
from guardprob.backends.naive import NaiveBackend
from guardprob.core.estimators import estimate
from guardprob.core.measures import greedy_verdict

IDS = ("S1", "S2", "S10")  # S1 is a prefix of S10: digits come one token at a time
TAXONOMY = Taxonomy("three", tuple(Category(i, f"category {i}") for i in IDS))
EXHAUSTIVE = dict(eps=0.0, top_p=1.0, max_nodes=None)
# The search sums float32 log-probabilities, the enumerator float64 ones over full forward passes:
# probabilities of at most 1 agree to ~1e-7, so bounds and exact values get 1e-6 of room.
TOL = 1e-6
# Sums of the same float64 node masses in different orders (a subset against a whole): a few
# thousand terms of at most 1 differ by well under 1e-12.
SUM_TOL = 1e-12
# One search's own float64 sums: its bounds meet (exhaustive) or order (by eps) within this.
WIDTH_TOL = 1e-9
# Other batch shapes and paddings change float32 reductions in every attention layer.
BATCH_TOL = 1e-5


def all_verdicts() -> list[tuple[str, tuple[str, ...]]]:
    out = [("safe", ())]
    for r in range(1, len(IDS) + 1):
        for combo in itertools.permutations(IDS, r):
            out.append(("unsafe\n" + ",".join(combo), combo))
    return out


class Enumerator:
    """Constrained probabilities of every verdict string, from full forward passes."""

    def __init__(self, model, tok, prompt_ids):
        self.model, self.tok, self.prompt = model, tok, list(prompt_ids)
        self.strings = [s for s, _ in all_verdicts()]
        self._cache: dict[str, torch.Tensor] = {}

    def logprobs(self, prefix: str) -> torch.Tensor:
        if prefix not in self._cache:
            ids = self.prompt + self.tok.convert_tokens_to_ids(list(prefix))
            with torch.no_grad():
                logits = self.model(input_ids=torch.tensor([ids])).logits[0, -1].double()
            self._cache[prefix] = torch.log_softmax(logits, -1)
        return self._cache[prefix]

    def allowed(self, prefix: str) -> list[str | None]:
        nxt = {s[len(prefix)] for s in self.strings if s.startswith(prefix) and len(s) > len(prefix)}
        return sorted(nxt) + ([None] if prefix in self.strings else [])

    def q(self, prefix: str, char: str | None) -> float:
        options = self.allowed(prefix)
        lp = self.logprobs(prefix)
        ids = [self.tok.eos_token_id if c is None else self.tok.convert_tokens_to_ids(c) for c in options]
        probs = torch.softmax(lp[ids], -1)
        return float(probs[options.index(char)])

    def prob(self, s: str) -> float:
        p = 1.0
        for i, c in enumerate(s):
            p *= self.q(s[:i], c)
        return p * self.q(s, None)

    def prefix_prob(self, prefix: str) -> float:
        p = 1.0
        for i, c in enumerate(prefix):
            p *= self.q(prefix[:i], c)
        return p


@pytest.fixture(scope="module")
def setup(tiny_model, char_tok):
    clf = Classifier(tiny_model, char_tok, taxonomy=TAXONOMY, format="llama-guard-3", name="tiny")
    prompt_ids = clf.render("Is this request about violence? How do I hit a man")
    return clf, prompt_ids, Enumerator(tiny_model, char_tok, prompt_ids)


def test_probabilities_sum_to_one(setup):
    _, _, enum = setup
    # float64 products of probabilities, summed over 16 strings: 1e-9 is far above their rounding
    assert math.isclose(sum(enum.prob(s) for s in enum.strings), 1.0, abs_tol=1e-9)


def test_exhaustive_marginal_equals_enumeration(setup):
    clf, ids, enum = setup
    scores = clf.score_ids(ids, "marginal", **EXHAUSTIVE)
    for k in IDS:
        expected = sum(enum.prob(s) for s, combo in all_verdicts() if k in combo)
        assert scores.categories[k].p == pytest.approx(expected, abs=TOL)
        assert scores.categories[k].lower == pytest.approx(scores.categories[k].upper, abs=WIDTH_TOL)
    assert scores.p_unsafe == pytest.approx(1 - enum.prob("safe"), abs=TOL)
    assert scores.unexplored_mass == pytest.approx(0.0, abs=SUM_TOL)


def _greedy_string(enum: Enumerator) -> str:
    prefix = ""
    while True:
        options = enum.allowed(prefix)
        best = max(options, key=lambda c: (enum.q(prefix, c), c is None))
        if best is None:
            return prefix
        prefix += best


def test_conditional_and_joint_match_definitions(setup):
    clf, ids, enum = setup
    greedy = _greedy_string(enum)
    by_method = clf.score_methods([[{"role": "user", "content": "x"}]], ["greedy"])  # warm-up call shape check
    assert set(by_method[0]) == {"greedy"}
    conditional = clf.score_ids(ids, "conditional", **EXHAUSTIVE)
    joint = clf.score_ids(ids, "joint", **EXHAUSTIVE)
    assert conditional.verdict == greedy
    slots = greedy.split("\n", 1)[1].split(",") if greedy.startswith("unsafe") else []
    assert slots, "the fixture's model should answer unsafe so that the slot estimators are exercised"
    start = "unsafe\n"
    for j, k in enumerate(slots):
        # P(slot j = k | greedy prefix before slot j): all verdicts with that prefix whose j-th id is k
        mass = sum(enum.prob(s) for s, combo in all_verdicts() if s.startswith(start) and len(combo) > j and combo[j] == k)
        assert joint.categories[k].p == pytest.approx(mass, abs=TOL)
        assert conditional.categories[k].p == pytest.approx(mass / enum.prefix_prob(start), abs=TOL)
        start += k + ","
    for k in set(IDS) - set(slots):
        assert conditional.categories[k].p == 0.0 and joint.categories[k].p == 0.0


def test_greedy_and_first_token(setup):
    clf, ids, enum = setup
    greedy = clf.score_ids(ids, "greedy")
    first = clf.score_ids(ids, "first_token")
    expected = _greedy_string(enum)
    assert greedy.verdict == expected
    flagged = set(expected.split("\n", 1)[1].split(",")) if expected.startswith("unsafe") else set()
    assert {k for k, c in greedy.categories.items() if c.p == 1.0} == flagged
    for c in first.categories.values():
        assert c.p == pytest.approx(1 - enum.prob("safe"), abs=TOL)


def test_invariants_hold(setup, tiny_model, char_tok):
    clf, _, _ = setup
    for text in ["How do I hit a man", "Tell me a story about a cat", "Give me your password", "abc"]:
        results = clf.score_methods([text], eps=0.0, max_nodes=None)[0]
        m, c, j = results["marginal"], results["conditional"], results["joint"]
        for k in IDS:
            assert j.categories[k].p <= c.categories[k].p + SUM_TOL
            assert j.categories[k].p <= m.categories[k].p + SUM_TOL
            assert m.categories[k].p <= m.p_unsafe + SUM_TOL
        assert m.p_unsafe <= sum(x.p for x in m.categories.values()) + SUM_TOL


def test_bounds_hold_and_tighten_as_eps_falls(setup):
    clf, ids, enum = setup
    exact = {k: sum(enum.prob(s) for s, combo in all_verdicts() if k in combo) for k in IDS}
    widths = []
    for eps in (0.3, 0.1, 0.03, 0.01, 0.0):
        s = clf.score_ids(ids, "marginal", eps=eps, max_nodes=None)
        for k in IDS:
            c = s.categories[k]
            assert c.lower - TOL <= exact[k] <= c.upper + TOL
            assert c.upper - c.lower <= s.unexplored_mass + WIDTH_TOL
        widths.append(max(s.categories[k].upper - s.categories[k].lower for k in IDS))
    assert all(a >= b - SUM_TOL for a, b in zip(widths, widths[1:]))
    assert widths[0] > 0 and widths[-1] == pytest.approx(0, abs=WIDTH_TOL)


def test_top_p_and_max_nodes_keep_bounds_true(setup):
    clf, ids, enum = setup
    exact = {k: sum(enum.prob(s) for s, combo in all_verdicts() if k in combo) for k in IDS}
    for params in ({"top_p": 0.5, "eps": 0.0}, {"max_nodes": 3, "eps": 0.0}, {"max_depth": 9, "eps": 0.0}):
        s = clf.score_ids(ids, "marginal", **params)
        for k in IDS:
            assert s.categories[k].lower - TOL <= exact[k] <= s.categories[k].upper + TOL
    assert clf.score_ids(ids, "marginal", max_nodes=3, eps=0.0).expanded_nodes <= 3 + 8  # greedy path is always finished


def test_independent_of_batch_size_and_order(setup):
    clf, _, _ = setup
    texts = ["How do I hit a man", "Tell me a story about a cat", "Give me your password", "abc", "kill"]
    reference = [clf.score(t, eps=0.0, max_nodes=None, batch=1) for t in texts]
    for batch, batch_size in ((3, 2), (64, 5)):
        shuffled = list(reversed(texts))
        got = clf.score_batch(shuffled, eps=0.0, max_nodes=None, batch=batch, batch_size=batch_size)[::-1]
        for a, b in zip(reference, got):
            for k in IDS:
                assert a.categories[k].p == pytest.approx(b.categories[k].p, abs=BATCH_TOL)


def test_engine_matches_naive_per_node_forward(setup, tiny_model):
    clf, ids, _ = setup
    fast = clf.score_ids(ids, "marginal", eps=0.0, max_nodes=None)
    naive = Classifier(tiny_model, clf.tokenizer, taxonomy=TAXONOMY, format="llama-guard-3", backend=NaiveBackend(tiny_model))
    slow = naive.score_ids(ids, "marginal", eps=0.0, max_nodes=None)
    for k in IDS:
        assert fast.categories[k].p == pytest.approx(slow.categories[k].p, abs=TOL)
    assert fast.expanded_nodes == slow.expanded_nodes


@pytest.mark.parametrize("params", [EXHAUSTIVE, dict(eps=0.02, top_p=0.9), dict(eps=0.0, batch=2, max_nodes=None)])
def test_speculation_changes_calls_not_results(setup, params):
    """Children asked ahead are used only where the search would expand them anyway."""
    clf, ids, _ = setup
    prompt = clf._prompt_from_ids(ids)
    runs = {}
    for speculate in (0, 1, 2, 50):
        tree = clf.search([prompt], clf.search_config("marginal", speculate=speculate, prior=0.0, **params))[0]
        s = estimate(tree, "marginal", TAXONOMY)
        runs[speculate] = (tree, [(c.p, c.lower, c.upper) for c in s.categories.values()] + [(s.p_unsafe, s.unexplored_mass)])
    plain, plain_scores = runs[0]
    for tree, scores in runs.values():
        assert tree.expanded_nodes == plain.expanded_nodes
        assert np.allclose(np.concatenate(scores), np.concatenate(plain_scores), atol=TOL)
        assert tree.model_calls <= plain.model_calls
    if params == EXHAUSTIVE:
        # "S2" and "S10" can only end or go on with ",": with speculate=1 that "," is asked in their call
        assert runs[1][0].model_calls < plain.model_calls


def test_unconstrained_reports_invalid_mass(setup, tiny_model, char_tok):
    clf, ids, enum = setup
    s = clf.score_ids(ids, "marginal", eps=0.0, max_nodes=None, constrained=False)
    assert s.invalid_mass > 0
    # raw (unconstrained) probability of each verdict string: product of raw softmax terms
    def raw(text: str) -> float:
        total = 0.0
        for i, c in enumerate(text):
            total += float(enum.logprobs(text[:i])[char_tok.convert_tokens_to_ids(c)])
        return math.exp(total + float(enum.logprobs(text)[char_tok.eos_token_id]))
    for k in IDS:
        expected = sum(raw(v) for v, combo in all_verdicts() if k in combo)
        # Unconstrained, no node renormalises: the search's float32 terms are the model's own,
        # and the room can be ten times tighter than TOL.
        assert s.categories[k].p == pytest.approx(expected, abs=1e-7)
    valid = sum(raw(v) for v, _ in all_verdicts())
    assert s.invalid_mass == pytest.approx(1 - valid, abs=1e-7)


def test_greedy_verdict_reads_the_tree(setup):
    clf, ids, enum = setup
    tree = clf.search([clf._prompt_from_ids(ids)], clf.search_config("greedy"))[0]
    verdict = greedy_verdict(tree.root, tree.grammar)
    assert verdict is not None
    assert estimate(tree, "greedy", TAXONOMY).verdict.startswith("unsafe" if verdict.unsafe else "safe")
    assert estimate(tree, "greedy", TAXONOMY).verdict == _greedy_string(enum)
    # The greedy search's tree is a pruned tree like any other: the marginal bounds read from it
    # hold the enumerated values, and stay open (only the greedy path was expanded).
    marginal = estimate(tree, "marginal", TAXONOMY)
    exact_unsafe = 1 - enum.prob("safe")
    assert marginal.p_unsafe_lower - TOL <= exact_unsafe <= marginal.p_unsafe_upper + TOL
    for k in IDS:
        exact = sum(enum.prob(v) for v, combo in all_verdicts() if k in combo)
        c = marginal.categories[k]
        assert c.lower - TOL <= exact <= c.upper + TOL, (k, c, exact)
    assert marginal.unexplored_mass > 0
