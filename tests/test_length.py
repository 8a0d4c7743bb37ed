"""Length before tokenizing: a conversation too long for the model's context is refused by its
characters, before the tokenizer reads it, on every path that renders (Python, CLI, eval,
service: all of them through Classifier.prompt). A 50 MB row took minutes and gigabytes."""

from __future__ import annotations

import json
import tracemalloc
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardprob import ContextLengthError
from guardprob.formats.length import NORMALIZER_SLACK, character_limit, longest_token

BIG = 50_000_000  # characters: the 50 MB row
MEMORY_BOUND = 16 * 2**20  # bytes allocated while refusing it (the tokenizer took 7.4 GB)


@pytest.fixture()
def counted(tiny_classifier, monkeypatch):
    """The tiny classifier with every way into its tokenizer counted (and guardprob's reader of text):
    ``calls`` holds (name, characters of the longest text argument)."""
    import guardprob.formats.base

    calls = []
    tok = tiny_classifier.tokenizer

    def counting(name, original):
        def call(*args, **kwargs):
            calls.append((name, _longest(args)))
            return original(*args, **kwargs)
        return call

    for name in ("encode", "tokenize", "apply_chat_template", "batch_decode", "decode"):
        monkeypatch.setattr(tok, name, counting(name, getattr(tok, name)))
    original_call = type(tok).__call__

    def call(self, *args, **kwargs):
        if self is tok:
            calls.append(("__call__", _longest(args)))
        return original_call(self, *args, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", call)
    monkeypatch.setattr(guardprob.formats.base, "text_ids", counting("text_ids", guardprob.formats.base.text_ids))
    return tiny_classifier, calls


def _longest(args) -> int:
    return max((len(a) for a in args if isinstance(a, str)), default=0)


def _read_long_text(calls) -> bool:
    return any(n > 5_000 for _, n in calls)  # the tiny model's bound is 8,192 characters


def test_the_counting_tokenizer_counts(counted):
    clf, calls = counted
    with pytest.raises(ContextLengthError, match="tokens"):
        clf.prompt("hello " * 1_000)  # under the bound in characters, past the context in tokens
    assert _read_long_text(calls)  # so that no such call below means the tokenizer never read the long text


def _limit(clf) -> int:
    context, longest, _ = clf._character_bound
    return character_limit(context, longest)


@pytest.mark.parametrize("entry", ["prompt", "score", "score_batch"])
def test_a_50_mb_message_is_refused_before_the_tokenizer_runs(counted, entry):
    clf, calls = counted
    text = "a" * BIG
    tracemalloc.start()
    try:
        with pytest.raises(ContextLengthError, match=f"more than the {_limit(clf):,} that the model's context") as info:
            if entry == "prompt":
                clf.prompt(text)
            elif entry == "score":
                clf.score(text, "greedy")
            else:
                clf.score_batch(["hi", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": text}]],
                                "greedy")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not _read_long_text(calls)
    assert peak < MEMORY_BOUND
    assert "50,000,00" in str(info.value) and "shorten the conversation" in str(info.value)


def test_a_conversation_just_under_the_bound_is_tokenized_and_checked_by_its_tokens(counted):
    clf, calls = counted
    limit = _limit(clf)
    with pytest.raises(ContextLengthError, match="tokens and the verdict may need"):
        clf.prompt("a" * limit)  # one character per token here: far past the context, found by its tokens
    assert _read_long_text(calls)


def test_eval_refuses_a_50_mb_row_before_tokenizing(tmp_path, counted):
    from guardprob.evaluation import evaluate

    clf, calls = counted
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello", "labels": []}) + "\n"
                    + json.dumps({"text": "a" * BIG, "labels": ["S1"]}) + "\n", encoding="utf-8")
    with pytest.raises(ContextLengthError, match="characters, more than"):
        evaluate(data, classifier=clf, out=tmp_path / "out", methods=["greedy"], params={"max_nodes": 5},
                 progress=False, show=False, batch_size=2)
    assert not _read_long_text(calls)


def test_the_limit_falls_back_to_the_tokenizer_and_then_to_the_assumed_context():
    from guardprob.formats.length import UNKNOWN_CONTEXT, context_tokens

    class Tok:
        model_max_length = 4096

    assert context_tokens(8192, Tok()) == (8192, "the model's context")
    assert context_tokens(None, Tok())[0] == 4096
    Tok.model_max_length = int(1e30)  # transformers' "no limit"
    assert context_tokens(None, Tok())[0] == UNKNOWN_CONTEXT


# -- the bound is sound: no text has more characters per token than the bound allows -----------------
def _texts():
    combining = st.text(st.characters(categories=["Mn"]), min_size=1, max_size=4)
    composing = st.builds(lambda base, marks: unicodedata.normalize("NFD", base + marks),
                          st.sampled_from("aeoαωᾳἀ가"), combining)
    return st.lists(st.one_of(st.text(max_size=30), composing, st.sampled_from([" " * 40, "=" * 64, "\n" * 30, "0" * 50])),
                    min_size=1, max_size=6).map("".join)


@pytest.mark.parametrize("name", ["default", "llama-bpe", "llama-spm", "qwen2", "deepseek-llm"])
def test_no_text_has_more_characters_per_token_than_the_bound(name, request):
    from guardprob.core.grammar import Vocabulary

    if name == "default":
        tok = request.getfixturevalue("default_classifier").tokenizer
    else:
        from vocabs import vocab

        tok = vocab(name)
    longest = longest_token(Vocabulary.from_tokenizer(tok).texts)

    @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(_texts())
    def check(text):
        tokens = len(tok.encode(text, add_special_tokens=False, split_special_tokens=True))
        assert len(text) <= max(tokens, 1) * longest * NORMALIZER_SLACK

    check()
