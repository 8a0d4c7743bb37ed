"""The verdict grammar: states, commitment, and tokenizers that split ids differently."""

from __future__ import annotations

import pytest

from guardprob.errors import GrammarError
from guardprob.grammar import ParserState, TokenGrammar, VerdictGrammar, Vocabulary

IDS = tuple(f"S{i}" for i in range(1, 15))


def grammar_for(pieces: list[str], ids=IDS) -> tuple[TokenGrammar, dict[str, int]]:
    texts = ["<eos>", *pieces]
    vocab = Vocabulary(tuple(None if i == 0 else t for i, t in enumerate(texts)), (0,))
    return TokenGrammar(VerdictGrammar(ids), vocab), {t: i for i, t in enumerate(texts)}


WHOLE = ["safe", "unsafe", "\n", ",", "S", *[str(d) for d in range(10)], *IDS, "unsafe\n", "\nS", ",S", "12", "un", "sa", "fe"]


def test_s1_is_not_committed_until_a_terminator_follows():
    tg, ids = grammar_for(WHOLE)
    g = tg.grammar
    s1 = tg.read([ids["unsafe"], ids["\n"], ids["S1"]])
    committed, possible = g.flags(s1)
    assert not committed[IDS.index("S1")]  # S10..S14 are still open
    assert possible[IDS.index("S1")] and possible[IDS.index("S10")]
    after_comma = tg.read([ids["unsafe"], ids["\n"], ids["S1"], ids[","]])
    assert g.flags(after_comma)[0][IDS.index("S1")]
    s10 = tg.read([ids["unsafe"], ids["\n"], ids["S1"], ids["0"]])
    assert s10.buffer == "S10" and g.flags(s10)[0][IDS.index("S10")]  # no id extends S10
    assert not g.flags(s10)[0][IDS.index("S1")]


def test_digit_by_digit_equals_whole_id_states():
    tg, ids = grammar_for(WHOLE)
    split = tg.read([ids["unsafe\n"], ids["S"], ids["1"], ids["2"]])
    whole = tg.read([ids["unsafe"], ids["\nS"], ids["12"]])
    assert split == whole == ParserState("unsafe\n", (), "S12")


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
    g = VerdictGrammar(("S1", "S2"))
    s = g.walk(ParserState(), "unsafe\nS1,S2")
    assert g.can_end(s) and g.verdict(s).ids == ("S1", "S2")
    assert g.walk(ParserState(), "unsafe\nS1,S1") is None
    assert g.walk(ParserState(), "unsafe\nS1,S2,") is None  # nothing left to list
    assert g.walk(ParserState(), "safe\n") is None
    assert g.can_end(g.walk(ParserState(), "safe"))
    assert not g.can_end(g.walk(ParserState(), "unsafe\n"))
    assert g.walk(ParserState(), " safe") is None  # no leading whitespace


def test_leading_space_tokens_are_not_grammar_tokens(char_tok):
    """A sentencepiece-style '▁safe' decodes to ' safe' after an anchor and is excluded."""
    vocab = Vocabulary.from_tokenizer(char_tok)
    assert vocab.texts[char_tok.convert_tokens_to_ids("s")] == "s"
    assert vocab.texts[char_tok.eos_token_id] is None
    assert vocab.eos_ids == (char_tok.eos_token_id,)


def test_tokenizer_that_cannot_spell_an_id():
    with pytest.raises(GrammarError, match="S7"):
        grammar_for(["safe", "unsafe", "\n", ",", "S1", "S2"], ids=("S1", "S2", "S7"))
