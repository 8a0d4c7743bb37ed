"""Chunked prefill: a prompt's prefill runs at most ``prefill_chunk`` tokens per model call, one
chunk per ``step()``, so other work runs between its chunks and a stop acts at the next one.

The scores do not depend on the chunk size (against the engine prefilling in one call, with
prefix-cache hits and misses), a run over a long prompt yields after every chunk, and runs
stopped at any step leave no keys, rows, prefills or cache entries behind, with every score
inside its bounds ([0, 1] and incomplete when the prefill had not finished).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardprob import Classifier
from guardprob.backends.base import Prompt, Query
from guardprob.backends.transformers import DEFAULT_PREFILL_CHUNK, TransformersBackend
from guardprob.errors import InputError
from guardprob.spec import ClassifierSpec
from helpers import CHARS
from servers import ENGINE_THREADS

SETTINGS = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SEARCH = dict(eps=0.05)
TEXT = st.text(alphabet=CHARS[:60], min_size=1, max_size=120).filter(str.strip)  # blank text is refused


def _gemma(vocab: int):
    """Sliding-window and full layers (Gemma 3), a window shorter than most chunks."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], max_position_embeddings=2048,
        attn_implementation="eager",
    )
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def models(tiny_model, char_tok):
    return {"llama": tiny_model, "gemma3-sliding-window": _gemma(len(char_tok))}


def _classifier(model, tok, **backend) -> Classifier:
    return Classifier(model, tok, taxonomy="llama-guard-3", format="llama-guard-3", name="tiny",
                      backend=TransformersBackend(model, **backend))


def _assert_same(got, want, tol=1e-6):
    assert got.expanded_nodes == want.expanded_nodes
    for k, c in want.categories.items():
        g = got.categories[k]
        assert abs(g.p - c.p) <= tol and abs(g.lower - c.lower) <= tol and abs(g.upper - c.upper) <= tol, k
    assert abs(got.p_unsafe - want.p_unsafe) <= tol


def _assert_within_bounds(s):
    for c in s.categories.values():
        assert -1e-12 <= c.lower <= c.p <= c.upper <= 1 + 1e-12
    assert s.p_unsafe_lower - 1e-12 <= s.p_unsafe <= s.p_unsafe_upper + 1e-12


def _assert_untouched(s):
    """Stopped before its prefill finished: nothing known."""
    assert not s.complete and s.expanded_nodes == 0
    assert all((c.lower, c.upper) == (0.0, 1.0) for c in s.categories.values())
    assert (s.p_unsafe_lower, s.p_unsafe_upper) == (0.0, 1.0)


# -- scores do not depend on the chunk ---------------------------------------------------------
@pytest.mark.parametrize("shape", ["llama", "gemma3-sliding-window"])
@SETTINGS
@given(texts=st.lists(TEXT, min_size=1, max_size=3), chunk=st.integers(16, 64), cache=st.booleans(), data=st.data())
def test_chunked_scores_equal_unchunked(models, char_tok, shape, texts, chunk, cache, data):
    """Batches scored one after the other, so later prompts hit what earlier ones cached
    (the template's header, a repeated text) where the cache is on. (Chunks from 1 token:
    the engine-level test below; the template's ~900 tokens make them slow here.)"""
    model = models[shape]
    whole = _classifier(model, char_tok, cache_mb=0, prefill_chunk=None)
    chunked = _classifier(model, char_tok, cache_mb=64 if cache else 0, prefill_chunk=chunk)
    batches = [texts, data.draw(st.lists(st.sampled_from(texts) | TEXT, min_size=1, max_size=3), label="second")]
    for batch in batches:
        for got, want in zip(chunked.score_batch(batch, **SEARCH), whole.score_batch(batch, **SEARCH)):
            _assert_same(got, want)
            _assert_within_bounds(got)
    if cache:
        assert chunked.backend.cache_stats().hits > 0  # the header came from the cache


@pytest.mark.parametrize("shape", ["llama", "gemma3-sliding-window"])
@SETTINGS
@given(lengths=st.lists(st.integers(1, 90), min_size=1, max_size=4), chunk=st.integers(1, 64),
       shared=st.integers(0, 40), seed=st.integers(0, 2**16))
