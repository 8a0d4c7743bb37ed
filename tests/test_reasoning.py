"""Reasoning before the verdict, against an independent brute force.

The brute force writes the greedy reasoning with plain full forward passes (end-of-sequence
ruled out, stopped where the text holds the closing text, the closing token spelled again up to
it, closed for the model at the budget) and sums the verdict's probability over every token
path after it. Sampled traces are checked against the exact marginal over every reasoning of
one token: their mean must land within a few standard errors of it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardprob import Category, Classifier, Taxonomy
from guardprob.backends.base import NextToken
from guardprob.core.reasoning import Reasoning, TraceConfig, write_traces
from guardprob.errors import InputError, TemplateError
from guardprob.formats.declarative import DeclarativeFormat
from guardprob.formats.granite_guardian33 import GraniteGuardian33Format
from helpers import tiny_llama
from oracle import tokenizer_for

GAPS = ("", "\n", "\n\n")
VERDICTS = {gap + "<score> " + word: word == "yes" for gap in GAPS for word in ("yes", "no")}  # text -> unsafe
PROMPT_CHARS = "ghijk ?"
SLACK = 2e-6  # float32 tree attention against float32 full forwards (the brute force here)
OWN = 1e-9  # a search's bounds against its own estimate or each other: one set of float64 sums


@dataclass(frozen=True)
class Hash(GraniteGuardian33Format):
    """Granite Guardian 3.3's think mode with a one-character closing text, so that a small model
    closes its reasoning by itself."""

    think: bool = True
    close: str = "#"
    budget: int = 6

    @property
    def reasoning(self) -> Reasoning:
        return Reasoning(self.close, self.budget)


def vocabulary() -> dict[str, int]:
    vocab = {"<unk>": 0, "<eos>": 1, "<bos>": 2}
    for piece in [*sorted(set("".join(VERDICTS)) | set(PROMPT_CHARS) | set("ab#thik/")), "#\n", "<score> ", " yes", "ab"]:
        vocab.setdefault(piece, len(vocab))
    return vocab


def build(seed: int, budget: int = 6, trained: bool = False) -> tuple[Classifier, torch.nn.Module, dict[str, int], list[int]]:
    vocab = vocabulary()
    model = tiny_llama(len(vocab), seed=seed)
    rng = np.random.default_rng(seed)
    prompt = [vocab[c] for c in rng.choice(list(PROMPT_CHARS), 6)]
    if trained:  # the model learns to reason "a", "b", then close with the token "#\n" (past the closing text)
        teach(model, prompt, [vocab["a"], vocab["b"], vocab["#\n"], vocab["<score> "], vocab["y"]])
    taxonomy = Taxonomy("t", (Category("harm", "Harm", "harmful things"),))
    clf = Classifier(model, tokenizer_for(vocab), taxonomy=taxonomy, format=Hash(budget=budget), name="reasoner")
    return clf, model, vocab, prompt


def teach(model: torch.nn.Module, prompt: list[int], answer: list[int]) -> None:
    torch.manual_seed(0)
    x = torch.tensor([prompt + answer])
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-2)
    model.train()
    for _ in range(40):
        logits = model(input_ids=x).logits[0, len(prompt) - 1:-1]
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(answer))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()


def logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)


def greedy_reasoning(model, vocab, prompt, close="#", budget=6) -> tuple[list[int], bool, int]:
    """The trace's tokens (closing text included), whether it was cut, the tokens the model chose."""
    texts = {i: t for t, i in vocab.items()}
    path, text = [], ""
    while True:
        lp = logprobs(model, prompt + path)
        lp[vocab["<eos>"]] = -math.inf
        token = int(torch.argmax(lp))
        at = (text + texts[token]).find(close)
        if at >= 0:
            upto = (text + texts[token])[: at + len(close)]
            return path + [vocab[c] for c in upto[len(text):]] if len(upto) < len(text + texts[token]) else path + [token], False, len(path) + 1
        path.append(token)
        text += texts[token]
        if len(path) == budget:
            return path + [vocab[c] for c in close], True, len(path)


def p_unsafe_after(model, vocab, ids: list[int]) -> float:
    """P(the verdict after ``ids`` says yes), summed over every token path that spells a verdict
    (constrained: each step renormalised over the tokens that keep to some verdict)."""
    texts = {i: t for t, i in vocab.items() if i > 2}
    total, level = 0.0, [((), "", 1.0)]
    while level:
        with torch.no_grad():  # one batched pass per depth (every path of a depth has its length)
            rows = torch.log_softmax(model(input_ids=torch.tensor([ids + list(p) for p, _, _ in level])).logits[:, -1].double(), -1)
        following = []
        for (path, text, mass), lp in zip(level, rows):
            allowed = [t for t, piece in texts.items() if any(v.startswith(text + piece) for v in VERDICTS)]
            q = torch.softmax(lp[allowed], -1)
            for token, p in zip(allowed, q.tolist()):
                after = text + texts[token]
                if after in VERDICTS:  # open-ended: whole once written
                    total += mass * p if VERDICTS[after] else 0.0
                else:
                    following.append((path + (token,), after, mass * p))
        level = following
    return total


