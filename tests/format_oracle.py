"""The brute force every format's scores are checked against (tests/test_format_oracle.py and
each new family's own test module use it): the verdicts of each format, the cases, and the checks.

The verdicts of each format are written here from the family's definition, on strings
(nothing from guardprob's languages), with the outcomes each one says. The brute force walks
every token path that spells a prefix of some verdict, with one full forward pass per
prefix, and sums the exact probability of every outcome. The search must equal it when it
is exhaustive and bound it under any pruning, in both modes.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardprob import Category, Classifier, Taxonomy
from guardprob.formats.declarative import DeclarativeFormat
from helpers import tiny_llama
from oracle import tokenizer_for, train

SLACK = 2e-6
CHAT = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"  # for the formats that need one


# -- each format's verdicts, from its definition ---------------------------------------------
def lg_verdicts(ids, role):
    out = {"safe": (frozenset(), False)}
    for r in range(1, len(ids) + 1):
        for combo in itertools.permutations(ids, r):
            out["unsafe\n" + ",".join(combo)] = (frozenset(combo) | {"unsafe"}, False)
    return out


QWEN = (("a_cat", "Violent"), ("b_cat", "Non-violent Illegal Acts"), ("jailbreak", "Jailbreak"))


def qwen_verdicts(ids, role):
    cats = [(i, n) for i, n in QWEN if role == "user" or i != "jailbreak"]
    lists = [("None", frozenset())]
    for r in range(1, len(cats) + 1):
        for combo in itertools.permutations(cats, r):
            lists.append((", ".join(n for _, n in combo), frozenset(i for i, _ in combo)))
    refusals = [("", frozenset())] if role == "user" else [("\nRefusal: Yes", {"refusal=yes"}), ("\nRefusal: No", {"refusal=no"})]
    out = {}
    for severity in ("Safe", "Unsafe", "Controversial"):
        for text, named in lists:
            if severity == "Safe" and named:
                continue
            for tail, refusal in refusals:
                says = {f"safety={severity.lower()}", *named, *refusal} | ({"unsafe"} if severity == "Unsafe" else set())
                out[f"Safety: {severity}\nCategories: {text}{tail}"] = (frozenset(says), False)
    return out


def wildguard_verdicts(ids, role):
    later = ("yes", "no", "N/A") if role == "user" else ("yes", "no")
    out = {}
    for a, b, c in itertools.product(("yes", "no"), later, later):
        says = {k for k, v in zip(("harmful_request", "response_refusal", "harmful_response"), (a, b, c)) if v == "yes"}
        judged = "harmful_request" if role == "user" else "harmful_response"
        says |= {"unsafe"} if judged in says else set()
        out[f"Harmful request: {a}\nResponse refusal: {b}\nHarmful response: {c}"] = (frozenset(says), False)
    return out


POLY = (("S1", "Violent Crimes"), ("S10", "Hate"))  # S1 is a prefix of S10


def polyguard_verdicts(ids, role):
    """Five lines; a side's violations only after its yes. The judged side's ids are the
    categories, the other side's are fields."""
    def side(name, judged):
        out = [("no", "None", set()), ("yes", "None", {f"harmful_{name}"})]
        for r in range(1, len(ids) + 1):
            for combo in itertools.permutations(ids, r):
                named = combo if judged else [f"{name}_violation={i}" for i in combo]
                out.append(("yes", ", ".join(combo), {f"harmful_{name}", *named}))
        return out

    out = {}
    for (a, x, said_a), refusal, (c, y, said_c) in itertools.product(
            side("request", role == "user"), ("yes", "no"), side("response", role == "assistant")):
        says = said_a | said_c | ({"response_refusal"} if refusal == "yes" else set())
        says |= {"unsafe"} if (a if role == "user" else c) == "yes" else set()
        text = (f"Harmful request: {a}\nRequest safety violations: {x}\nResponse refusal: {refusal}\n"
                f"Harmful response: {c}\nResponse safety violations: {y}")
        out[text] = (frozenset(says), False)
    return out