def test_chunked_engine_answers_equal_unchunked(models, shape, lengths, chunk, shared, seed):
    """Engine level, over the whole vocabulary: prompts sharing a prefix (run once for the batch)."""
    model = models[shape]
    vocab = model.config.vocab_size
    rng = np.random.default_rng(seed)
    head = tuple(int(x) for x in rng.integers(3, vocab, shared))
    prompts = [Prompt(head + tuple(int(x) for x in rng.integers(3, vocab, n))) for n in lengths]
    queries = [Query(b, path, np.arange(vocab)) for b in range(len(prompts)) for path in [(), (5,), (5, 7)]]
    want = TransformersBackend(model, cache_mb=0, prefill_chunk=None).open(prompts).next_tokens(queries)
    session = TransformersBackend(model, cache_mb=0, prefill_chunk=chunk).begin(prompts)
    steps = 0
    while session.prefilling:
        before = session.usage.prompt_tokens
        session.prefill_step()
        steps += 1
        assert session.usage.prompt_tokens - before <= chunk
    assert steps == session.usage.model_calls  # a step is one model call
    assert session.usage.prompt_tokens <= sum(len(p.ids) for p in prompts)
    got = session.next_tokens(queries)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5, rtol=0)  # log-probabilities: float32 sums in another order


# -- yielding -----------------------------------------------------------------------------------
def test_a_long_prompt_yields_after_each_chunk(tiny_model, char_tok):
    clf = _classifier(tiny_model, char_tok, cache_mb=0, prefill_chunk=16)
    prompt = clf.prompt("tell me a long story " * 12)
    run = clf.start([prompt], **SEARCH)
    usage = run._run.session.usage
    grown = []
    while run._run.session.prefilling:
        before, calls = usage.prompt_tokens, usage.model_calls
        assert run.step()
        grown.append(usage.prompt_tokens - before)
        assert usage.model_calls - calls <= 2  # the chunk, and the first round once the last chunk ran
    assert all(0 < n <= 16 for n in grown) and sum(grown) == len(prompt.ids)
    assert len(grown) == -(-len(prompt.ids) // 16)
    run.finish()
    _assert_same(run.results()[0]["marginal"], _classifier(tiny_model, char_tok, prefill_chunk=None).score_ids(prompt.ids, **SEARCH))


def test_rounds_of_others_run_between_the_chunks_of_a_long_prompt(tiny_model, char_tok):
    """Continuous batching: a short request that joins a pool while a long prompt prefills is
    answered before the long prompt's prefill ends (prefills take turns, one chunk each)."""
    clf = _classifier(tiny_model, char_tok, cache_mb=0, prefill_chunk=16)
    pool = clf.pool()
    long = pool.join([clf.prompt("a very long message that goes on " * 10)], **SEARCH)
    pool.step()
    short = pool.join([clf.prompt("hi")], **SEARCH)
    session = pool.running.session
    while not short.done:
        assert pool.step()
    assert session.prefilling  # the long prompt is still being prefilled
    assert not long.done
    short_scores = short.results()[0]["marginal"]
    short.close()
    while not long.done:
        pool.step()
    long_scores = long.results()[0]["marginal"]
    long.close()
    pool.close()
    whole = _classifier(tiny_model, char_tok, prefill_chunk=None)
    _assert_same(short_scores, whole.score("hi", **SEARCH))
    _assert_same(long_scores, whole.score("a very long message that goes on " * 10, **SEARCH))


def test_separate_runs_interleave_between_chunks(tiny_model, char_tok):
    clf = _classifier(tiny_model, char_tok, cache_mb=0, prefill_chunk=8)
    long = clf.start([clf.prompt("x" * 200)], **SEARCH)
    short = clf.start([clf.prompt("hi")], **SEARCH)
    long.step()
    while short.step():
        pass
    assert long._run.session.prefilling
    short.close()
    long.finish()
    assert long.results()[0]["marginal"].complete


# -- stops ----------------------------------------------------------------------------------------
def _assert_session_empty(session, cache_before, backend):
    assert not session.prefilling
    assert not session._batches and not session._waiting
    assert session.active == [] and session.rows == {} and session.root == {} and session.layers == []
    if backend.cache is not None:
        assert backend.cache_stats().tokens_held == cache_before


@pytest.mark.parametrize("shape", ["llama", "gemma3-sliding-window"])
@SETTINGS
@given(lengths=st.lists(st.integers(20, 160), min_size=1, max_size=3), chunk=st.integers(1, 48),
       stop_after=st.integers(0, 12), cache=st.booleans(), seed=st.integers(0, 2**16))
def test_stops_at_random_chunks_leave_nothing_behind(models, char_tok, shape, lengths, chunk, stop_after, cache, seed):
    """A run stopped (a deadline, a cancel) after a random number of steps: its scores keep
    within their bounds, prompts whose prefill had not finished answer [0, 1], and the engine
    holds no key, row or prefill of it; the prefix cache holds nothing from unfinished prompts."""
    model = models[shape]
    clf = _classifier(model, char_tok, cache_mb=64 if cache else 0, prefill_chunk=chunk)
    rng = np.random.default_rng(seed)
    texts = ["".join(rng.choice(list("abcdefgh "), n)) for n in lengths]
    prompts = [clf.prompt(t) for t in texts]
    run = clf.start(prompts, **SEARCH)
    session = run._run.session
    cache = clf.backend.cache
    for _ in range(stop_after):
        if not run.step():
            break
    unfinished = set(session.prefilling)
    held = cache.stats().tokens_held if cache is not None else 0
    run.stop_all()
    while run.step():
        pass
    run.close()
    _assert_session_empty(session, held, clf.backend)
    for p, (prompt, scores) in enumerate(zip(prompts, run.results())):
        s = scores["marginal"]
        _assert_within_bounds(s)
        if p in unfinished:
            _assert_untouched(s)
            if cache is not None:  # its own tokens (after the template's header) were not kept
                assert cache.match(prompt.ids) < len(prompt.ids)


@SETTINGS
@given(joins=st.lists(st.tuples(st.integers(5, 120), st.integers(0, 80) | st.none()), min_size=1, max_size=4),
       chunk=st.integers(16, 64), cache=st.booleans(), seed=st.integers(0, 2**16))
def test_pool_runs_closed_at_random_steps_leave_nothing_behind(tiny_model, char_tok, joins, chunk, cache, seed):
    """Requests join a pool and are closed (a disconnect, a timeout) after a random number of
    steps (None: never), mid-prefill or mid-search; those that finish score as an unchunked
    engine does."""
    clf = _classifier(tiny_model, char_tok, cache_mb=64 if cache else 0, prefill_chunk=chunk)
    whole = _classifier(tiny_model, char_tok, cache_mb=0, prefill_chunk=None)
    rng = np.random.default_rng(seed)
    pool = clf.pool()
    live = []
    for n, steps in joins:
        text = "".join(rng.choice(list("abcdefgh "), n))
        live.append((pool.join([clf.prompt(text)], **SEARCH), text, steps))
        pool.step()
    session = pool.running.session
    for tick in range(5000):
        for entry in list(live):
            run, text, steps = entry
            if tick == steps and not run.done:  # gone before it finished
                prefilling = bool(session.prefilling)
                run.close()
                s = run.results()[0]["marginal"]
                _assert_within_bounds(s)
                if s.expanded_nodes == 0:
                    assert prefilling
                    _assert_untouched(s)
                live.remove(entry)
            elif run.done:
                run.close()
                _assert_same(run.results()[0]["marginal"], whole.score(text, **SEARCH))
                live.remove(entry)
        if not live:
            break
        pool.step()
    assert not live
    _assert_session_empty(session, clf.backend.cache_stats().tokens_held if cache else 0, clf.backend)
    pool.close()


def test_a_deadline_inside_the_prefill_answers_with_no_knowledge(tiny_model, char_tok):
    """The deadline has passed by the end of the first step (one chunk): the answer comes
    then, with bounds [0, 1] and complete false, instead of after the whole prefill."""
    clf = _classifier(tiny_model, char_tok, prefill_chunk=4)
    text = "a long question about many things " * 6
    s = clf.score(text, deadline=1e-9, **SEARCH)
    _assert_untouched(s)
    assert s.model_calls == 0
    assert clf.backend.cache.match(clf.prompt(text).ids) < len(clf.prompt(text).ids)


# -- settings ------------------------------------------------------------------------------------
def test_the_chunk_setting_is_checked(tiny_model):
    for bad in (0, -3, 2.5, True, "256"):
        with pytest.raises(InputError, match="prefill_chunk"):
            TransformersBackend(tiny_model, prefill_chunk=bad)
        with pytest.raises(InputError, match="prefill_chunk"):
            ClassifierSpec(prefill_chunk=bad)
    with pytest.raises(InputError, match="openai engine"):
        ClassifierSpec(backend="openai", base_url="http://127.0.0.1:1/v1", prefill_chunk=64)
    assert TransformersBackend(tiny_model).prefill_chunk == DEFAULT_PREFILL_CHUNK
    assert TransformersBackend(tiny_model, prefill_chunk=None).prefill_chunk is None


def test_an_engine_that_prefills_at_once_still_steps(tiny_model, char_tok):
    """The naive engine has no stepped prefill: a run still answers, as before."""
    from guardprob.backends.naive import NaiveBackend

    naive = Classifier(tiny_model, char_tok, taxonomy="llama-guard-3", format="llama-guard-3",
                       backend=NaiveBackend(tiny_model))
    got = naive.score("hello", **SEARCH)
    _assert_same(got, _classifier(tiny_model, char_tok, prefill_chunk=1).score("hello", **SEARCH), tol=1e-4)


# -- llama.cpp ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf():
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python not installed")
    from guardprob.models import default_gguf

    path = default_gguf()
    if not path.is_file():
        pytest.skip("the default GGUF is not installed")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [7, 64])