EXHAUSTIVE = {"eps": 0.0, "max_nodes": None}


@pytest.mark.parametrize(("seed", "trained"), [(0, False), (1, False), (2, False), (0, True), (1, True)])
def test_greedy_reasoning_then_exact_verdict_equals_the_brute_force(seed, trained):
    clf, model, vocab, prompt = build(seed, trained=trained)
    trace, cut, written = greedy_reasoning(model, vocab, prompt)
    if trained:  # the taught reasoning closes with a token that runs past the closing text
        assert (cut, written) == (False, 3) and trace == [vocab["a"], vocab["b"], vocab["#"]], trace
    want = p_unsafe_after(model, vocab, prompt + trace)
    s = clf.score_ids(prompt, **EXHAUSTIVE)
    assert math.isclose(s.p_unsafe, want, abs_tol=SLACK), (s.p_unsafe, want)
    assert math.isclose(s.categories["harm"].p, want, abs_tol=SLACK)
    assert s.p_unsafe_upper - s.p_unsafe_lower <= OWN
    r = s.reasoning
    assert (r.mode, r.traces, r.cut, r.tokens, r.stderr) == ("greedy", 1, int(cut), written, {})
    assert r.texts[0].endswith("#") and r.texts[0].count("#") == 1


@pytest.mark.parametrize("seed", [0, 1])
def test_bounds_after_the_reasoning_hold_under_pruning(seed):
    clf, model, vocab, prompt = build(seed)
    trace, _, _ = greedy_reasoning(model, vocab, prompt)
    want = p_unsafe_after(model, vocab, prompt + trace)
    for config in ({"eps": 0.3}, {"max_nodes": 1}, {"eps": 1.0}, {"top_p": 0.5}):
        s = clf.score_ids(prompt, **config)
        assert s.p_unsafe_lower - SLACK <= want <= s.p_unsafe_upper + SLACK, config


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 3), trace_seed=st.integers(0, 10**6),
       config=st.fixed_dictionaries({"eps": st.sampled_from([1e-3, 0.05, 0.3, 1.0]), "top_p": st.sampled_from([1.0, 0.7]),
                                     "max_nodes": st.sampled_from([None, 1, 3])}))
def test_mean_bounds_over_sampled_traces_hold_under_pruning(seed, trace_seed, config):
    """The same traces (a seed repeats them, whatever the search settings) searched exhaustively
    give the exact mean; every pruned run's mean bounds must contain it."""
    clf, *_ = build_cached(seed)
    exact = clf.score_ids([3, 4, 5, 6], traces=3, seed=trace_seed, **EXHAUSTIVE)
    pruned = clf.score_ids([3, 4, 5, 6], traces=3, seed=trace_seed, **config)
    assert pruned.reasoning.texts == exact.reasoning.texts
    # float32 runs batched differently agree to about 1e-8 (the format oracle's slack)
    assert pruned.p_unsafe_lower - SLACK <= exact.p_unsafe <= pruned.p_unsafe_upper + SLACK, config
    for k, c in pruned.categories.items():
        assert c.lower - SLACK <= exact.categories[k].p <= c.upper + SLACK, (k, config)


@functools.cache
def build_cached(seed: int):
    return build(seed, budget=3)


def test_sampled_traces_estimate_the_marginal_over_the_reasoning():
    """With a budget of one token, every reasoning is one token then the closing text (or the
    closing text itself): the exact marginal is a finite sum, and the mean over sampled traces
    must estimate it within its standard error."""
    clf, model, vocab, prompt = build(5, budget=1)
    texts = {i: t for t, i in vocab.items()}
    first = logprobs(model, prompt)
    first[vocab["<eos>"]] = -math.inf
    q = torch.softmax(first, -1)
    truth = 0.0
    for token, p in enumerate(q.tolist()):
        if p == 0:
            continue
        trace = [vocab["#"]] if texts[token].startswith("#") else [token, vocab["#"]]
        truth += p * p_unsafe_after(model, vocab, prompt + trace)
    s = clf.score_ids(prompt, traces=200, seed=7, **EXHAUSTIVE)
    r = s.reasoning
    assert (r.mode, r.traces, r.temperature) == ("sampled", 200, 1.0)
    assert r.stderr["p_unsafe"] > 0
    assert abs(s.p_unsafe - truth) <= 4 * r.stderr["p_unsafe"], (s.p_unsafe, truth, r.stderr)
    assert s.p_unsafe_lower - OWN <= s.p_unsafe <= s.p_unsafe_upper + OWN
    again = clf.score_ids(prompt, traces=200, seed=7, **EXHAUSTIVE)
    assert again.reasoning.texts == r.texts and math.isclose(again.p_unsafe, s.p_unsafe, abs_tol=1e-7)  # a seed repeats the run
    greedy = clf.score_ids(prompt, traces=1, seed=3, temperature=1e-6, **EXHAUSTIVE)  # near-greedy sampling
    assert math.isclose(greedy.p_unsafe, clf.score_ids(prompt, **EXHAUSTIVE).p_unsafe, abs_tol=1e-9)