def polyguard_first(role):
    """Every verdict's text up to the judged side's yes."""
    word = "Harmful request: yes" if role == "user" else "Harmful response: yes"
    texts = polyguard_verdicts(tuple(i for i, _ in POLY), role)
    return tuple(sorted({t[: t.index(word) + len(word)] for t in texts if word in t}))


NEMO = (("S1", "Violence"), ("S8", "Hate/Identity Hate"))


def nemoguard_verdicts(ids, role):
    lists = []
    for r in range(1, len(NEMO) + 1):
        for combo in itertools.permutations(NEMO, r):
            lists.append((", ".join(n for _, n in combo), frozenset(i for i, _ in combo)))
    out = {}
    pairs = [(u, None) for u in ("safe", "unsafe")] if role == "user" else list(itertools.product(("safe", "unsafe"), repeat=2))
    for user, response in pairs:
        says = {"user_safety=unsafe"} if user == "unsafe" else set()
        says |= {"response_safety=unsafe"} if response == "unsafe" else set()
        says |= {"unsafe"} if (user if role == "user" else response) == "unsafe" else set()
        head = f'{{"User Safety": "{user}"' + (f', "Response Safety": "{response}"' if response else "")
        out[head + "}"] = (frozenset(says), False)
        if "unsafe" in (user, response):
            for text, named in lists:
                out[f'{head}, "Safety Categories": "{text}"}}'] = (frozenset(says | named), False)
    return out


TOPICS = (("billing", "Billing"), ("bill", "Bill"), ("outage", "Outage"))


def topic_verdicts(style):
    def verdicts(ids, role):
        words = [n for _, n in TOPICS] if style == "comma" else [i for i, _ in TOPICS]
        out = {"[]" if style == "json" else "none": (frozenset(), False)}
        for r in range(1, len(TOPICS) + 1):
            for combo in itertools.permutations(range(len(TOPICS)), r):
                listed = [words[k] for k in combo]
                text = '["' + '", "'.join(listed) + '"]' if style == "json" else ", ".join(listed)
                out[text] = (frozenset(TOPICS[k][0] for k in combo) | {"unsafe"}, False)
        return out
    return verdicts


def yes_no_verdicts(ids, role):
    return {"Yes": (frozenset({ids[0], "unsafe"}), True), "No": (frozenset(), True)}


def granite33_verdicts(ids, role):
    """Granite Guardian 3.3 without thinking: an empty think block, then (after nothing, a newline
    or a blank line) its score tag with yes or no; whole once the word is written."""
    return {f"<think>\n</think>{gap}<score> {word}": (frozenset({ids[0], "unsafe"}) if word == "yes" else frozenset(), True)
            for gap in ("", "\n", "\n\n") for word in ("yes", "no")}


@dataclass(frozen=True)
class Case:
    format: object
    taxonomy: tuple[tuple[str, str], ...]
    verdicts: object
    crossing: tuple[str, ...]  # multi-character tokens, some across the grammar's boundaries
    first: object = None  # role -> the texts the first-token recipe counts as unsafe, from the definition
    added: tuple[str, ...] = ()  # tokens added to the tokenizer as special tokens (a verdict written in them)