def test_llamacpp_prefills_in_n_batch_steps(gguf, chunk):
    from guardprob.backends.llamacpp import LlamaCppBackend, LlamaCppOptions

    rng = np.random.default_rng(chunk)
    prompts = [Prompt(tuple(int(x) for x in rng.integers(100, 40000, n))) for n in (150, 40)]
    queries = [Query(b, path, np.arange(100, 400)) for b in range(2) for path in [(), (300,), (300, 301)]]
    backend = LlamaCppBackend(gguf, LlamaCppOptions(n_threads=ENGINE_THREADS), prefill_chunk=chunk)
    try:
        want = [a.logprobs for a in backend.open(prompts).next_tokens(queries)]
        session = backend.begin(prompts)
        steps = 0
        while session.prefilling:
            before = session.usage.prompt_tokens
            session.prefill_step()
            steps += 1
            assert 0 < session.usage.prompt_tokens - before <= chunk
        assert steps == sum(-(-len(p.ids) // chunk) for p in prompts)
        got = [a.logprobs for a in session.next_tokens(queries)]
        # one chunk size in both: the same decodes give the same numbers
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, atol=1e-6, rtol=0)
        # stopped mid-prefill: the prompt leaves (no prefill left, no query taken)
        stopped = backend.begin(prompts)
        stopped.prefill_step()
        stopped.release(0)
        stopped.release(1)
        assert not stopped.prefilling
        with pytest.raises(InputError, match="released"):
            stopped.next_tokens(queries[:1])
        stopped.close()
    finally:
        backend.close()


@pytest.mark.slow
def test_llamacpp_chunk_sizes_agree_within_the_engine_tolerance(gguf):
    """Different decode sizes may pick other kernels: the answers agree to the engine's own
    tolerance against itself (measured far below the conformance tolerance)."""
    from guardprob.backends.llamacpp import LlamaCppBackend, LlamaCppOptions

    rng = np.random.default_rng(1)
    prompts = [Prompt(tuple(int(x) for x in rng.integers(100, 40000, 120)))]
    queries = [Query(0, path, np.arange(100, 400)) for path in [(), (300,)]]
    answers = []
    for chunk in (512, 16):
        backend = LlamaCppBackend(gguf, LlamaCppOptions(n_threads=ENGINE_THREADS), prefill_chunk=chunk)
        try:
            answers.append([np.exp(a.logprobs) for a in backend.open(prompts).next_tokens(queries)])
        finally:
            backend.close()
    for a, b in zip(*answers):
        np.testing.assert_allclose(a, b, atol=1e-3, rtol=0)


def test_the_chunk_is_set_from_the_command_line_and_the_server_config(tmp_path):
    import argparse

    from guardprob.commands.options import spec_from_args
    from guardprob.server import cli
    from guardprob.server.config import load_config

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--prefill-chunk", "64"])
    assert spec_from_args(args).prefill_chunk == 64
    assert cli.build_config(args).prefill_chunk == 64
    (tmp_path / "server.yaml").write_text("prefill_chunk: 128\n")
    assert load_config(tmp_path / "server.yaml").prefill_chunk == 128
    (tmp_path / "bad.yaml").write_text("prefill_chunk: 0\n")
    with pytest.raises(InputError, match="field 'prefill_chunk'"):
        load_config(tmp_path / "bad.yaml")
