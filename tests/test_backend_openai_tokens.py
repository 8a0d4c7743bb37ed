"""Reading a server's top-k answer: strings back to ids, and a true bound on what is missing."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("httpx")

from guardprob.backends.openai import OpenAIOptions, TokenIndex, read_top_logprobs  # noqa: E402
from guardprob.errors import BackendError, InputError  # noqa: E402


@pytest.fixture(scope="module")
def index(char_tok):
    return TokenIndex(char_tok)


def test_strings_resolve_to_ids_and_ambiguity_is_kept(index, char_tok):
    s = char_tok.convert_tokens_to_ids("s")
    assert index.resolve("s") == s
    assert index.resolve(f"token_id:{s}") == s
    # The specials are spelled "" by llama.cpp: several ids, never one of them.
    empty = index.resolve("")
    assert isinstance(empty, frozenset) and {0, 1, 2} <= empty
    assert index.resolve("no such token") is None


def _top(logprobs: np.ndarray, k: int, spell) -> dict[str, float]:
    """What a server returns: the k largest, one value per string (later ones overwrite, as in
    llama-cpp-python), then the sampled (greedy) token's own entry."""
    order = np.argsort(-logprobs)[:k]
    top = {spell(int(i)): float(logprobs[i]) for i in order}
    top[spell(int(order[0]))] = float(logprobs[order[0]])
    return top


@pytest.mark.parametrize("k", [1, 3, 8, 40])
def test_unreported_bounds_the_missing_candidates(index, char_tok, k):
    rng = np.random.default_rng(k)
    size = len(char_tok)
    for _ in range(20):
        logits = rng.normal(size=size) * 3
        logprobs = logits - np.log(np.exp(logits).sum())
        candidates = rng.choice(size, 12, replace=False)

        def llama_cpp_spelling(i: int) -> str:
            return "" if i < 3 else char_tok.convert_ids_to_tokens(i)

        for spell in (llama_cpp_spelling, lambda i: f"token_id:{i}"):
            answer = read_top_logprobs(_top(logprobs, k, spell), candidates, index)
            known = ~np.isnan(answer.logprobs)
            np.testing.assert_allclose(answer.logprobs[known], logprobs[candidates][known])
            assert np.exp(logprobs[candidates][~known]).sum() <= answer.unreported + 1e-12
            assert answer.top_logprob == pytest.approx(logprobs.max())


def test_bad_answers_and_options():
    with pytest.raises(BackendError):
        read_top_logprobs({"s": 0.5}, np.array([3]), TokenIndex.__new__(TokenIndex))
    with pytest.raises(InputError):
        OpenAIOptions(top_logprobs=0)
    with pytest.raises(InputError):
        OpenAIOptions(prompt_format="bytes")
    assert math.isfinite(OpenAIOptions().timeout)


def test_both_reply_forms_are_read(index, char_tok):
    """The completions form (string -> log-probability) and llama-server's list form, whose
    entries name the token id (taken as is) or only the string (resolved like the first)."""
    from guardprob.backends.openai import _top

    s, a = char_tok.convert_tokens_to_ids("s"), char_tok.convert_tokens_to_ids("a")
    classic = {"choices": [{"logprobs": {"top_logprobs": [{"s": -0.1, "a": -2.5}]}}]}
    listed = {"choices": [{"logprobs": {"content": [{"id": s, "token": "s", "logprob": -0.1, "top_logprobs": [
        {"id": s, "token": "s", "logprob": -0.1}, {"id": a, "token": "", "logprob": -2.5}]}]}}]}
    strings = {"choices": [{"logprobs": {"content": [{"token": "s", "logprob": -0.1, "top_logprobs": [
        {"token": "s", "logprob": -0.1}, {"token": "a", "logprob": -2.5}]}]}}]}
    for reply in (classic, listed, strings):
        answer = read_top_logprobs(_top(reply, "http://x/v1"), np.array([s, a]), index)
        np.testing.assert_allclose(answer.logprobs, [-0.1, -2.5])
    # an id the vocabulary does not have claims nothing, so the candidate stays unknown
    wild = {"choices": [{"logprobs": {"content": [{"top_logprobs": [
        {"id": s, "token": "s", "logprob": -0.1}, {"id": 10**6, "token": "a", "logprob": -2.5}]}]}}]}
    answer = read_top_logprobs(_top(wild, "http://x/v1"), np.array([s, a]), index)
    assert np.isnan(answer.logprobs[1]) and answer.unreported >= math.exp(-2.5) - 1e-12
    for broken in ({}, {"choices": [{"logprobs": None}]}, {"choices": [{"logprobs": {"content": []}}]},
                   {"choices": [{"logprobs": {"content": [{"top_logprobs": [{"logprob": -1}]}]}}]}):
        with pytest.raises(BackendError, match="logprobs"):
            _top(broken, "http://x/v1")