CASES = {
    "llama-guard-3": Case("llama-guard-3", (("S1", "one"), ("S2", "two"), ("S10", "ten")), lg_verdicts,
                          ("unsafe\n", "S1", ",S", "un", "safe", "1,"), lambda role: ("unsafe",)),
    "qwen3guard": Case("qwen3guard", QWEN, qwen_verdicts,
                       ("Safety: ", "Unsafe", "Safe", "\nCategories: ", "None", "Non", "Violent, ", ", ", "\nRefusal: ", "Yes"),
                       lambda role: ("Safety: Unsafe",)),
    "wildguard": Case("wildguard", (("harmful_request", "Harmful request"), ("response_refusal", "Response refusal"),
                                    ("harmful_response", "Harmful response")), wildguard_verdicts,
                      ("Harmful ", "request: ", "yes", "no\n", "N/A", "\nResponse refusal: ", "Harmful response: y")),
    "polyguard": Case("polyguard", POLY, polyguard_verdicts,
                      ("None\nRes", "1, S", "0\nRes"), polyguard_first),  # few: its paths multiply
    "nemoguard": Case("nemoguard", NEMO, nemoguard_verdicts,
                      ('{"User Safety": "', 'unsafe"', 'safe"}', ', "Response Safety": ', ', "', "Violence, ", "Hate/"),
                      lambda role: ('{"User Safety": "unsafe"',) if role == "user" else tuple(
                          f'{{"User Safety": "{u}", "Response Safety": "unsafe"' for u in ("safe", "unsafe"))),
    "declarative-comma": Case(
        DeclarativeFormat("topics", "unused", "Topics:\n{{categories}}\n{{conversation}}", "name", "comma", "none"),
        TOPICS, topic_verdicts("comma"), ("Bill", "ing, ", "none", "Outage"), lambda role: ("Bill", "Outage")),
    "declarative-json": Case(
        DeclarativeFormat("topics", "unused", "Topics:\n{{categories}}\n{{conversation}}", "id", "json", "[]"),
        TOPICS, topic_verdicts("json"), ('["', '", "', '"]', "bill", "outage"), lambda role: ('["',)),
    "shieldgemma": Case("shieldgemma", (("hate", "Hate Speech"),), yes_no_verdicts, ("Yes", "No", "Ye")),
    "granite-guardian-3.2": Case("granite-guardian-3.2", (("harm", "Harm"),), yes_no_verdicts, ("Yes", "Y")),
    "granite-guardian-3.3": Case("granite-guardian-3.3", (("harm", "Harm"),), granite33_verdicts,
                                 ("<think>", "</think>\n", "\n<score> ", "<score>", " yes", "k>")),
}


@dataclass
class Setup:
    case: Case
    role: str
    classifier: Classifier
    model: torch.nn.Module
    vocab: dict[str, int]
    prompt: list[int]


@functools.cache
def setup(name: str, role: str, seed: int) -> Setup:
    case = CASES[name]
    ids = tuple(i for i, _ in case.taxonomy)
    verdicts = case.verdicts(ids, role)
    both = {**case.verdicts(ids, "user"), **case.verdicts(ids, "assistant")}  # the classifier compiles both roles
    chars = sorted(set("".join(both)) | set("ghijk ?"))
    vocab = {"<unk>": 0, "<eos>": 1, "<bos>": 2}
    for piece in [*chars, *case.crossing]:
        vocab.setdefault(piece, len(vocab))
    tokenizer = tokenizer_for(vocab)
    tokenizer.chat_template = CHAT
    if case.added:
        tokenizer.add_special_tokens({"additional_special_tokens": list(case.added)})
        vocab = {**vocab, **{t: tokenizer.convert_tokens_to_ids(t) for t in case.added}}
    model = tiny_llama(len(tokenizer), seed=seed)
    import random

    rng = random.Random(seed)
    prompt = [vocab[c] for c in rng.choices("ghijk ?", k=6)]
    if seed % 2:  # trained: the model writes verdicts itself, so unconstrained mass sits in the grammar
        train(model, rng, prompt, ids, vocab, favour=rng.choice(sorted(verdicts)))
    taxonomy = Taxonomy("oracle", tuple(Category(i, n, f"{n} things") for i, n in case.taxonomy))
    clf = Classifier(model, tokenizer, taxonomy=taxonomy, format=case.format, name="oracle")
    return Setup(case, role, clf, model, vocab, prompt)


