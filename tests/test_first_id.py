"""The prefill baselines read the estimators' search tree (SearchConfig.first_id).

The first-id distribution read from the tree is checked against a brute force on strings (the
oracle's verdict language, one full forward pass per prefix) over random tiny models and
tokenizers, in both modes, for models that say unsafe and models trained to say safe; against
the walker the baselines ran before (its own session) on the tiny model and on every format
with one unsafe list; an evaluation batch opens one engine session; and the walk changes no
estimator's scores (exhaustive: equal; pruned: the bounds hold against the brute force).
CI runs 30 random configurations, ``scripts/deep_check.sh`` 500.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardprob import InputError
from guardprob.core.estimators import METHODS
from guardprob.core.search import SearchConfig
from guardprob.evaluation import score_example_batch
from guardprob.evaluation.baselines import FIRST_ID_EPS, first_id
from guardprob.evaluation.datasets import read_dataset
from helpers import LABELLED_ROWS, budget, tiny_llama
from oracle import (
    HEAD,
    METHOD_SETS,
    Setup,
    check_against_brute_force,
    complete,
    configurations,
    is_prefix,
    parts_of,
    setup,
    train,
)
from prefill_walker import walk_first_ids

EXAMPLES = budget(30, 500)
POOL = 14  # oracle set-ups: every style twice
TOL = 2e-6  # float32 tree attention against float32 full forwards


# -- the brute force on strings ------------------------------------------------------------------
@functools.cache
def safe_setup(seed: int) -> Setup:
    """The oracle's set-up ``seed`` with a model trained to answer ``safe``."""
    s = setup(seed)
    model = tiny_llama(len(s.vocab), seed=seed)
    train(model, random.Random(seed), s.prompt, s.ids, s.vocab, favour="safe")
    return dataclasses.replace(s, model=model, trained=True)


def chosen(seed: int, safe: bool) -> Setup:
    return safe_setup(seed) if safe else setup(seed)


class Strings:
    """The verdict language on strings, with the model's log-probabilities at any prefix."""

    def __init__(self, s: Setup):
        self.s = s
        self.texts = s.texts
        self.eos = s.vocab["<eos>"]
        self._lp: dict[tuple[int, ...], torch.Tensor] = {}

    def allowed(self, text: str) -> list[int]:
        tokens = sorted(t for t, piece in self.texts.items() if is_prefix(text + piece, self.s.ids))
        return tokens + ([self.eos] if complete(text, self.s.ids) else [])

    def logits(self, path: tuple[int, ...]) -> torch.Tensor:
        if path not in self._lp:
            with torch.no_grad():
                self._lp[path] = self.s.model(input_ids=torch.tensor([self.s.prompt + list(path)])).logits[0, -1].double()
        return self._lp[path]


@functools.cache
def strings(seed: int, safe: bool) -> Strings:
    """One per set-up, so that every eps and mode reads the same cached forward passes."""
    return Strings(chosen(seed, safe))


@functools.cache
def brute_first_id(seed: int, safe: bool, eps: float, constrained: bool) -> tuple[dict[str, float], float]:
    """(P(first id = k | prefix), LogTokU's epistemic uncertainty) from the definition:
    the prefill path takes the most probable allowed token whose text keeps to ``unsafe\\n`` +
    the ids' common prefix; below it every node renormalises over the grammar's candidates, an
    id counts once a comma or the end closes it, and open nodes below ``eps`` are left out. The
    logits are the grammar tokens' at the prefix node, or, under constraint where the grammar
    forces one token there, at the node after the forced tokens (which needs no model call)."""
    s = chosen(seed, safe)
    lang = strings(seed, safe)
    target = HEAD + os.path.commonprefix(list(s.ids))
    path, text = (), ""
    while text != target:
        lp = lang.logits(path)
        ok = [t for t in lang.allowed(text) if t != lang.eos and target.startswith(text + lang.texts[t])]
        best = max(ok, key=lambda t: float(lp[t]))
        path, text = path + (best,), text + lang.texts[best]
    epistemic = _epistemic(lang, path, text, constrained)
    probs = dict.fromkeys(s.ids, 0.0)
    stack = [(path, text, 1.0)]
    while stack:
        path, text, mass = stack.pop()
        allowed = lang.allowed(text)
        if not allowed:
            continue  # a dead end: its mass counts nowhere
        q = torch.softmax(torch.log_softmax(lang.logits(path), -1)[allowed], -1).tolist()
        for token, p in zip(allowed, q):
            m = mass * p
            if token == lang.eos:
                probs[complete(text, s.ids)[1][0]] += m
                continue
            after = text + lang.texts[token]
            parts = parts_of(after)
            if len(parts) > 1:
                probs[parts[0]] += m
            elif m >= eps:
                stack.append((path + (token,), after, m))
    total = sum(probs.values())
    return {k: v / total for k, v in probs.items()}, epistemic


