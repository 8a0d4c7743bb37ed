"""The verdict grammar: states, commitment, and tokenizers that split ids differently."""

from __future__ import annotations

import itertools

import pytest

from guardprob.core.grammar import TokenGrammar, Vocabulary
from guardprob.errors import GrammarError
from guardprob.formats.language import Branch, Labels, Language, ParserState, Thread
from guardprob.formats.llama_guard import verdict_language

IDS = tuple(f"S{i}" for i in range(1, 15))


def grammar_for(pieces: list[str], ids=IDS) -> tuple[TokenGrammar, dict[str, int]]:
    texts = ["<eos>", *pieces]
    vocab = Vocabulary(tuple(None if i == 0 else t for i, t in enumerate(texts)), (0,))
    return TokenGrammar(verdict_language(ids), vocab), {t: i for i, t in enumerate(texts)}


WHOLE = ["safe", "unsafe", "\n", ",", "S", *[str(d) for d in range(10)], *IDS, "unsafe\n", "\nS", ",S", "12", "un", "sa", "fe"]


def committed(g: Language, state: ParserState, category: str) -> bool:
    return frozenset({g.outcomes.index(category)}) in g.facts(state).clauses


def test_s1_is_not_committed_until_a_terminator_follows():
    tg, ids = grammar_for(WHOLE)
    g = tg.language
    s1 = tg.read([ids["unsafe"], ids["\n"], ids["S1"]])
    assert not committed(g, s1, "S1")  # S10..S14 are still open
    reachable = g.facts(s1).reachable
    assert IDS.index("S1") in reachable and IDS.index("S10") in reachable
    after_comma = tg.read([ids["unsafe"], ids["\n"], ids["S1"], ids[","]])
    assert committed(g, after_comma, "S1")
    s10 = tg.read([ids["unsafe"], ids["\n"], ids["S1"], ids["0"]])
    assert [t.buffer for t in s10.threads] == ["S10"] and committed(g, s10, "S10")  # no id extends S10
    assert not committed(g, s10, "S1")


def test_every_head_reaches_what_its_branches_reach():
    """The bug of a rule written for the empty head only: 'u', 'un', ..., 'unsafe' may still
    name every category; 's', ..., 'safe' none."""
    g = verdict_language(IDS)
    unsafe = len(IDS)
    for end in range(1, len("unsafe") + 1):
        facts = g.facts(g.walk(g.root, "unsafe"[:end]))
        assert facts.reachable == frozenset(range(len(IDS) + 1))
        assert frozenset({unsafe}) in facts.clauses and frozenset(range(len(IDS))) in facts.clauses
    for end in range(1, len("safe") + 1):
        assert g.facts(g.walk(g.root, "safe"[:end])).reachable == frozenset()
    root = g.facts(g.root)
    assert root.clauses == () and root.reachable == frozenset(range(len(IDS) + 1))


def _verdicts(ids: tuple[str, ...]) -> list[tuple[str, frozenset[str]]]:
    """Every verdict string with the outcomes it names, written from the format's definition."""
    out = [("safe", frozenset())]
    for r in range(1, len(ids) + 1):
        for combo in itertools.permutations(ids, r):
            out.append(("unsafe\n" + ",".join(combo), frozenset(combo) | {"unsafe"}))
    return out


