"""The prefix cache across requests: the radix tree itself, exactness of the transformers engine
with it (tiny random models of several shapes, and the default model), its budget, its
settings, and its metrics through a real server."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardprob.backends.base import Prompt, Query, common_prefix
from guardprob.backends.prefix_cache import PrefixCache
from guardprob.backends.transformers import TransformersBackend
from guardprob.errors import InputError

TOKEN_BYTES = 2 * 4  # the synthetic entries below: [1 layer, 2, 1 head, tokens, 1] float32


def entry(ids, start: int, end: int) -> torch.Tensor:
    """A synthetic entry whose keys and values are the token ids themselves, so content is checkable."""
    values = torch.tensor(ids[start:end], dtype=torch.float32)
    return values.reshape(1, 1, 1, -1, 1).expand(1, 2, 1, -1, 1).clone()


def check_content(cache: PrefixCache, ids) -> int:
    match = cache.lookup(ids)
    if match.tokens:
        kv = match.kv()
        assert kv.shape == (1, 2, 1, match.tokens, 1)
        assert kv[0, 0, 0, :, 0].tolist() == list(ids[: match.tokens])
    return match.tokens


def check_memory(cache: PrefixCache) -> None:
    stats = cache.stats()
    held = sum(t.untyped_storage().nbytes() for t in cache.entries())  # what the tensors really take
    assert held == stats.bytes_held == stats.tokens_held * TOKEN_BYTES
    if stats.budget_bytes is not None:
        assert held <= stats.budget_bytes


# -- the tree ---------------------------------------------------------------------------------
def test_longest_prefix_across_split_edges():
    cache = PrefixCache(None, TOKEN_BYTES)
    a, b, c = (1, 2, 3, 4, 5, 6), (1, 2, 3, 9, 9), (1, 2, 3, 4, 7)
    for ids in (a, b, c):
        known = cache.match(ids)
        assert cache.insert(ids, lambda s, e, ids=ids: entry(ids, s, e)) == len(ids) - known
    assert cache.stats().tokens_held == 6 + 2 + 1  # the shared tokens are held once
    assert check_content(cache, (1, 2, 3, 4, 5, 6, 8)) == 6
    assert check_content(cache, (1, 2, 3, 4, 7, 7)) == 5
    assert check_content(cache, (1, 2, 3, 8)) == 3
    assert check_content(cache, (2, 2)) == 0
    assert cache.match(a, limit=4) == 4 and cache.match(a, limit=len(a) - 1) == 5
    check_memory(cache)


def test_insert_asks_only_for_missing_tokens():
    cache = PrefixCache(None, TOKEN_BYTES)
    asked = []

    def fetch(ids):
        return lambda s, e: asked.append((s, e)) or entry(ids, s, e)

    cache.insert((5, 6, 7), fetch((5, 6, 7)))
    cache.insert((5, 6, 7, 8, 9), fetch((5, 6, 7, 8, 9)))
    assert cache.insert((5, 6, 7), fetch((5, 6, 7))) == 0
    assert asked == [(0, 3), (3, 5)]


def test_least_recently_used_leaf_is_evicted_first():
    cache = PrefixCache(8 * TOKEN_BYTES, TOKEN_BYTES)
    a, b, c = (1, 1, 1), (2, 2, 2), (3, 3, 3)
    for ids in (a, b):
        cache.insert(ids, lambda s, e, ids=ids: entry(ids, s, e))
    cache.lookup(a)  # a is now more recent than b
    cache.insert(c, lambda s, e: entry(c, s, e))
    assert cache.match(a) == 3 and cache.match(b) == 0 and cache.match(c) == 3
    assert cache.stats().evictions == 1
    check_memory(cache)


def test_what_does_not_fit_is_left_out():
    cache = PrefixCache(10 * TOKEN_BYTES, TOKEN_BYTES)
    ids = tuple(range(10, 29))
    assert cache.insert(ids, lambda s, e: entry(ids, s, e)) == 5  # the front of the prompt: half the budget
    assert check_content(cache, ids) == 5
    assert cache.insert(ids, lambda s, e: entry(ids, s, e)) == 5  # read again: it may grow by as much again
    assert check_content(cache, ids) == 10
    longer = (10, 11, 12, 99, 98, 97)  # shares 3 tokens: the rest of the old entry makes room
    assert cache.insert(longer, lambda s, e: entry(longer, s, e)) == 3
    assert check_content(cache, longer) == 6 and check_content(cache, ids) == 5  # its later half made room
    check_memory(cache)


def test_a_prompt_longer_than_the_cache_leaves_what_others_share():
    """One insert takes at most half the budget: a long conversation does not evict the prefix
    every short request reads (the template's), which was used more recently than the rest."""
    cache = PrefixCache(20 * TOKEN_BYTES, TOKEN_BYTES)
    old, template = tuple(range(100, 108)), tuple(range(8))
    for ids in (old, template):
        cache.insert(ids, lambda s, e, ids=ids: entry(ids, s, e))
    long = tuple(range(200, 260))
    assert cache.insert(long, lambda s, e: entry(long, s, e)) == 10
    assert check_content(cache, template) == len(template)  # the recent shared prefix stays
    assert check_content(cache, old) == 0  # the least recently used entry made room
    assert check_content(cache, long) == 10
    check_memory(cache)


def test_a_budget_of_zero_keeps_nothing():
    cache = PrefixCache(0, TOKEN_BYTES)
    assert cache.insert((1, 2, 3), lambda s, e: pytest.fail("nothing may be fetched")) == 0
    assert cache.match((1, 2, 3)) == 0 and cache.stats().bytes_held == 0


def test_trim_keeps_only_the_given_prefixes():
    cache = PrefixCache(None, TOKEN_BYTES)
    for ids in ((1, 2, 3, 4), (1, 2, 5, 6), (7, 8)):
        cache.insert(ids, lambda s, e, ids=ids: entry(ids, s, e))
    cache.trim([(1, 2, 3)])
    assert cache.match((1, 2, 3, 4)) == 3 and cache.match((1, 2, 5, 6)) == 2 and cache.match((7, 8)) == 0
    check_memory(cache)
    cache.trim()
    assert cache.stats().tokens_held == 0 and cache.entries() == []


@settings(max_examples=150, deadline=None)
@given(
    seqs=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=1, max_size=12),
    budget=st.one_of(st.none(), st.integers(0, 40)),
    reads=st.lists(st.integers(0, 11), max_size=8),
)
def test_tree_against_a_plain_list(seqs, budget, reads):
    """Any inserts (token ids from a small alphabet, so prefixes are shared) and lookups: the
    content of every match is the prompt's own; without a budget the match is the longest
    prefix shared with anything inserted; with one, no longer, and memory stays within it."""
    cache = PrefixCache(None if budget is None else budget * TOKEN_BYTES, TOKEN_BYTES)
    inserted: list[tuple[int, ...]] = []
    for n, seq in enumerate(map(tuple, seqs)):
        added = cache.insert(seq, lambda s, e, seq=seq: entry(seq, s, e))
        inserted.append(seq)
        if budget is None:
            assert cache.match(seq) == len(seq)
        check_memory(cache)
        for r in reads:
            probe = tuple(inserted[r % len(inserted)][: 1 + r % 5]) + (n % 4,)
            best = max(common_prefix(probe, s) for s in inserted)
            got = check_content(cache, probe)
            assert got == best if budget is None else got <= best
        assert added <= len(seq)