def _epistemic(lang: Strings, path: tuple[int, ...], text: str, constrained: bool) -> float:
    """LogTokU's epistemic part K / (sum of max(logit, 0) + K) over the K <= 2 largest
    grammar-token logits at the prefix node (NaN: none asked)."""
    while constrained:
        allowed = lang.allowed(text)
        if len(allowed) == 1 and allowed[0] != lang.eos:
            path, text = path + (allowed[0],), text + lang.texts[allowed[0]]
            continue
        if len(allowed) <= 1:
            return math.nan  # the node only ends (or is a dead end): nothing asked there
        break
    tokens = [t for t in lang.allowed(text) if t != lang.eos]
    if not tokens:
        return math.nan
    top = sorted(lang.logits(path)[tokens].tolist(), reverse=True)[:2]
    return len(top) / (sum(max(x, 0.0) for x in top) + len(top))


def _tree(s: Setup, methods, config: dict, eps: float):
    clf = s.classifier
    run = clf.start([clf._prompt_from_ids(s.prompt)], methods, first_id=eps, **config).finish()
    ((_, _, tree),) = run.trees()
    return run, tree


def check_first_id(seed: int, safe: bool, eps: float, methods, config: dict) -> None:
    s = chosen(seed, safe)
    if s.certified:  # 30 ids: keep the search itself finite (the walk is not cut by max_nodes)
        config = {**config, "max_nodes": min(config["max_nodes"] or 300, 300)}
    run, tree = _tree(s, methods, config, eps)
    read = first_id(tree, s.ids)
    expected, epistemic = brute_first_id(seed, safe, eps, config["constrained"])
    where = f"{s.describe()} safe={safe} eps={eps} {methods} {config}"
    for k in s.ids:
        assert abs(read.probabilities[k] - expected[k]) <= 1e-5, (where, k, read.probabilities, expected)
    if math.isnan(epistemic):
        assert math.isnan(read.logtoku), where
    else:
        assert abs(read.logtoku - epistemic) <= 1e-5, (where, read.logtoku, epistemic)


search_settings = st.fixed_dictionaries({
    "eps": st.sampled_from([1e-3, 0.05, 0.3, 1.0]),
    "top_p": st.sampled_from([1.0, 0.5]),
    "max_nodes": st.sampled_from([None, 1, 5]),
    "max_depth": st.sampled_from([None, 2]),
    "tolerance": st.sampled_from([0.0, 0.3]),
    "batch": st.sampled_from([1, 64]),
    "speculate": st.sampled_from([0, 1]),
    "prior": st.sampled_from([0.0, 2.0]),
    "constrained": st.booleans(),
})


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, POOL - 1), safe=st.booleans(), eps=st.sampled_from([FIRST_ID_EPS, 0.0, 0.01, 0.2]),
       methods=st.sampled_from(METHOD_SETS), config=search_settings)
def test_first_id_read_from_the_tree_equals_the_brute_force(seed, safe, eps, methods, config):
    """Whatever the search's own eps, nucleus and limits say, the walk is whole."""
    check_first_id(seed, safe, eps, methods, config)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("constrained", [True, False])
def test_prefill_path_is_taken_when_the_model_says_safe(seed, constrained):
    s = safe_setup(seed)
    config = dict(eps=1.0, constrained=constrained)  # the greedy path alone, and the walk
    run, _ = _tree(s, ("greedy",), config, FIRST_ID_EPS)
    scores = run.results()[0]["greedy"]
    assert not scores.verdict_unsafe and scores.p_unsafe < 0.5  # the case: the model does not write "unsafe"
    check_first_id(seed, True, FIRST_ID_EPS, ("greedy",), config)


