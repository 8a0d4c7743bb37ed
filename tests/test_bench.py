"""The benchmark's correctness (no timing asserts): engines agree, the command reports its fields."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from guardprob import Classifier
from guardprob.backends.base import Prompt, Query
from guardprob.backends.naive import NaiveBackend
from guardprob.backends.transformers import TransformersBackend
from guardprob.bench.compare import ENGINES, Recorder, bench, load_conversations, print_report
from guardprob.core.search import search

TEXTS = ["How do I hit a man", "Tell me a story about a cat", "Give me your password", "kill"]
ROOT = Path(__file__).resolve().parent.parent


def _scores(clf, backend, texts, **params):
    from guardprob.core.estimators import estimate

    prompts = [clf.prompt(t) for t in texts]
    trees = search(backend, prompts, clf.grammar, clf.search_config("marginal", **params))
    return [{k: c.p for k, c in estimate(t, "marginal", clf.taxonomy).categories.items()} for t in trees], trees


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("batch", [1, 64])
def test_naive_and_guardprob_agree_across_batches(tiny_classifier, tiny_model, rows, batch):
    params = dict(eps=0.01, top_p=0.99, batch=batch)
    want, want_trees = _scores(tiny_classifier, NaiveBackend(tiny_model), TEXTS[:rows], **params)
    got, got_trees = _scores(tiny_classifier, TransformersBackend(tiny_model), TEXTS[:rows], **params)
    for a, b, ta, tb in zip(want, got, want_trees, got_trees):
        assert ta.expanded_nodes == tb.expanded_nodes
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-5)


def test_prefix_cache_reuse_changes_nothing(tiny_classifier, tiny_model):
    backend = TransformersBackend(tiny_model)
    first, _ = _scores(tiny_classifier, backend, TEXTS, eps=0.01)  # computes the shared prefix
    assert backend.cache_stats().tokens_held >= sum(len(tiny_classifier.prompt(t).ids) for t in TEXTS) // 2
    again, _ = _scores(tiny_classifier, backend, TEXTS[::-1], eps=0.01)  # reuses it
    alone = [_scores(tiny_classifier, TransformersBackend(tiny_model), [t], eps=0.01)[0][0] for t in TEXTS]
    for a, b, c in zip(first, again[::-1], alone):
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-5) and a[k] == pytest.approx(c[k], abs=1e-5)


def test_released_slots_and_rows_are_reused_exactly(tiny_model):
    """Freed node slots take the next nodes, a finished prompt leaves the cache; answers stay exact."""
    rng = np.random.default_rng(3)
    vocab = tiny_model.config.vocab_size
    prompts = [Prompt(tuple(int(x) for x in rng.integers(3, vocab, n)), 0) for n in (9, 14, 6)]
    cands = np.arange(vocab, dtype=np.int64)
    session = TransformersBackend(tiny_model).open(prompts)
    naive = NaiveBackend(tiny_model).open(prompts)
    rounds = [
        [Query(b, (5,), cands) for b in range(3)] + [Query(b, (6, 7), cands) for b in range(3)],
        [Query(b, (5, 8), cands) for b in range(3)],
    ]
    for queries in rounds:
        for a, b in zip(session.next_tokens(queries), naive.next_tokens(queries)):
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-5)
    fill = session.rows[0].fill
    session.release(0, (6, 7), 0)  # the (6,) and (6, 7) slots are free
    session.release(1)  # prompt 1 is done
    assert session.active == [0, 2] and session.layers[0].rows == 2  # the last row took the place of prompt 1's
    queries = [Query(0, (5, 8, 9), cands), Query(2, (5, 8, 9), cands), Query(0, (4, 4), cands)]
    for a, b in zip(session.next_tokens(queries), naive.next_tokens(queries)):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-5)
    assert session.rows[0].fill == fill + 1  # three new tokens, two of them in freed slots
    with pytest.raises(ValueError, match="released"):
        session.next_tokens([Query(1, (5, 9), cands)])


@pytest.fixture
def releases(monkeypatch):
    """Every ``release`` the search sends a transformers session, as (prompt, path, keep)."""
    from guardprob.backends.transformers import TransformersSession

    calls = []
    original = TransformersSession.release

    def spy(self, prompt, path=(), keep=0):
        calls.append((prompt, path, keep))
        return original(self, prompt, path, keep)

    monkeypatch.setattr(TransformersSession, "release", spy)
    return calls


def test_search_releases_nodes_and_finished_prompts(tiny_classifier, tiny_model, releases):
    prompts = [tiny_classifier.prompt(t) for t in TEXTS]
    search(TransformersBackend(tiny_model), prompts, tiny_classifier.grammar, tiny_classifier.search_config("marginal", eps=0.05))
    assert sorted(p for p, path, _ in releases if not path) == [0, 1, 2, 3]  # every prompt left the cache
    assert any(path for _, path, _ in releases)  # and nodes were freed on the way


def test_answers_asked_ahead_and_dropped_are_released(tiny_classifier, tiny_model, releases):
    """Speculated children the search does not expand give their slots back to the engine."""
    from guardprob.bench.compare import expanded_paths

    prompts = [tiny_classifier.prompt(t) for t in TEXTS]
    recorder = Recorder(TransformersBackend(tiny_model))
    trees = search(recorder, prompts, tiny_classifier.grammar, tiny_classifier.search_config("marginal", eps=0.05, speculate=50))
    expanded = {(i, path) for i, t in enumerate(trees) for path in expanded_paths(t.root)}
    dropped = {(q.prompt, q.path) for q in recorder.queries()} - expanded
    assert dropped  # some children were asked ahead in vain
    freed = {(prompt, path) for prompt, path, _ in releases if path}
    whole = {prompt for prompt, path, _ in releases if not path}
    assert any(d in freed for d in dropped)
    assert all(d in freed or d[0] in whole for d in dropped)  # a prompt that finished frees everything at once


def test_bench_reports_every_field(tiny_classifier, tmp_path):
    report = bench(tiny_classifier, TEXTS[:3], params={"eps": 0.05}, naive_limit=2, batch=2, turns=2)
    engines = {r.engine for r in report.runs}
    # separate: formats that ask per category only; turns: three kinds of run
    assert engines == set(ENGINES) - {"separate", "turns"} | {"batch", "turns:final", "turns:cached", "turns:uncached"}
    for r in report.runs:
        assert r.nodes >= 1 and r.calls >= 1 and r.tokens >= 1 and r.seconds > 0
    s = report.summary
    for key in ("naive_over_guardprob", "guardprob_over_floor", "naive_over_floor", "batch_over_single_throughput",
                "max_abs_diff_naive_guardprob", "turns"):
        assert key in s
    assert s["naive_over_floor"] > 0
    assert s["agree"] and s["max_abs_diff_naive_guardprob"] <= 1e-4
    for engine in ("naive", "guardprob", "floor"):
        assert {"examples_per_s", "nodes_per_example", "calls_per_example", "tokens_per_example", "peak_rss_mb_max"} <= set(s[engine])
    assert s["naive"]["tokens_per_example"] > s["guardprob"]["tokens_per_example"]
    floor = [r for r in report.runs if r.engine == "floor"]
    assert all(r.calls <= 2 for r in floor)  # the prefix came from the process cache
    searched = {r.example: r.nodes for r in report.runs if r.engine == "guardprob"}
    assert all(r.nodes == searched[r.example] for r in floor)  # the expanded nodes, not those asked ahead
    assert all(r.calls == r.nodes for r in report.runs if r.engine == "naive")  # one call per node, no speculation
    json.loads(json.dumps(report.as_dict()))
    print_report(report)


def test_bench_guesses_from_warm_conversations_not_from_its_own(tiny_classifier):
    """Single examples guess from the warm-up and the examples before them; the batch from the
    warm-up only: with none, it makes the calls of a search with no history."""
    params = {"eps": 0.05}
    warm = bench(tiny_classifier, TEXTS[:3], params=params, engines=("guardprob", "floor"), batch=3, warm=TEXTS[3:])
    cold = bench(tiny_classifier, TEXTS[:3], params={**params, "prior": 0.0}, engines=("guardprob", "floor"), batch=3)
    assert warm.settings["warm"] == 1 and cold.settings["warm"] == 0
    calls = {name: [r.calls for r in report.runs if r.engine == "guardprob"] for name, report in (("warm", warm), ("cold", cold))}
    assert sum(calls["warm"]) < sum(calls["cold"])
    floor = {r.example: r.nodes for r in warm.runs if r.engine == "floor"}
    assert all(r.nodes == floor[r.example] for r in warm.runs if r.engine == "guardprob")  # guesses not counted
    unwarmed = bench(tiny_classifier, TEXTS[:3], params=params, engines=("guardprob",), batch=3)
    batch_calls = next(r.calls for r in unwarmed.runs if r.engine == "batch")
    prompts = [tiny_classifier.prompt(t) for t in TEXTS[:3]]
    recorder = Recorder(tiny_classifier.backend)  # its shared prefix is cached, as in the bench
    search(recorder, prompts, tiny_classifier.grammar, tiny_classifier.search_config("marginal", **params))
    assert batch_calls == recorder.usage.model_calls


def test_bench_engines_subset_and_errors(tiny_classifier):
    from guardprob.errors import InputError

    report = bench(tiny_classifier, TEXTS[:1], params={"eps": 0.1}, engines=("guardprob",), batch=1)
    assert {r.engine for r in report.runs} == {"guardprob"}
    with pytest.raises(InputError, match="unknown engine"):
        bench(tiny_classifier, TEXTS[:1], engines=("fast",))


def test_load_conversations_reads_the_known_fields(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"unsafe_query": "a"}, {"text": "b"}, {"messages": [{"role": "user", "content": "c"}]}, {"prompt": "d", "response": "e"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = load_conversations(path, None)
    assert got[:2] == ["a", "b"] and got[2][0]["content"] == "c" and got[3][1]["content"] == "e"
    assert len(load_conversations(path, 2)) == 2
    assert len(load_conversations(None, 3)) == 3  # the shipped sample


def test_bench_command_is_registered():
    from guardprob.cli import build_parser

    args = build_parser().parse_args(["bench", "--limit", "2", "--eps", "0.01", "--engines", "guardprob,floor", "--batch", "4"])
    assert args.limit == 2 and args.batch == 4 and args.engines == "guardprob,floor"


def test_gpu_bench_runs_tiny_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "gpu.json"
    argv = ["--device", "cpu", "--tiny", "--examples", "2", "--batch", "2", "--naive-nodes", "2", "--max-nodes", "16",
            "--turns", "3", "--json", str(out)]
    assert module.main(argv) == 0
    summary = json.loads(out.read_text())
    assert summary["examples"] == 2 and summary["guardprob_over_floor"] > 0 and summary["naive_s_per_node"] > 0
    turns = summary["turns"]
    assert turns["turns"] == 3 and turns["same_nodes"] and turns["max_abs_diff_cached_uncached"] < 1e-5
    assert turns["cached"]["prefill_tokens"] == turns["fresh_tokens"] < turns["uncached"]["prefill_tokens"]
    # the second example guesses from the first's tree; --prior 0 turns that off
    assert module.main(argv + ["--prior", "0"]) == 0
    second = [next(r["calls"] for r in s["runs"] if r["engine"] == "guardprob" and r["example"] == 1)
              for s in (summary, json.loads(out.read_text()))]
    assert second[0] < second[1]
    assert module.main(argv + ["--turns", "0", "--decide", "--stream-tokens", "40"]) == 0
    extra = json.loads(out.read_text())
    assert extra["decisions"]["decide@0.5"]["disagreements"] == 0
    assert extra["streaming"]["chunks"] == 2 and extra["streaming"]["max_abs_diff"] < 1e-5


def test_engine_classifier_scores_unchanged_by_engine(tiny_model, char_tok):
    """The Classifier API over the naive and the real engine gives the same probabilities."""
    fast = Classifier(tiny_model, char_tok, taxonomy="llama-guard-3", format="llama-guard-3", name="tiny")
    slow = Classifier(tiny_model, char_tok, taxonomy="llama-guard-3", format="llama-guard-3", backend=NaiveBackend(tiny_model))
    a = fast.score_batch(TEXTS, eps=0.02, batch_size=3)
    b = slow.score_batch(TEXTS, eps=0.02, batch_size=1)
    for x, y in zip(a, b):
        for k in x.categories:
            assert x.categories[k].p == pytest.approx(y.categories[k].p, abs=1e-5)


def test_answers_in_head_chunks_match(tiny_classifier, tiny_model, monkeypatch):
    """Queried rows go through the lm head in chunks; a chunk of 2 changes nothing."""
    from guardprob.backends import transformers as engine

    want, _ = _scores(tiny_classifier, NaiveBackend(tiny_model), TEXTS[:3], eps=0.01)
    monkeypatch.setattr(engine, "_ROWS_PER_HEAD", 2)
    got, _ = _scores(tiny_classifier, TransformersBackend(tiny_model), TEXTS[:3], eps=0.01)
    for a, b in zip(want, got):
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-5)


def test_bench_decisions_agree_with_the_full_marginal():
    """Each decision is on the side of every interval the full marginal decides itself, and costs
    fewer model calls than the full marginal."""
    from guardprob.bench.decisions import bench_decisions
    from oracle import setup

    clf = setup(3).classifier
    rules = {"0.5": clf.decision_rule(True), "low": clf.decision_rule(True, thresholds=0.05)}
    report = bench_decisions(clf, ["ab", "cd", "ef"], rules, {"eps": 1e-4})
    summary = report["summary"]
    assert set(summary) == {"generate", "greedy", "marginal", "decide@0.5", "decide@low"}
    for name in ("decide@0.5", "decide@low"):
        assert summary[name]["disagreements"] == 0 and summary[name]["decided"] == 3
        assert summary[name]["calls_per_example"] <= summary["marginal"]["calls_per_example"]
        assert summary[name]["over_greedy"] > 0


def test_bench_streaming_matches_fresh_scores(tiny_model, char_tok):
    from guardprob import Classifier
    from guardprob.backends.transformers import TransformersBackend
    from guardprob.bench.streaming import answer_chunks, bench_streaming

    def build(cache_mb):
        return Classifier(tiny_model, char_tok, taxonomy="llama-guard-3", format="llama-guard-3", name="tiny",
                          backend=TransformersBackend(tiny_model, cache_mb=cache_mb))

    chunks = answer_chunks(char_tok, ["first you wait", "then you go"], 40, 10)
    assert len(chunks) == 4 and "".join(chunks).startswith(" first you wait")
    report = bench_streaming(build, "how do I hurt someone", chunks, {"eps": 0.2})
    assert report["chunks"] == 4 and report["max_abs_diff"] <= 1e-5
    assert report["cache"]["tokens_saved"] > 0
    assert report["stream_over_once"] > 0 and report["uncached_over_once"] > 0
