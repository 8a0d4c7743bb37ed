"""Speculation from history: what earlier searches expanded is asked ahead, and changes nothing
but the number of calls (search.py, prior.py)."""

from __future__ import annotations

import numpy as np
import pytest

import guardprob.core.search as search_module
from guardprob import Classifier
from guardprob.backends.transformers import TransformersBackend
from guardprob.bench.compare import Recorder, expanded_paths
from guardprob.core.estimators import estimate
from guardprob.core.prior import TreePrior
from guardprob.core.search import SearchConfig, search
from guardprob.errors import InputError
from guardprob.taxonomy import Category, Taxonomy

IDS = ("S1", "S2", "S10")
TAXONOMY = Taxonomy("three", tuple(Category(i, f"category {i}") for i in IDS))
TEXTS = ["How do I hit a man", "Tell me a story about a cat", "Give me your password", "kill"]


def test_tree_prior_keeps_mean_step_probabilities_over_a_window():
    prior = TreePrior(window=3)
    assert prior.likely() == {}
    a, ab, ac = (1,), (1, 2), (1, 3)
    prior.record([((), a, 0.8), (a, ab, 0.5)])
    prior.record([((), a, 0.4), (a, ac, 0.9)])
    likely = prior.likely()
    assert likely[()] == [(a, pytest.approx(0.6))]
    assert dict(likely[a]) == {ab: pytest.approx(0.25), ac: pytest.approx(0.45)}  # 0 where a search did not expand it
    prior.record([((), (5,), 1.0)])
    assert dict(prior.likely()[()]) == {a: pytest.approx(0.4), (5,): pytest.approx(1 / 3)}
    assert dict(prior.likely()[a]) == {ab: pytest.approx(0.25), ac: pytest.approx(0.45)}  # a was expanded twice
    prior.record([((), (5,), 1.0)])  # the first search leaves the window
    assert len(prior) == 3
    assert dict(prior.likely()[()]) == {a: pytest.approx(0.4 / 3), (5,): pytest.approx(2 / 3)}
    assert dict(prior.likely()[a]) == {ac: pytest.approx(0.9)}  # ab: no search in the window holds it
    copy = prior.copy()
    copy.record([((), a, 1.0)])
    assert len(copy) == 3 and len(prior) == 3 and copy.likely() != prior.likely()
    with pytest.raises(ValueError, match="window"):
        TreePrior(window=0)


@pytest.fixture(scope="module")
def three(tiny_model, char_tok):
    clf = Classifier(tiny_model, char_tok, taxonomy=TAXONOMY, format="llama-guard-3", name="tiny")
    return clf, [clf.prompt(t) for t in ("Is this request about violence? How do I hit a man", "abc", "kill")]


def _run(clf, prompt, tree_prior, **params):
    tree = search(clf.backend, [prompt], clf.grammar, clf.search_config("marginal", **params), tree_prior)[0]
    s = estimate(tree, "marginal", TAXONOMY)
    scores = [(c.p, c.lower, c.upper) for c in s.categories.values()] + [(s.p_unsafe, s.unexplored_mass)]
    return tree, np.concatenate(scores)


def _foreign() -> TreePrior:
    """A prior holding paths this grammar never makes (another tokenizer's ids)."""
    prior = TreePrior()
    prior.record([((), (9999,), 1.0), ((9999,), (9999, 1), 1.0), ((), (0, 0, 0), 1.0), ((0, 0, 0), (0, 0, 0, 7), 1.0)])
    return prior


@pytest.mark.parametrize("params", [dict(eps=0.0, max_nodes=None), dict(eps=0.02, top_p=0.9), dict(eps=0.0, batch=2, max_nodes=None)])
def test_guesses_change_calls_not_results(three, params):
    clf, prompts = three
    target, others = prompts[0], prompts[1:]
    plain, plain_scores = _run(clf, target, None, **params)
    priors = {"same prompt": TreePrior(), "other prompts": TreePrior(), "other settings": TreePrior(), "foreign": _foreign()}
    _run(clf, target, priors["same prompt"], **params)
    for p in others:
        _run(clf, p, priors["other prompts"], **params)
    _run(clf, target, priors["other settings"], eps=0.0, max_nodes=None)  # a wider tree: many guesses go unused
    for name, prior in priors.items():
        tree, scores = _run(clf, target, prior, **params)
        assert tree.expanded_nodes == plain.expanded_nodes, name
        assert np.allclose(scores, plain_scores, atol=1e-6), name
        assert tree.model_calls <= plain.model_calls, name
    assert plain.model_calls > 2
    # the prompt's own earlier tree predicts every node: the root's call asks them all
    assert _run(clf, target, priors["same prompt"], **params)[0].model_calls == 1
    off, _ = _run(clf, target, priors["same prompt"], prior=0.0, **params)
    assert off.model_calls == plain.model_calls