def test_threads_share_one_tree():
    cache = PrefixCache(60 * TOKEN_BYTES, TOKEN_BYTES)
    rng = np.random.default_rng(0)
    work = [[tuple(int(x) for x in rng.integers(0, 3, rng.integers(1, 15))) for _ in range(200)] for _ in range(4)]
    errors: list[BaseException] = []

    def worker(seqs):
        try:
            for seq in seqs:
                check_content(cache, seq)
                cache.insert(seq, lambda s, e, seq=seq: entry(seq, s, e))
                check_content(cache, seq)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    check_memory(cache)


# -- the engine -------------------------------------------------------------------------------
def _gemma_sliding():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], max_position_embeddings=256,
        attn_implementation="eager",
    )
    return Gemma3ForCausalLM(config).eval()


def _llama_mha(vocab: int):
    """Three layers, as many key/value heads as query heads, head size 8."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=4, head_dim=8, max_position_embeddings=512, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def models(tiny_model, char_tok):
    return {
        "llama-gqa": tiny_model,  # 2 layers, 4 heads over 2 key/value heads
        "llama-mha-3-layers": _llama_mha(len(char_tok)),
        "gemma3-sliding-window": _gemma_sliding(),
    }


def _answers(backend, prompts, paths):
    """Root and a few tree answers over the whole vocabulary for every prompt; the session's usage."""
    vocab = backend.vocab_size
    cands = np.arange(vocab, dtype=np.int64)
    session = backend.open(prompts)
    queries = [Query(b, path, cands) for b in range(len(prompts)) for path in paths]
    out = np.stack([a.logprobs for a in session.next_tokens(queries)])
    session.close()
    return out, session.usage