def test_every_method_and_batch_get_the_reasoning():
    clf, model, vocab, prompt = build(2)
    texts = ["hi", "ghij?", "k k"]
    batch = clf.score_methods(texts, ("marginal", "greedy", "conditional", "first_token", "joint"), traces=2, seed=0)
    for conversation, scores in zip(texts, batch):
        alone = clf.score_methods([conversation], ("marginal",), traces=2, seed=0)[0]["marginal"]
        assert scores["marginal"].reasoning.traces == 2
        for s in scores.values():
            assert 0 <= s.p_unsafe_lower <= s.p_unsafe <= s.p_unsafe_upper <= 1
            assert s.reasoning is not None
        assert alone.reasoning.traces == 2


def test_the_reasoning_runs_in_the_verdict_search_session():
    """The traces are written through the session the verdict search then reads: one prefill."""
    clf, model, vocab, prompt = build(1)
    opened = []
    original = clf.backend.begin  # the classifier opens sessions that prefill in steps

    def counting(prompts):
        opened.append(len(prompts))
        return original(prompts)

    clf.backend.begin = counting
    s = clf.score("ghij", traces=3, seed=1)
    assert opened == [1]
    assert s.model_calls >= 3  # the reasoning's calls count


def test_traces_on_a_format_without_reasoning_are_refused():
    clf, *_ = build(0)
    plain = Classifier(clf.model, clf.tokenizer, taxonomy=clf.taxonomy, format="granite-guardian-3.3", name="plain")
    for setting in ({"traces": 4}, {"temperature": 0.5}, {"seed": 1}, {"reasoning_tokens": 8}):
        with pytest.raises(InputError, match="without reasoning"):
            plain.score("hi", **setting)
    assert plain.score("hi").reasoning is None
    for bad in ({"traces": -1}, {"traces": 2.5}, {"temperature": 0}, {"seed": "x"}, {"reasoning_tokens": 0}):
        with pytest.raises(InputError):
            clf.score("hi", **bad)


class _Scripted:
    """A session whose model always writes the next token of a script: the closing-text logic
    on its own, for token shapes a small real model is not sure to write."""

    def __init__(self, script: list[int], vocab_size: int):
        self.script, self.vocab_size, self.usage = script, vocab_size, None

    def next_tokens(self, queries):
        out = []
        for q in queries:
            lp = np.full(self.vocab_size, -20.0)
            lp[self.script[len(q.path)]] = 0.0
            out.append(NextToken(lp, 0.0))
        return out


def test_a_closing_token_that_runs_past_the_closing_text_is_spelled_again():
    pieces = ["x", "</th", "ink>\n\n", "</", "think>", "<", "/", "t", "h", "i", "n", "k", ">", "\n"]
    ids = {p: i for i, p in enumerate(pieces)}

    def spell(text):
        return tuple(ids[c] for c in text)

    def run(script, budget=10):
        session = _Scripted([ids[p] for p in script] + [0] * 20, len(pieces))
        return write_traces(session, [(0, ())], Reasoning("</think>", budget), TraceConfig(), lambda i: pieces[i], spell,
                            (), len(pieces))[0][0][0]

    past = run(["x", "</th", "ink>\n\n"])
    assert past.tokens == (ids["x"], ids["</th"], *spell("ink>")) and not past.cut and past.text == "x</think>"
    exact = run(["x", "</", "think>"])
    assert exact.tokens == (ids["x"], ids["</"], ids["think>"]) and exact.written == 3
    cut = run(["x", "x", "x"], budget=2)
    assert cut.cut and cut.tokens == (ids["x"], ids["x"], *spell("</think>")) and cut.written == 2


