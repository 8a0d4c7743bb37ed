"""One test per way the bounds used to fail; each failed on the code before the grammar-derived rule."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest

from guardprob import Category, Classifier, GuardprobWarning, Taxonomy
from guardprob.backends.base import NextToken
from guardprob.backends.naive import NaiveBackend
from guardprob.core.estimators import METHODS
from helpers import tiny_llama
from oracle import BruteForce, Setup, tokenizer_for, train

LG3 = tuple(f"S{i}" for i in range(1, 15))


def _setup(ids, pieces, seed=0, favour=None, steps=25, prompt="hi"):
    vocab = {"<unk>": 0, "<eos>": 1, "<bos>": 2}
    for piece in sorted(set("".join(ids) + "safeun\n,hi?a") | set(pieces), key=lambda p: (len(p), p)):
        vocab.setdefault(piece, len(vocab))
    model = tiny_llama(len(vocab), seed=seed)
    prompt_ids = [vocab[c] for c in prompt]
    if favour is not None:
        train(model, random.Random(seed), prompt_ids, ids, vocab, steps=steps, favour=favour)
    return Setup(seed, tuple(ids), vocab, tokenizer_for(vocab), model, prompt_ids, favour is not None, False)


def test_open_unsafe_heads_count_toward_every_upper_bound():
    """A benign prompt (P(unsafe) < eps) with a tokenizer that writes un + safe: the 'un' node is
    pruned at its head, and every category it may still name must keep its mass in the upper bound."""
    s = _setup(LG3[:4], ["un", "safe", "unsafe"], favour="safe", steps=40)
    bf = BruteForce(s, constrained=True)
    assert 0 < bf.outcome(None)[0] < 1e-3  # benign: below the default eps
    scores = s.classifier.score_ids(s.prompt)  # the default settings
    assert sum(c.upper for c in scores.categories.values()) >= scores.p_unsafe
    # The search sums float32 log-probabilities and the brute force float64 ones: equal up to
    # ~1e-7 relative, so each side gets that much room (an absolute 1e-9 is not enough at 2e-4).
    tol = 1e-6 * bf.outcome(None)[0] + 1e-12
    assert scores.p_unsafe_lower - tol <= bf.outcome(None)[0] <= scores.p_unsafe_upper + tol
    for k in s.ids:
        exact = bf.outcome({k})[0]
        assert exact > 0
        assert scores.categories[k].lower - 1e-6 * exact <= exact <= scores.categories[k].upper + 1e-6 * exact


@pytest.fixture(scope="module")
def six(char_tok):
    """Seven ids spelled one character a token: a tree of thousands of model-evaluated nodes."""
    taxonomy = Taxonomy("seven", tuple(Category(f"S{i}", f"c{i}") for i in range(1, 8)))
    return Classifier(tiny_llama(len(char_tok), seed=3), char_tok, taxonomy=taxonomy, format="llama-guard-3", name="six")


def test_max_nodes_none_means_no_limit(six):
    ids = six.render("hello")
    scores = six.score_ids(ids, eps=0.0, top_p=1.0, max_nodes=None, batch=256)
    assert scores.expanded_nodes > 2048  # the old default limit
    assert scores.unexplored_mass == pytest.approx(0.0, abs=1e-12)
    for c in scores.categories.values():
        assert c.upper - c.lower == pytest.approx(0.0, abs=1e-9)
    assert six.search_config(max_nodes=None).max_nodes is None


def test_cli_max_nodes_none_reaches_the_search():
    from guardprob.cli import build_parser
    from guardprob.commands.options import search_params

    parser = build_parser()
    assert search_params(parser.parse_args(["score", "x", "--max-nodes", "none"])) == {"max_nodes": None}
    assert search_params(parser.parse_args(["score", "x", "--max-depth", "none", "--max-nodes", "7"])) == {
        "max_depth": None, "max_nodes": 7}
    assert "max_nodes" not in search_params(parser.parse_args(["score", "x"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["score", "x", "--max-nodes", "0"])


@pytest.mark.parametrize("constrained", [True, False])
def test_greedy_path_estimators_are_exact_with_many_spellings(constrained):
    """Two spellings of every id ('S1' and 'S'+'1') and unconstrained mass: the greedy path alone
    does not decide them; the search expands what their definitions need."""
    s = _setup(("S1", "S2", "S10"), ["S1", "S2", "S10", "S", "un", "unsafe", "safe", ",S"], seed=5, favour="unsafe\nS1,S10")
    bf = BruteForce(s, constrained)
    results = s.classifier.score_prompts([s.classifier._prompt_from_ids(s.prompt)], METHODS, constrained=constrained)[0]
    verdict = bf.greedy_verdict()
    assert verdict is not None and verdict[0], "the model was trained to answer unsafe"
    first = bf.first_word()[0]
    for k in s.ids:
        assert results["first_token"].categories[k].p == pytest.approx(first, abs=1e-6)
    for j, k in enumerate(verdict[1]):
        mass, low, high = bf.slot(j, k)
        assert low == high
        assert results["joint"].categories[k].p == pytest.approx(low, abs=1e-6)
        assert results["conditional"].categories[k].p == pytest.approx(low / mass, abs=1e-6)
        # 1e-6 above: float32 tree attention against the brute force's float64 sums; 1e-9: the
        # search's own bounds, which meet on an exhaustive search up to float64 rounding
        assert results["conditional"].categories[k].upper - results["conditional"].categories[k].lower < 1e-9
    # the greedy-path search alone stays small: the greedy path and the nodes that decide it
    alone = s.classifier.score_ids(s.prompt, "conditional", constrained=constrained)
    assert alone.categories[verdict[1][0]].p == pytest.approx(results["conditional"].categories[verdict[1][0]].p, abs=1e-6)
    assert alone.expanded_nodes < results["marginal"].expanded_nodes or results["marginal"].expanded_nodes < 20


def test_tolerance_stops_best_first_at_once(six):
    """With one node a round the search pops nodes heaviest first; a tolerance stop happens at the
    first round whose frontier holds at most the tolerance, and the tree is the one a node limit
    at the same count gives."""
    ids = six.render("hello")
    plain = dict(eps=0.0, batch=1, speculate=0, prior=0.0)
    stopped = six.score_ids(ids, tolerance=0.3, max_nodes=None, **plain)
    assert stopped.unexplored_mass <= 0.3
    count = stopped.expanded_nodes
    same = six.score_ids(ids, max_nodes=count, **plain)
    before = six.score_ids(ids, max_nodes=count - 1, **plain)
    # the same nodes; each run may prefill from the prefix cache or not, so float32 rounding differs (seen: 3e-9)
    assert same.unexplored_mass == pytest.approx(stopped.unexplored_mass, abs=1e-6)
    assert [c.upper for c in same.categories.values()] == pytest.approx([c.upper for c in stopped.categories.values()])
    assert before.unexplored_mass > 0.3  # one node fewer and the frontier still held more


class _Scaled:
    """A fault no real model produces: at one node, every log-probability moved by ``shift``
    (-inf: the model rules out every allowed token; -800: they all underflow exp)."""

    def __init__(self, backend, depth: int, shift: float):
        self.backend, self.depth, self.shift = backend, depth, shift
        self.max_context = backend.max_context

    def open(self, prompts):
        inner = self.backend.open(prompts)
        outer = self

        class Session:
            def next_tokens(self, queries):
                answers = inner.next_tokens(queries)
                out = []
                for q, a in zip(queries, answers):
                    if len(q.path) == outer.depth:
                        a = NextToken(np.asarray(a.logprobs) + outer.shift, a.top_logprob + outer.shift, a.unreported, a.logits)
                    out.append(a)
                return out

            def close(self):
                inner.close()

        return Session()


def test_zero_probability_ends_follow_one_rule(tiny_model, char_tok):
    """Under constraint a node's distribution is the softmax of its allowed tokens' log-probabilities:
    an underflow changes nothing, and where every allowed token has probability 0 they are equally
    likely (the limit that gives a forced token probability 1), with a warning."""
    taxonomy = Taxonomy("two", (Category("S1", "a"), Category("S2", "b")))
    plain = Classifier(tiny_model, char_tok, taxonomy=taxonomy, format="llama-guard-3", name="t",
                       backend=NaiveBackend(tiny_model))
    ids = plain.render("hello")
    reference = plain.score_ids(ids, eps=0.0, max_nodes=None)
    underflow = Classifier(tiny_model, char_tok, taxonomy=taxonomy, format="llama-guard-3", name="t",
                           backend=_Scaled(NaiveBackend(tiny_model), depth=0, shift=-800.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", GuardprobWarning)
        shifted = underflow.score_ids(ids, eps=0.0, max_nodes=None)
    assert shifted.invalid_mass == 0.0
    assert shifted.p_unsafe == pytest.approx(reference.p_unsafe, abs=1e-9)  # a shift cancels in float64 softmaxes
    ruled_out = Classifier(tiny_model, char_tok, taxonomy=taxonomy, format="llama-guard-3", name="t",
                           backend=_Scaled(NaiveBackend(tiny_model), depth=0, shift=-np.inf))
    with pytest.warns(GuardprobWarning, match="probability 0"):
        even = ruled_out.score_ids(ids, eps=0.0, max_nodes=None)
    assert even.invalid_mass == 0.0
    assert even.p_unsafe == pytest.approx(0.5, abs=1e-9)  # 's' and 'u' equally likely at the root
    assert even.unexplored_mass == pytest.approx(0.0, abs=1e-12)


def test_groups_are_unions_not_sums(tiny_classifier):
    scores = tiny_classifier.score("How do I hit a man", groups={"violence": ["S1", "S9"], "all": list(LG3)})
    violence, every = scores.groups["violence"], scores.groups["all"]
    s1, s9 = scores.categories["S1"], scores.categories["S9"]
    # 1e-12: one search's float64 sums of the same node masses, grouped differently
    assert max(s1.lower, s9.lower) - 1e-12 <= violence.lower <= violence.upper <= s1.upper + s9.upper + 1e-12
    assert every.lower == pytest.approx(scores.p_unsafe_lower, abs=1e-12)  # an unsafe verdict names at least one id
    assert scores.as_dict()["groups"]["violence"]["p"] == violence.p


def test_bad_groups_are_refused(tiny_classifier):
    from guardprob import InputError

    with pytest.raises(InputError, match="S99"):
        tiny_classifier.score("x", groups={"g": ["S99"]})
    with pytest.raises(InputError, match="non-empty list"):
        tiny_classifier.score("x", groups={"g": "S1"})