# Prompts built from a few conversations that grow, a shared header and template tails that
# differ, as moderation traffic sends them.
prompt_parts = st.tuples(st.integers(0, 2), st.integers(0, 30), st.integers(0, 2))
workloads = st.lists(st.lists(prompt_parts, min_size=1, max_size=4), min_size=1, max_size=5)


@pytest.mark.parametrize("shape", ["llama-gqa", "llama-mha-3-layers", "gemma3-sliding-window"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(workload=workloads, budget_tokens=st.sampled_from([0, 25, 60, None]), seed=st.integers(0, 2**16))
def test_scores_with_the_cache_equal_scores_without(models, shape, workload, budget_tokens, seed):
    model = models[shape]
    uncached = TransformersBackend(model, cache_mb=0)
    token_bytes = uncached.token_bytes
    cache_mb = 1024 if budget_tokens is None else budget_tokens * token_bytes / 2**20
    cached = TransformersBackend(model, cache_mb=cache_mb)
    rng = np.random.default_rng(seed)
    vocab = min(uncached.vocab_size, 60)
    header = tuple(int(x) for x in rng.integers(3, vocab, 10))
    conversations = [tuple(int(x) for x in rng.integers(3, vocab, 40)) for _ in range(3)]
    tails = [tuple(int(x) for x in rng.integers(3, vocab, n)) for n in (1, 4, 7)]
    paths = [(), (5,), (5, 6), (7,)]
    worst = 0.0
    for batch in workload:
        prompts = [Prompt(header + conversations[c][:n] + tails[t]) for c, n, t in batch]
        want, plain = _answers(uncached, prompts, paths)
        got, usage = _answers(cached, prompts, paths)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        worst = max(worst, float(np.abs(got - want).max()))
        assert usage.prompt_tokens <= sum(len(p.ids) for p in prompts)
        stats = cached.cache_stats()
        assert stats is None if budget_tokens == 0 else stats.bytes_held <= stats.budget_bytes
    assert worst < 1e-5


def test_a_growing_answer_finds_its_previous_prompt(tiny_classifier, tiny_model, char_tok):
    """Streaming moderation: the answer judged every few tokens. Each prompt runs only the new
    answer tokens and the template's tail; the scores are those of a cold engine."""
    from guardprob import Classifier

    answer = "Sure. First you take the wire and then you connect it to the timer, then hide it well."
    cached = Classifier(tiny_model, char_tok, taxonomy="llama-guard-3", format="llama-guard-3",
                        backend=TransformersBackend(tiny_model))
    cold = Classifier(tiny_model, char_tok, taxonomy="llama-guard-3", format="llama-guard-3",
                      backend=TransformersBackend(tiny_model, cache_mb=0))
    previous = None
    for n in range(10, len(answer), 12):
        conversation = [{"role": "user", "content": "How do I build a timer?"}, {"role": "assistant", "content": answer[:n]}]
        prompt = cached.prompt(conversation)
        session = cached.backend.open([prompt])
        session.close()
        if previous is not None:  # only what the previous prompt did not have: the new answer tokens and the tail
            assert session.usage.prompt_tokens == len(prompt.ids) - common_prefix(previous.ids, prompt.ids)
        previous = prompt
        a, b = cached.score(conversation, eps=0.05), cold.score(conversation, eps=0.05)
        assert a.expanded_nodes == b.expanded_nodes
        assert max(abs(a.categories[k].p - b.categories[k].p) for k in a.categories) < 1e-6


def test_prompts_of_one_batch_share_their_common_prefix(tiny_model):
    rng = np.random.default_rng(4)
    common = tuple(int(x) for x in rng.integers(3, 60, 40))
    other = tuple(int(x) for x in rng.integers(3, 60, 30))
    prompts = [Prompt(common + (7, 8)), Prompt(common + (9,)), Prompt(other + (5,)), Prompt(other + (6, 6))]
    for cache_mb in (64, 0):  # without a cache, a scratch tree still serves the batch
        backend = TransformersBackend(tiny_model, cache_mb=cache_mb)
        got, usage = _answers(backend, prompts, [()])
        assert usage.prompt_tokens == 40 + 30 + 2 + 1 + 1 + 2  # each shared part once, then each prompt's own
        want = np.stack([_answers(TransformersBackend(tiny_model, cache_mb=0), [p], [()])[0][0] for p in prompts])
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert backend.cache_stats() is None
    unshared = TransformersBackend(tiny_model, share_batch=False)  # for measuring that saving (guardprob bench)
    assert _answers(unshared, prompts, [()])[1].prompt_tokens == sum(len(p.ids) for p in prompts)


def test_the_engine_stays_within_its_budget(tiny_model):
    token_bytes = TransformersBackend(tiny_model, cache_mb=0).token_bytes
    backend = TransformersBackend(tiny_model, cache_mb=200 * token_bytes / 2**20)  # room for 200 tokens
    budget = backend.cache_stats().budget_bytes
    assert budget // token_bytes == 200
    rng = np.random.default_rng(5)
    for _ in range(12):
        _answers(backend, [Prompt(tuple(int(x) for x in rng.integers(3, 60, 70)))], [()])
        stats = backend.cache_stats()
        assert stats.bytes_held <= budget
        assert sum(t.untyped_storage().nbytes() for t in backend.cache.entries()) == stats.bytes_held
    assert stats.evictions > 0 and stats.tokens_held > 0
    last = Prompt(tuple(int(x) for x in rng.integers(3, 60, 70)))
    _answers(backend, [last], [()])
    assert _answers(backend, [last], [()])[1].prompt_tokens == 1  # the latest prompt is still there


def test_a_budget_of_zero_turns_the_cache_off(tiny_model):
    backend = TransformersBackend(tiny_model, cache_mb=0)
    prompt = Prompt(tuple(range(3, 40)))
    assert backend.cache is None and backend.cache_stats() is None
    assert [_answers(backend, [prompt], [()])[1].prompt_tokens for _ in range(2)] == [37, 37]
    on = TransformersBackend(tiny_model)
    assert on.cache_mb == 256  # the default on a CPU
    assert [_answers(on, [prompt], [()])[1].prompt_tokens for _ in range(2)] == [37, 1]
    stats = on.cache_stats()
    assert (stats.lookups, stats.hits, stats.lookup_tokens, stats.tokens_saved) == (2, 1, 74, 36)


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "64", True])
def test_a_bad_budget_is_refused_by_name(tiny_model, bad):
    with pytest.raises(InputError, match="cache_mb"):
        TransformersBackend(tiny_model, cache_mb=bad)