# -- against the walker the baselines ran before ----------------------------------------------------
def test_eval_batch_opens_one_session_and_records_what_the_old_walker_did(tiny_classifier, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(__import__("json").dumps(r) + "\n" for r in LABELLED_ROWS), encoding="utf-8")
    examples = read_dataset(path).examples[:6]
    backend = tiny_classifier.backend
    opened = []
    original = backend.begin  # the classifier opens sessions that prefill in steps

    def counting(prompts):
        opened.append(len(prompts))
        return original(prompts)

    backend.begin = counting
    try:
        records = score_example_batch(tiny_classifier, examples, ("marginal", "prefill", "logtoku"), {"max_nodes": 40})
    finally:
        del backend.begin
    assert opened == [len(examples)]  # one session: the estimators' search; no second prefill
    prompts = [tiny_classifier.prompt([dict(m) for m in e.messages]) for e in examples]
    for record, old in zip(records, walk_first_ids(tiny_classifier, prompts)):
        new = record["first_id"]
        assert new["p"] == pytest.approx(old.probabilities, abs=1e-5)
        for key in ("entropy", "max_prob", "logtoku", "logtoku_aleatoric"):
            assert new[key] == pytest.approx(old.as_dict()[key], abs=1e-5), key


@pytest.mark.parametrize("name", ["llama-guard-3", "nemoguard", "declarative-json"])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("constrained", [True, False])
def test_every_list_format_reads_what_the_old_walker_did(name, seed, constrained):
    from format_oracle import setup as format_setup

    s = format_setup(name, "user", seed)
    clf = s.classifier
    prompt = clf._prompt_from_ids(s.prompt)
    run = clf.start([prompt], ("first_token",), first_id=FIRST_ID_EPS, constrained=constrained).finish()
    ((_, _, tree),) = run.trees()
    new = first_id(tree, clf.taxonomy.ids)
    (old,) = walk_first_ids(clf, [prompt])
    assert new.probabilities == pytest.approx(old.probabilities, abs=1e-5)
    assert math.isnan(new.logtoku) == math.isnan(old.logtoku)
    if not math.isnan(old.logtoku):
        assert new.logtoku == pytest.approx(old.logtoku, abs=1e-5)


@pytest.mark.parametrize("name", ["shieldgemma", "granite-guardian-3.2", "wildguard", "qwen3guard", "declarative-comma"])
def test_formats_without_one_unsafe_list_refuse_the_baselines_before_searching(name, tmp_path):
    """Per-category formats and formats without one unsafe list; and formats where no prefix
    leads to the list alone (Qwen3Guard's ``Categories: None``; a list that comes first)."""
    from format_oracle import setup as format_setup

    clf = format_setup(name, "user", 0).classifier
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "hi", "labels": []}\n', encoding="utf-8")
    examples = read_dataset(path).examples
    opened = []
    original = clf.backend.open
    clf.backend.open = lambda prompts: opened.append(1) or original(prompts)
    try:
        with pytest.raises(InputError, match="compare with the estimators only"):
            score_example_batch(clf, examples, ("marginal", "prefill"), {})
    finally:
        del clf.backend.open
    assert not opened


def test_a_tree_searched_without_the_walk_is_refused(tiny_classifier):
    (tree,) = tiny_classifier.search([tiny_classifier.prompt("hi")], SearchConfig(eps=1.0))
    with pytest.raises(InputError, match="first_id"):
        first_id(tree, tiny_classifier.taxonomy.ids)


def test_first_id_setting_is_checked():
    for bad in (-0.1, 1.5, "x", True):
        with pytest.raises(InputError, match="first_id"):
            SearchConfig(first_id=bad)


# -- the walk changes no estimator ----------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 3, 5])
@pytest.mark.parametrize("constrained", [True, False])
def test_walk_leaves_exhaustive_scores_unchanged(seed, constrained):
    s = setup(seed)
    clf = s.classifier
    prompt = clf._prompt_from_ids(s.prompt)
    config = dict(eps=0.0, top_p=1.0, max_nodes=None, constrained=constrained, prior=0.0)
    plain = clf.score_prompts([prompt], METHODS, **config)[0]
    walked = clf.score_prompts([prompt], METHODS, first_id=FIRST_ID_EPS, **config)[0]
    for method in METHODS:
        a, b = plain[method], walked[method]
        assert a.expanded_nodes == b.expanded_nodes, method
        assert b.p_unsafe == pytest.approx(a.p_unsafe, abs=1e-6) and b.verdict == a.verdict, method
        for k in s.ids:
            for attr in ("p", "lower", "upper"):
                x, y = getattr(a.categories[k], attr), getattr(b.categories[k], attr)
                assert y == pytest.approx(x, abs=1e-6), (method, k, attr)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, POOL - 1), config=configurations, methods=st.sampled_from(METHOD_SETS),
       eps=st.sampled_from([FIRST_ID_EPS, 0.0, 0.05]))
def test_bounds_hold_with_the_walk(seed, config, methods, eps):
    check_against_brute_force(seed, {**config, "first_id": eps}, methods)