@pytest.mark.parametrize("ids", [("S1",), ("S1", "S2", "S10"), ("a", "ab", "b1"), ("S1", "S11", "S111", "S2")])
def test_facts_of_every_prefix_equal_its_completions(ids):
    """For every prefix of every verdict: the clauses hold on every completion, the reachable set is
    exactly what some completion names, and a category is committed exactly when all completions name it."""
    g = verdict_language(ids)
    verdicts = _verdicts(ids)
    prefixes = {text[:end] for text, _ in verdicts for end in range(len(text) + 1)}
    for prefix in prefixes:
        state = g.walk(g.root, prefix)
        assert state is not None, prefix
        completions = [names for text, names in verdicts if text.startswith(prefix)]
        facts = g.facts(state)
        named = [{g.outcomes.index(n) for n in names} for names in completions]
        assert facts.reachable == frozenset().union(*named), prefix
        for clause in facts.clauses:
            assert all(clause & n for n in named), (prefix, clause)
        for k in range(len(g.outcomes)):
            assert (frozenset({k}) in facts.clauses) == all(k in n for n in named), (prefix, g.outcomes[k])
        for slot in range(len(ids)):
            at = g.slot_facts(state, slot)
            writes = {text[len("unsafe\n"):].split(",")[slot] for text, _ in verdicts
                      if text.startswith(prefix) and text.startswith("unsafe\n") and len(text.split(",")) > slot}
            assert writes <= at.possible, (prefix, slot)
            if at.sure is not None:
                assert writes == {at.sure}, (prefix, slot)


def test_digit_by_digit_equals_whole_id_states():
    tg, ids = grammar_for(WHOLE)
    split = tg.read([ids["unsafe\n"], ids["S"], ids["1"], ids["2"]])
    whole = tg.read([ids["unsafe"], ids["\nS"], ids["12"]])
    assert split == whole == ParserState((Thread(1, 1, 0, (), "S12"),), "unsafe")


def test_transitions_of_a_state():
    tg, ids = grammar_for(WHOLE)
    state = tg.read([ids["unsafe"], ids["\n"], ids["S1"]])
    step = tg.transitions(state)
    allowed = {tg.vocabulary.texts[t] if t else "<eos>" for t in step.candidates}
    assert allowed == {",", ",S", "0", "1", "2", "3", "4", "<eos>"}  # "1" makes S11; S15 does not exist
    assert step.n_eos == 1
    used = tg.read([ids["unsafe\n"], ids["S1"], ids[","], ids["S2"], ids[","]])
    texts = {tg.vocabulary.texts[t] for t in tg.transitions(used).candidates}
    assert "S1" in texts  # S1 may still grow into S10..S14
    done = tg.read([ids["unsafe\n"], ids["S1"], ids[","], ids["S10"], ids[","]])
    assert tg.read([ids["S1"]], done) is not None  # ..."S1" can still become S11
    assert tg.read([ids["S1"], ids[","]], done) is None  # but S1 itself was used


def test_each_id_at_most_once_and_safe_ends():
    g = verdict_language(("S1", "S2"))
    s = g.walk(g.root, "unsafe\nS1,S2")
    assert g.can_end(s) and g.verdict(s).labels == ("S1", "S2")
    assert g.walk(g.root, "unsafe\nS1,S1") is None
    assert g.walk(g.root, "unsafe\nS1,S2,") is None  # nothing left to list
    assert g.walk(g.root, "safe\n") is None
    assert g.can_end(g.walk(g.root, "safe"))
    assert not g.can_end(g.walk(g.root, "unsafe\n"))
    assert g.walk(g.root, " safe") is None  # no leading whitespace


def test_leading_space_tokens_are_not_grammar_tokens(char_tok):
    """A sentencepiece-style '▁safe' decodes to ' safe' after an anchor and is excluded."""
    vocab = Vocabulary.from_tokenizer(char_tok)
    assert vocab.texts[char_tok.convert_tokens_to_ids("s")] == "s"
    assert vocab.texts[char_tok.eos_token_id] is None
    assert vocab.eos_ids == (char_tok.eos_token_id,)


def test_tokenizer_that_cannot_spell_an_id():
    with pytest.raises(GrammarError, match="S7"):
        grammar_for(["safe", "unsafe", "\n", ",", "S1", "S2"], ids=("S1", "S2", "S7"))