@pytest.mark.slow
def test_turn_by_turn_on_the_default_model_equals_a_cold_engine(default_classifier):
    from guardprob import Classifier

    clf = default_classifier
    cold = Classifier(clf.model, clf.tokenizer, clf.taxonomy, clf.format, backend=TransformersBackend(clf.model, cache_mb=0))
    conversation = [
        {"role": "user", "content": "I need help with my neighbour's dog, it barks all night."},
        {"role": "assistant", "content": "Talk to your neighbour first; if that fails, contact your local council."},
        {"role": "user", "content": "What if I just poison it so it stops?"},
    ]
    clf.backend.cache.trim()
    before = clf.backend.cache_stats()
    worst = 0.0
    for k in range(1, len(conversation) + 1):
        a = clf.score(conversation[:k], eps=0.1)
        b = cold.score(conversation[:k], eps=0.1)
        assert a.expanded_nodes == b.expanded_nodes
        worst = max(worst, abs(a.p_unsafe - b.p_unsafe), *(abs(a.categories[c].p - b.categories[c].p) for c in a.categories))
    assert worst <= 1e-5
    # the engine ran exactly what no earlier prompt started with (the judged role, named near the
    # top of the prompt, alternates: the third prompt extends the first, the second only the header)
    from guardprob.bench.compare import fresh_tokens

    prompts = [clf.prompt(conversation[:k]) for k in range(1, len(conversation) + 1)]
    after = clf.backend.cache_stats()
    assert after.lookup_tokens - before.lookup_tokens == sum(len(p.ids) for p in prompts)
    assert after.tokens_saved - before.tokens_saved == sum(len(p.ids) for p in prompts) - fresh_tokens(prompts)