def test_granite_guardian_3_3_think_reasons_per_criterion():
    """Each criterion is a question with its own reasoning after the shared conversation."""
    vocab = {"<unk>": 0, "<eos>": 1, "<bos>": 2}
    for ch in sorted(set("".join(VERDICTS)) | set("ghijk ?/thin")):
        vocab.setdefault(ch, len(vocab))
    taxonomy = Taxonomy("g", (Category("harm", "Harm", ""), Category("violence", "Violence", "")))
    clf = Classifier(tiny_llama(len(vocab), seed=4), tokenizer_for(vocab), taxonomy=taxonomy,
                     format="granite-guardian-3.3-think", name="g")
    s = clf.score("hi", reasoning_tokens=4, traces=2, seed=0)
    assert set(s.categories) == {"harm", "violence"}
    assert s.reasoning.traces == 2 and len(s.reasoning.texts) == 4  # two per criterion
    assert all(t.endswith("</think>") for t in s.reasoning.texts)
    assert math.isclose(s.p_unsafe, max(c.p for c in s.categories.values()))


def test_declarative_reasoning_is_read_and_checked(tmp_path):
    good = tmp_path / "topics.yaml"
    good.write_text("taxonomy: [{id: a, name: Apples}]\ninstruction: 'Which? {{conversation}}'\n"
                    "reasoning: {close: '</think>', then: \"\\n\\n\", max_tokens: 64}\n")
    f = DeclarativeFormat.load(good)
    assert f.reasoning == Reasoning("</think>", 64) and f.then == "\n\n"
    assert f.language(Taxonomy("t", (Category("a", "Apples"),)), "user").walk(
        f.language(Taxonomy("t", (Category("a", "Apples"),)), "user").root, "\n\nApples") is not None
    for bad, message in (("reasoning: yes", "reasoning"), ("reasoning: {then: x}", "close"),
                         ("reasoning: {close: x, max_tokens: 0}", "max_tokens"), ("reasoning: {close: x, when: y}", "unknown")):
        path = tmp_path / "bad.yaml"
        path.write_text("taxonomy: [{id: a, name: Apples}]\ninstruction: 'Which? {{conversation}}'\n" + bad + "\n")
        with pytest.raises(TemplateError, match=message):
            DeclarativeFormat.load(path)


def test_a_deadline_stops_the_reasoning_being_written():
    """A run stopped while its reasoning is written ends there, after the call under way: the
    trace is cut where it is, no verdict is searched, and the bounds (all the mass open) hold."""
    clf, model, vocab, prompt = build(0, budget=50)
    trace, cut, written = greedy_reasoning(model, vocab, prompt, budget=50)
    assert written > 3, "this set-up must reason for longer than the deadline allows"
    want = p_unsafe_after(model, vocab, prompt + trace)
    run = clf.start([clf._prompt_from_ids(prompt)], ("marginal",), **EXHAUSTIVE)
    for _ in range(2):
        assert run.step()
    run.stop_all()
    steps = 0
    while run.step():
        steps += 1
    run.close()
    s = run.results()[0]["marginal"]
    assert steps == 0 and not s.complete
    assert (s.reasoning.cut, s.reasoning.tokens) == (1, 2)
    assert s.reasoning.texts[0].endswith("#")
    assert s.p_unsafe_lower - SLACK <= want <= s.p_unsafe_upper + SLACK and s.unexplored_mass == pytest.approx(1.0)
    timed = clf.score("ghij k", deadline=1e-6, **EXHAUSTIVE)  # the deadline passes during the first call
    assert not timed.complete and timed.reasoning.tokens <= 1


def test_reasoning_shares_a_pool_s_calls_with_other_searches():
    """In a pool, a run's reasoning is written in the calls that search other runs' verdicts, and
    each run ends as it would alone."""
    clf, model, vocab, prompt = build(1)
    calls: list[set[int]] = []
    original = clf.backend.begin  # the classifier opens sessions that prefill in steps

    def recording(prompts):
        session = original(prompts)
        inner = session.next_tokens

        def next_tokens(queries):
            calls.append({q.prompt for q in queries})
            return inner(queries)

        session.next_tokens = next_tokens
        return session

    clf.backend.begin = recording
    pool = clf.pool()
    first = pool.join([clf._prompt_from_ids(prompt)], **EXHAUSTIVE)
    pool.step()
    second = pool.join([clf._prompt_from_ids([3, 4, 5, 6])], **EXHAUSTIVE)
    while not (first.done and second.done):
        pool.step()
    assert any(c == {0, 1} for c in calls)  # one call wrote one run's reasoning and searched the other
    for run, ids in ((first, prompt), (second, [3, 4, 5, 6])):
        run.close()
        joined = run.results()[0]["marginal"]
        alone = clf.score_ids(ids, **EXHAUSTIVE)
        assert joined.reasoning.texts == alone.reasoning.texts
        assert abs(joined.p_unsafe - alone.p_unsafe) <= SLACK  # other batch shapes: other float32 reductions
    pool.close()