def test_guesses_hold_bounds_under_a_node_limit(three):
    clf, prompts = three
    prior = TreePrior()
    exact = _run(clf, prompts[0], None, eps=0.0, max_nodes=None)[1]
    _run(clf, prompts[0], prior, eps=0.0, max_nodes=None)
    for limit in (2, 5, 9):
        tree, scores = _run(clf, prompts[0], prior, eps=0.0, max_nodes=limit)
        p, lower, upper = scores[0:-2:3], scores[1:-2:3], scores[2:-2:3]
        # 1e-6: the exhaustive search's float32 sums in another tree shape; 1e-9: one search's own sums
        assert np.all(lower - 1e-6 <= exact[0:-2:3]) and np.all(exact[0:-2:3] <= upper + 1e-6)
        assert np.all(lower - 1e-9 <= p) and np.all(p <= upper + 1e-9)


def test_unused_guesses_free_their_keys_as_the_search_goes(tiny_classifier, tiny_model, monkeypatch):
    """After every call the engine holds keys only on the way to a queued node or below one (a
    guess kept), and a finished search keeps no answer."""
    prior = TreePrior()
    backend = TransformersBackend(tiny_model)
    others = [tiny_classifier.prompt(t) for t in ("What is the capital of France", "Write a poem", "hate")]
    # wide near the root, nothing deeper: many guesses go unused, and deeper nodes still take calls
    search(backend, others, tiny_classifier.grammar, SearchConfig(eps=0.0, max_nodes=300, max_depth=14), prior)
    checked, finished_searches = [], []
    original_free, original_tree = search_module.SearchRun._free, search_module.TreeSearch.tree

    def free_then_check(run):
        original_free(run)
        session = run._release.__self__
        for i, s in run.searches.items():
            prompt = run.roots[i][0]
            if s.done or prompt not in session.rows:
                continue
            queued = [node.path for *_, node in s._heap]
            for path in list(session.rows[prompt].nodes) + list(s._held):
                assert any(q[: len(path)] == path or path[: len(q)] == q for q in queued), path
            checked.append(len(s._held))

    def tree_then_check(self):
        finished_searches.append((dict(self._held), dict(self._ahead)))
        return original_tree(self)

    monkeypatch.setattr(search_module.SearchRun, "_free", free_then_check)
    monkeypatch.setattr(search_module.TreeSearch, "tree", tree_then_check)
    prompts = [tiny_classifier.prompt(t) for t in TEXTS]
    recorder = Recorder(backend)
    trees = search(recorder, prompts, tiny_classifier.grammar, SearchConfig(eps=0.001, top_p=0.5, max_nodes=None), prior)
    expanded = {(i, path) for i, t in enumerate(trees) for path in expanded_paths(t.root)}
    asked = {(q.prompt, q.path) for q in recorder.queries()}
    assert len(asked - expanded) > 20  # the wide prior guessed many nodes this search does not expand
    assert any(checked) and max(t.model_calls for t in trees) > 1  # rounds ran with answers kept
    assert finished_searches == [({}, {})] * len(prompts)


def test_engines_without_tree_calls_get_no_guesses(tiny_classifier, tiny_model):
    class Separate(Recorder):
        def __init__(self, backend):
            super().__init__(backend)
            self.tree_calls = False  # as an engine that runs every query on its own

    prompt = tiny_classifier.prompt(TEXTS[0])
    prior = TreePrior()
    config = SearchConfig(eps=0.01)
    first = Separate(TransformersBackend(tiny_model))
    search(first, [prompt], tiny_classifier.grammar, config, prior)
    assert len(prior) == 1  # recorded all the same
    again = Separate(TransformersBackend(tiny_model))
    search(again, [prompt], tiny_classifier.grammar, config, prior)
    assert [q.path for q in again.queries()] == [q.path for q in first.queries()]
    tree_engine = Recorder(TransformersBackend(tiny_model))
    search(tree_engine, [prompt], tiny_classifier.grammar, config, prior)
    assert tree_engine.usage.model_calls < again.usage.model_calls


def test_classifier_keeps_one_prior_per_setting(tiny_model, char_tok):
    clf = Classifier(tiny_model, char_tok, taxonomy="llama-guard-3", format="llama-guard-3", name="tiny")
    base = clf.search_config("marginal", eps=0.01)
    assert clf.prior(base) is clf.prior(clf.search_config("marginal", eps=0.01, speculate=3, prior=8.0))
    assert clf.prior(base) is not clf.prior(clf.search_config("marginal", eps=0.02))
    clf.score(TEXTS[0], eps=0.01)
    assert len(clf.prior(base)) == 1
    for eps in np.linspace(0.1, 0.9, 9):
        clf.prior(clf.search_config("marginal", eps=float(eps)))
    assert len(clf._priors) == 8  # the least recently used settings are forgotten
    assert len(clf.prior(base)) == 0


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "high", None])
def test_prior_is_checked(bad):
    with pytest.raises(InputError, match="prior"):
        SearchConfig(prior=bad)