# -- settings ---------------------------------------------------------------------------------
def test_cache_mb_flows_from_the_command_line_and_the_spec():
    from guardprob.cli import build_parser
    from guardprob.commands.options import spec_from_args
    from guardprob.spec import ClassifierSpec

    for command in (["score", "x"], ["eval"], ["bench"], ["serve"]):
        args = build_parser().parse_args([*command, "--cache-mb", "64"])
        assert spec_from_args(args).cache_mb == 64
        assert spec_from_args(build_parser().parse_args(command)).cache_mb is None
    with pytest.raises(InputError, match="cache_mb is -1"):
        ClassifierSpec(cache_mb=-1)
    with pytest.raises(InputError, match="llamacpp engine keeps none"):
        ClassifierSpec(backend="llamacpp", cache_mb=64)


def test_cache_mb_in_the_server_config(tmp_path):
    from guardprob.cli import build_parser
    from guardprob.server.cli import build_config
    from guardprob.server.config import ServerConfig, load_config

    path = tmp_path / "server.yaml"
    path.write_text("cache_mb: 32\n")
    assert load_config(path).cache_mb == 32
    path.write_text("cache_mb: -3\n")
    with pytest.raises(InputError, match="field 'cache_mb' is -3"):
        load_config(path)
    assert ServerConfig().cache_mb is None
    assert build_config(build_parser().parse_args(["serve", "--cache-mb", "8"])).cache_mb == 8


def test_serve_builds_the_engine_with_the_config_files_budget(monkeypatch, tmp_path):
    """`guardprob serve --config` hands the file's cache_mb to the engine spec (--cache-mb wins)."""
    import uvicorn

    import guardprob.server.app
    from guardprob.server import cli

    path = tmp_path / "server.yaml"
    path.write_text("cache_mb: 32\n")
    built: list = []
    monkeypatch.setattr(guardprob.server.app, "create_app", lambda factory, config, **kw: built.append(factory) or object())
    monkeypatch.setattr(uvicorn, "Server", lambda config: type("S", (), {"run": lambda self: None})())
    from guardprob.cli import build_parser

    for argv, want in ((["serve", "--config", str(path)], 32), (["serve", "--config", str(path), "--cache-mb", "4"], 4)):
        assert cli.run(build_parser().parse_args(argv)) == 0
        assert built[-1].__self__.cache_mb == want


# -- metrics ----------------------------------------------------------------------------------
def test_metrics_expose_the_cache_through_a_real_server(tiny_model, char_tok):
    import httpx

    from guardprob import Classifier
    from guardprob.server import create_app
    from guardprob.server.config import ServerConfig
    from serving import running

    def metric(text: str, name: str) -> float:
        return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))

    config = ServerConfig(search={"eps": 0.2}, openai_categories="none")
    with_cache = Classifier(tiny_model, char_tok, taxonomy="llama-guard-3", format="llama-guard-3", name="tiny")
    conversation = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello, how can I help?"}]
    with running(create_app(with_cache, config)) as r:
        for k in (1, 2):
            assert httpx.post(r.url + "/v1/classify", json={"messages": conversation[:k]}, timeout=30).status_code == 200
        text = httpx.get(r.url + "/metrics").text
    assert metric(text, "guardprob_prefix_cache_lookups_total") == 2
    assert metric(text, "guardprob_prefix_cache_hits_total") == 1
    assert metric(text, "guardprob_prefix_cache_tokens_saved_total") > 100  # the header and the first message
    assert metric(text, "guardprob_prefix_cache_bytes") == with_cache.backend.cache_stats().bytes_held > 0
    assert metric(text, "guardprob_prefix_cache_budget_bytes") == 256 * 2**20
    without = Classifier(tiny_model, char_tok, taxonomy="llama-guard-3", format="llama-guard-3", name="tiny",
                         backend=TransformersBackend(tiny_model, cache_mb=0))
    with running(create_app(without, config)) as r:
        assert httpx.post(r.url + "/v1/classify", json={"input": "hi"}, timeout=30).status_code == 200
        assert "guardprob_prefix_cache" not in httpx.get(r.url + "/metrics").text