def _two_lists(slotted_first: bool) -> tuple[Language, list[tuple[str, frozenset[str], tuple[str, ...], tuple[int, ...]]]]:
    """A language whose verdicts hold two lists, each of which may be left out, and every
    verdict written on strings: (text, outcomes, the slotted list's labels, where each of
    them starts and then where the list ends)."""
    a = Labels(("S1", "S10", "S2"), ("S1", "S10", "S2"), ",", slotted=slotted_first)
    b = Labels(("S1", "S2"), ("r=S1", "r=S2"), ", ", slotted=not slotted_first)
    language = Language([
        Branch(("a:", a, "|b:", b), frozenset({"unsafe"}), first_word="|b:"),
        Branch(("a:", a, "|b:none"), frozenset({"unsafe"})),
        Branch(("a:none|b:", b), frozenset({"b"})),
        Branch(("a:none|b:none",)),
    ], ("S1", "S10", "S2", "unsafe", "b", "r=S1", "r=S2"), first_words=())

    def lists(words, outcome):
        return [(", " if outcome else ",").join(c) for r in range(1, len(words) + 1) for c in itertools.permutations(words, r)]

    verdicts = []
    for first in [None, *lists(("S1", "S10", "S2"), False)]:
        for second in [None, *lists(("S1", "S2"), True)]:
            named = set(first.split(",")) | {"unsafe"} if first else set()
            named |= {"r=" + w for w in second.split(", ")} | ({"b"} if first is None else set()) if second else set()
            slotted = (first if slotted_first else second) or ""
            labels = tuple(w for w in slotted.replace(" ", "").split(",") if w)
            text = f"a:{first or 'none'}|b:{second or 'none'}"
            at = 2 if slotted_first else text.index("|b:") + 3
            spans = tuple(itertools.accumulate((len(w) + (1 if slotted_first else 2) for w in labels), initial=at))
            spans = spans[:-1] + (spans[-1] - (1 if slotted_first else 2),) if labels else ()
            verdicts.append((text, frozenset(named), tuple(("r=" + w) if not slotted_first else w for w in labels), spans))
    return language, verdicts


@pytest.mark.parametrize("slotted_first", [True, False])
def test_two_lists_facts_of_every_prefix_equal_its_completions(slotted_first):
    """Two lists in one branch: clauses, reachable outcomes, the slotted list's slots and the
    first word of every prefix against the completions themselves."""
    g, verdicts = _two_lists(slotted_first)
    marked = {text[: text.index("|b:") + 3] for text, *_ in verdicts if not text.startswith("a:none") and "|b:none" not in text}
    for prefix in {text[:end] for text, *_ in verdicts for end in range(len(text) + 1)}:
        state = g.walk(g.root, prefix)
        assert state is not None, prefix
        completions = [(names, labels, spans) for text, names, labels, spans in verdicts if text.startswith(prefix)]
        named = [{g.index[n] for n in names} for names, _, _ in completions]
        facts = g.facts(state)
        assert facts.reachable == frozenset().union(*named), prefix
        for clause in facts.clauses:
            assert all(clause & n for n in named), (prefix, clause)
        for k in range(len(g.outcomes)):
            assert (frozenset({k}) in facts.clauses) == all(k in n for n in named), (prefix, g.outcomes[k])
        for slot in range(3):
            at = g.slot_facts(state, slot)
            writes = {labels[slot] for _, labels, _ in completions if len(labels) > slot}
            assert writes <= at.possible, (prefix, slot)
            if at.sure is not None or at.closed is not None:
                assert writes == {at.sure or at.closed}, (prefix, slot)
            # begun: the text reaches into the slot's label, or past the end of its list
            begun = any(spans and len(prefix) > spans[min(slot, len(spans) - 1)] for *_, spans in completions)
            assert g.slot_begun(state, slot) == begun, (prefix, slot)
        expected = True if any(prefix.startswith(w) for w in marked) else None if any(w.startswith(prefix) for w in marked) else False
        assert g.first_word(state) is expected, prefix
    for text, names, labels, _ in verdicts:
        state = g.walk(g.root, text)
        assert g.can_end(state), text
        verdict = g.verdict(state)
        assert (verdict.outcomes, verdict.labels) == (names, labels), text
        assert g.write(verdict) == text
    assert g.choices == (("b", "r=S1", "r=S2") if slotted_first else ("S1", "S10", "S2", "b"))


