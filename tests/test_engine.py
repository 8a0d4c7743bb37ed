"""The tree-attention engine equals plain step-by-step decoding of each path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guardprob.backends.base import Prompt, Query
from guardprob.backends.naive import NaiveBackend
from guardprob.backends.transformers import TransformersBackend


def _paths(rng: np.random.Generator, vocab: int, n: int, depth: int) -> list[tuple[int, ...]]:
    """A random tree: every path's prefixes are paths too (as the search produces)."""
    paths: list[tuple[int, ...]] = [()]
    while len(paths) < n:
        parent = paths[rng.integers(len(paths))]
        if len(parent) < depth:
            paths.append(parent + (int(rng.integers(3, vocab)),))
    return paths


def _incremental(model, prompt: tuple[int, ...], path: tuple[int, ...]) -> np.ndarray:
    """Step-by-step decoding with the model's own cache: one token per call."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        cache, logits = out.past_key_values, out.logits[0, -1]
        for token in path:
            out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[0, -1]
    return torch.log_softmax(logits.double(), -1).numpy()


def _compare(model, prompts, rounds, atol):
    vocab = model.config.get_text_config().vocab_size
    candidates = np.arange(vocab, dtype=np.int64)
    session = TransformersBackend(model).open(prompts)
    naive = NaiveBackend(model).open(prompts)
    for queries in rounds:
        got = session.next_tokens(queries)
        want = naive.next_tokens(queries)
        for q, a, b in zip(queries, got, want):
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=atol, err_msg=f"prompt {q.prompt} path {q.path}")
            assert a.top_logprob == pytest.approx(b.top_logprob, abs=atol)
    for q in rounds[-1][:3]:
        step = _incremental(model, prompts[q.prompt].ids, q.path)
        np.testing.assert_allclose(session.next_tokens([Query(q.prompt, q.path + (5,), candidates)])[0].logprobs,
                                   _incremental(model, prompts[q.prompt].ids, q.path + (5,)), atol=atol)
        assert step.shape == (vocab,)


def _rounds(rng, prompts, vocab, n=24, depth=5):
    """Queries in breadth order, split into rounds, over several prompts at once."""
    per_prompt = [sorted(_paths(rng, vocab, n, depth), key=len) for _ in prompts]
    candidates = np.arange(vocab, dtype=np.int64)
    rounds = []
    for r in range(depth + 1):
        rounds.append([Query(i, p, candidates) for i, paths in enumerate(per_prompt) for p in paths if len(p) == r])
    return [r for r in rounds if r]


@pytest.mark.parametrize("shared", [0, 12])
def test_tree_pass_equals_per_path_forward(tiny_model, shared):
    rng = np.random.default_rng(0)
    vocab = tiny_model.config.vocab_size
    common = tuple(int(x) for x in rng.integers(3, vocab, 12))
    prompts = [Prompt(common + tuple(int(x) for x in rng.integers(3, vocab, n)), shared) for n in (5, 17, 9)]
    _compare(tiny_model, prompts, _rounds(rng, prompts, vocab), atol=2e-5)


def test_shared_prefix_is_computed_once_and_reused(tiny_model):
    backend = TransformersBackend(tiny_model)
    prompts = [Prompt(tuple(range(3, 20)) + (i + 3,), 17) for i in range(3)]
    first = backend.open(prompts)
    second = backend.open(prompts[:1])
    assert first.usage.prompt_tokens == 17 + 3  # prefix once, then one own token per prompt
    assert second.usage.prompt_tokens == 1  # the prefix came from the process-wide cache
    q = [Query(0, (), np.arange(10))]
    np.testing.assert_allclose(first.next_tokens(q)[0].logprobs, second.next_tokens(q)[0].logprobs, atol=1e-6)


def test_sliding_window_layers(char_tok):
    """Gemma 3 mixes sliding-window and full layers; prompts longer than the window."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=6, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=256, attn_implementation="eager",
    )
    model = Gemma3ForCausalLM(config).eval()
    rng = np.random.default_rng(1)
    prompts = [Prompt(tuple(int(x) for x in rng.integers(3, 64, n)), 0) for n in (20, 13)]
    _compare(model, prompts, _rounds(rng, prompts, 64, n=16, depth=9), atol=2e-5)


def test_bfloat16_runs_close_to_naive(char_tok):
    from helpers import tiny_llama

    model = tiny_llama(len(char_tok), dtype=torch.bfloat16)
    rng = np.random.default_rng(2)
    prompts = [Prompt(tuple(int(x) for x in rng.integers(3, 60, 15)), 0)]
    _compare(model, prompts, _rounds(rng, prompts, 60, n=10, depth=3), atol=0.15)


def test_busy_rows_split_into_lanes(tiny_model, monkeypatch):
    """A round where one prompt has many new nodes and the others few or none: the busy row
    is split over several lanes that read copies of its keys, and answers stay exact."""
    from guardprob.backends import transformers as engine

    widths: list[tuple[list[int], int]] = []
    choose = engine._lane_width
    monkeypatch.setattr(engine, "_lane_width", lambda counts, keys: widths.append((list(counts), choose(counts, keys))) or widths[-1][1])
    rng = np.random.default_rng(3)
    vocab = tiny_model.config.vocab_size
    prompts = [Prompt(tuple(int(x) for x in rng.integers(3, vocab, n)), 0) for n in (7, 11, 4)]
    busy = sorted(_paths(rng, vocab, 40, 3), key=len)
    candidates = np.arange(vocab, dtype=np.int64)
    rounds = [[Query(i, (), candidates) for i in range(3)]]
    for depth in (1, 2, 3):
        rounds.append([Query(0, p, candidates) for p in busy if len(p) == depth] + ([Query(1, (7,), candidates)] if depth == 1 else []))
    _compare(tiny_model, prompts, rounds, atol=2e-5)
    assert any(width < max(counts) for counts, width in widths)


def test_lane_width_weighs_padding_against_copies():
    from guardprob.backends.transformers import _lane_width

    assert _lane_width([5], 1000) == 5  # one row: one lane
    assert _lane_width([40, 1, 1, 1], 100) < 40  # short keys: copies are cheap, padding is not
    assert _lane_width([40, 1, 1, 1], 100_000) == 40  # long keys: one lane per row
    assert _lane_width([3, 0, 3], 10) == 3