@functools.cache
def exact(name: str, role: str, seed: int, constrained: bool) -> dict[str, float]:
    """P(outcome) for every outcome, summed over the whole tree of token paths."""
    s = setup(name, role, seed)
    ids = tuple(i for i, _ in s.case.taxonomy)
    verdicts = s.case.verdicts(ids, role)
    texts = {i: t for t, i in s.vocab.items() if i > 2}
    eos = s.vocab["<eos>"]
    totals: dict[str, float] = {}
    union = set(ids[:2])  # a group: P(the verdict names any of the first two categories)
    words = s.case.first(role) if s.case.first else ()

    def begins(text: str) -> bool:
        return any(text.startswith(w) for w in words)

    def add(says: frozenset, m: float) -> None:
        for outcome in says | ({"group"} if says & union else set()):
            totals[outcome] = totals.get(outcome, 0.0) + m

    level = [((), "", 1.0)]
    while level:
        rows = torch.tensor([s.prompt + list(path) for path, _, _ in level])
        with torch.no_grad():
            logprobs = torch.log_softmax(s.model(input_ids=rows).logits[:, -1].double(), -1)
        following = []
        for (path, text, mass), lp in zip(level, logprobs):
            allowed = [t for t, piece in texts.items() if any(v.startswith(text + piece) for v in verdicts)]
            closed = text in verdicts and not verdicts[text][1]
            allowed += [eos] if closed else []
            if not allowed:
                continue
            q = torch.softmax(lp[allowed], -1) if constrained else lp[allowed].exp()
            for token, p in zip(allowed, q.tolist()):
                m = mass * p
                if token == eos:
                    add(verdicts[text][0], m)
                    continue
                after = text + texts[token]
                if begins(after) and not begins(text):  # the first word is written: all of m counts
                    totals["first_word"] = totals.get("first_word", 0.0) + m
                if after in verdicts and verdicts[after][1]:  # an open-ended verdict is whole
                    add(verdicts[after][0], m)
                elif m > 0:
                    following.append((path + (token,), after, m))
        level = following
    return totals


def score(s: Setup, config: dict):
    ids = [i for i, _ in s.case.taxonomy]
    groups = None if s.classifier.per_category or len(ids) < 2 else {"group": ids[:2]}
    return s.classifier.score_ids(s.prompt, "marginal", role=s.role, groups=groups, **config)


def first_word_exact(name, role):
    """Unconstrained, the first-token recipe counts every path that writes the unsafe word,
    whatever follows (mass that then leaves the grammar included)."""
    s = setup(name, role, 1)
    language = s.classifier.grammar_for(role).language
    scores = s.classifier.score_ids(s.prompt, "first_token", role=role, eps=0.0, max_nodes=None, constrained=False)
    truth = exact(name, role, 1, False)
    listed = [c for c in scores.categories.values() if c.id not in language.choices]
    assert listed, name
    for c in listed:
        assert math.isclose(c.p, truth.get("first_word", 0.0), abs_tol=1e-6), (name, role, c, truth.get("first_word"))
        assert c.upper - c.lower <= 1e-6


def reported(scores) -> dict[str, tuple[float, float, float]]:
    out = {c.id: (c.p, c.lower, c.upper) for c in scores.categories.values()}
    out |= {g.id: (g.p, g.lower, g.upper) for g in scores.groups.values()}
    out |= {f.id: (f.p, f.lower, f.upper) for f in scores.fields.values()}
    out["unsafe"] = (scores.p_unsafe, scores.p_unsafe_lower, scores.p_unsafe_upper)
    return out


ROLES = [(name, role) for name in CASES for role in ("user", "assistant")]
PRUNING = st.fixed_dictionaries({
    "eps": st.sampled_from([0.0, 1e-3, 0.05, 0.3, 1.0]),
    "top_p": st.sampled_from([1.0, 0.9, 0.5]),
    "max_nodes": st.sampled_from([None, 1, 3, 10]),
    "constrained": st.booleans(),
})


def add_case(name: str, case: Case) -> list[tuple[str, str]]:
    """Check another format the same way (a family's own test file): its (name, role) pairs."""
    CASES[name] = case
    return [(name, role) for role in ("user", "assistant")]


# -- the checks, each run on every case's roles ---------------------------------------------------
def check_exhaustive(name, role, constrained):
    for seed in (0, 1):
        s = setup(name, role, seed)
        truth = exact(name, role, seed, constrained)
        got = reported(score(s, {"eps": 0.0, "top_p": 1.0, "max_nodes": None, "constrained": constrained}))
        expected = {o for o in truth if o != "first_word" and (o != "group" or not s.classifier.per_category)}
        assert set(got) >= expected, (name, role)
        if not s.classifier.per_category:
            assert "group" in got
        for outcome, (p, lower, upper) in got.items():
            want = truth.get(outcome, 0.0)
            assert math.isclose(p, want, abs_tol=1e-6), (name, role, seed, outcome, p, want)
            assert upper - lower <= 1e-6, (name, role, outcome, lower, upper)