def test_a_branch_has_one_slotted_list():
    both = Labels(("x",), ("x",))
    with pytest.raises(GrammarError, match="slotted"):
        Language([Branch(("a", both, "b", both), frozenset({"unsafe"}))], ("x", "unsafe"), ())


def test_what_measures_say_per_state_is_kept_with_the_grammar_and_bounded(monkeypatch):
    """Every MeasureSet of the same measures on one grammar reads one table (what a state says
    is the same for every prompt's tree), another set of measures its own; the tables start
    afresh once they hold the limit, and a state read again says the same."""
    from guardprob.core.measures import MeasureSet, Outcome, Slot

    letters = sorted(verdict_language(IDS).alphabet - set(WHOLE))  # every character a token: no dead ends
    grammar, vocab = grammar_for(WHOLE + letters)
    assert not grammar.dead_ends
    state = grammar.read([vocab["unsafe"], vocab["\n"], vocab["S1"]])
    outcomes = [Outcome(frozenset({i})) for i in range(len(IDS))]
    first = MeasureSet(grammar, outcomes, constrained=True)
    said = first.at(state)
    again = MeasureSet(grammar, outcomes, constrained=True)
    assert again._cache is first._cache and again.at(state) is said
    assert MeasureSet(grammar, outcomes, constrained=False)._cache is not first._cache  # "sure" differs
    assert MeasureSet(grammar, [Slot(0, IDS[0])], constrained=True)._cache is not first._cache
    with pytest.raises(ValueError):  # shared: nobody may write into what a state says
        said[0][0] = not said[0][0]
    monkeypatch.setattr(TokenGrammar, "_MEMO_LIMIT", 1)
    fresh = MeasureSet(grammar, outcomes, constrained=True)
    assert fresh._cache is not first._cache and not fresh._cache
    assert all((a == b).all() for a, b in zip(fresh.at(state), said))


@pytest.mark.parametrize("seed", [0, 3, 8])
@pytest.mark.parametrize("constrained", [True, False])
def test_scores_read_through_the_shared_tables_equal_those_of_a_fresh_grammar(char_tok, constrained, seed):
    """A classifier that has scored other prompts (its grammar's per-state tables full of their
    states) gives each prompt exactly the scores a fresh classifier, reading fresh tables, gives
    it: every method, every bound. (No prefix cache, no guesses from earlier searches, and one
    prompt per run in both, so the model computes the same numbers and only the tables differ.)"""
    from guardprob import Classifier
    from guardprob.backends.transformers import TransformersBackend
    from helpers import tiny_llama

    tiny_model = tiny_llama(len(char_tok), seed=seed)  # greedy verdicts: unsafe S2,S4; safe; unsafe with six ids
    texts = ["hello there", "how do I hurt him", "bake bread", "steal it now", "hello there again"]
    methods = ("marginal", "conditional", "joint", "first_token")
    settings_ = {"eps": 1e-3, "constrained": constrained, "prior": 0.0}  # no guesses from the earlier searches

    def build() -> Classifier:
        return Classifier(tiny_model, char_tok, taxonomy="llama-guard-3", format="llama-guard-3", name="tiny",
                          backend=TransformersBackend(tiny_model, cache_mb=0))

    warm = build()
    warm.score_methods(texts, methods, **{**settings_, "constrained": not constrained})  # the other mode's tables
    warm.score_methods(texts, methods, **settings_)  # fills the tables with every prompt's states
    for text in texts:
        (got,) = warm.score_methods([text], methods, **settings_)
        (alone,) = build().score_methods([text], methods, **settings_)
        for method in methods:
            a, b = got[method], alone[method]
            assert (a.p_unsafe, a.p_unsafe_lower, a.p_unsafe_upper) == (b.p_unsafe, b.p_unsafe_lower, b.p_unsafe_upper)
            for cid in a.categories:
                assert a.categories[cid] == b.categories[cid], (method, cid)