def check_bounds(name, role, seed, config):
    s = setup(name, role, seed)
    truth = exact(name, role, seed, config["constrained"])
    for outcome, (p, lower, upper) in reported(score(s, config)).items():
        want = truth.get(outcome, 0.0)
        assert lower - SLACK <= p <= upper + SLACK, (name, role, outcome, config)
        assert lower - SLACK <= want <= upper + SLACK, (name, role, seed, outcome, want, (lower, upper), config)


def check_first_token(name, role):
    s = setup(name, role, 1)
    scores = s.classifier.score_ids(s.prompt, "first_token", role=role)
    truth = exact(name, role, 1, True)
    assert math.isclose(scores.p_unsafe, truth.get("unsafe", 0.0), abs_tol=1e-6)
    listed = [c for c in scores.categories.values() if c.id not in s.classifier.grammar_for(role).language.choices]
    for c in listed:
        assert math.isclose(c.p, truth.get("unsafe", 0.0), abs_tol=1e-6), (name, role, c)


def check_facts(name, role):
    case = CASES[name]
    ids = tuple(i for i, _ in case.taxonomy)
    s = setup(name, role, 0)
    language = s.classifier.grammar_for(role, ids[0] if s.classifier.per_category else None).language
    verdicts = case.verdicts(ids, role)
    for prefix in {text[:end] for text in verdicts for end in range(len(text) + 1)}:
        state = language.walk(language.root, prefix)
        assert state is not None, (name, prefix)
        completions = [says for text, (says, _) in verdicts.items() if text.startswith(prefix)]
        named = [{language.index[o] for o in says} for says in completions]
        facts = language.facts(state)
        assert frozenset().union(*named) <= facts.reachable, (name, prefix)
        for clause in facts.clauses:
            assert all(clause & n for n in named), (name, prefix, clause)
        for k, outcome in enumerate(language.outcomes):
            assert (frozenset({k}) in facts.clauses) == all(k in n for n in named), (name, prefix, outcome)
        if prefix in verdicts and (verdicts[prefix][1] or language.can_end(state)):
            assert language.verdict(state).outcomes == verdicts[prefix][0], (name, prefix)


# -- a family's own test module: the four checks on its roles --------------------------------------
def family_tests(roles: list[tuple[str, str]], first_word: bool = False, examples: int = 30) -> tuple:
    """The checks above as test functions over ``roles`` (``add_case``'s pairs, or ``ROLES``), for a
    test module to bind at module level::

        (test_exhaustive_scores_equal_the_brute_force, test_bounds_hold_under_pruning,
         test_first_token, test_facts_of_every_prefix_hold_on_its_completions) = family_tests(ROLES)

    first_word: the first-token test also checks the unconstrained first word against the brute
    force (a case with ``first``). examples: hypothesis examples of the pruning test."""

    @pytest.mark.parametrize(("name", "role"), roles)
    @pytest.mark.parametrize("constrained", [True, False])
    def test_exhaustive_scores_equal_the_brute_force(name, role, constrained):
        check_exhaustive(name, role, constrained)

    @settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(case=st.sampled_from(roles), seed=st.sampled_from([0, 1, 2, 3]), config=PRUNING)
    def test_bounds_hold_under_pruning(case, seed, config):
        check_bounds(*case, seed, config)

    @pytest.mark.parametrize(("name", "role"), roles)
    def test_first_token(name, role):
        """Each format's first word is exactly what says unsafe: the first-token recipe over every
        spelling equals P(unsafe) when the verdict is constrained."""
        check_first_token(name, role)
        if first_word:
            first_word_exact(name, role)

    @pytest.mark.parametrize(("name", "role"), roles)
    def test_facts_of_every_prefix_hold_on_its_completions(name, role):
        """For every prefix of every verdict: each clause holds on every completion, every outcome
        some completion names is reachable, an outcome is committed exactly when every completion
        names it, and the list slots' facts contain what completions write there."""
        check_facts(name, role)

    return (test_exhaustive_scores_equal_the_brute_force, test_bounds_hold_under_pruning, test_first_token,
            test_facts_of_every_prefix_hold_on_its_completions)
