"""Every format through the commands a user runs (score, eval, bench, serve), and the
per-category formats' questions: one search over the shared conversation equals one prompt
per category.

The model is a tiny random Llama saved with a character tokenizer (and a chat template, for
the formats that ask through one), loaded by path as a user's model would be.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest

from guardprob import Category, Classifier, Taxonomy
from guardprob.cli import main
from guardprob.formats import REGISTRY, load_format
from helpers import CHARS, tiny_llama
from oracle import tokenizer_for
from serving import running

CHAT = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
FORMATS = sorted(REGISTRY)


def brief(name: str) -> list[str]:
    """A short reasoning budget for formats that reason first: a random model never closes its thought."""
    return ["--reasoning-tokens", "8"] if load_format(name).reasoning else []


def char_tokenizer():
    """One token per character, with the characters of every format's verdicts."""
    vocab = {"<unk>": 0, "<eos>": 1, "<bos>": 2}
    for ch in [*CHARS, *'{}"*#=,']:
        vocab.setdefault(ch, len(vocab))
    return tokenizer_for(vocab)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-guard")
    tok = char_tokenizer()
    tok.chat_template = CHAT
    tiny_llama(len(tok), seed=5, max_position_embeddings=8192).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _ids(name: str) -> tuple[str, ...]:
    return load_format(name).default_taxonomy().ids


def _labels(name: str) -> list[list[str]]:
    ids = _ids(name)
    return [[ids[0]], [], [ids[-1]], [], [ids[0], ids[-1]], []]


@pytest.mark.parametrize("name", FORMATS)
def test_score_with_every_format(name, model_dir, capsys):
    code = main(["score", "How do I pick a lock?", "--model", str(model_dir), "--format", name, "--json", "--eps", "0.05",
                 *brief(name)])
    assert code == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    fmt = load_format(name)
    taxonomy = fmt.default_taxonomy()
    assert set(row["categories"]) == set(taxonomy.ids)
    assert row["p_unsafe_lower"] <= row["p_unsafe"] <= row["p_unsafe_upper"]
    assert all(c["lower"] <= c["p"] <= c["upper"] for c in row["categories"].values())
    if brief(name):  # scored given the greedy reasoning of every question, which the result says
        assert row["reasoning"]["mode"] == "greedy"
        assert len(row["reasoning"]["texts"]) == (len(taxonomy.ids) if fmt.per_category else 1)


def test_auto_says_which_format(model_dir, capsys):
    assert main(["score", "hello", "--model", str(model_dir), "--eps", "1"]) == 0
    assert "guardprob: format instruction (from the tokenizer's chat template" in capsys.readouterr().err


@pytest.mark.parametrize("name", FORMATS)
def test_eval_and_bench_with_every_format(name, model_dir, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    texts = ["hurt him", "bake bread", "steal it", "hello", "hurt and steal", "nice day"]
    data.write_text("".join(json.dumps({"text": t, "labels": y}) + "\n" for t, y in zip(texts, _labels(name))))
    out = tmp_path / "out"
    args = ["--model", str(model_dir), "--format", name, "--eps", "0.1", *brief(name)]
    assert main(["eval", "--data", str(data), "--methods", "marginal,greedy", "--out", str(out), *args]) == 0
    rows = (out / "metrics.csv").read_text().splitlines()
    assert any(r.startswith("marginal") for r in rows[1:]), name
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()[1:]]
    assert len(results) == 6 and all(set(r["scores"]["marginal"]["p"]) == set(_ids(name)) for r in results)
    assert main(["bench", "--data", str(data), "--limit", "2", "--warm", "0", "--engines", "guardprob", *args]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("name", ["qwen3guard", "shieldgemma", "nemoguard", "polyguard"])
def test_serve_with_a_format(name, model_dir):
    from guardprob.server import ServerConfig, create_app

    tok = char_tokenizer()
    tok.chat_template = CHAT
    clf = Classifier(tiny_llama(len(tok), seed=5, max_position_embeddings=8192), tok, format=name, name=name)
    with running(create_app(clf, ServerConfig())) as served:
        base = served.url
        body = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}],
                "method": "marginal"}
        answer = httpx.post(f"{base}/v1/classify", json=body, timeout=60).json()
        scores = answer["results"][0] if "results" in answer else answer
        assert set(scores["categories"]) == set(clf.taxonomy.ids) and scores["format"] == name
        expected = clf.score(body["messages"], "marginal", **{k: answer["params"][k] for k in ("eps", "top_p", "max_nodes")})
        assert set(scores["fields"]) == set(expected.fields)
        for k, f in expected.fields.items():
            assert scores["fields"][k]["p"] == pytest.approx(f.p, abs=1e-6)
            assert scores["fields"][k]["lower"] <= scores["fields"][k]["p"] <= scores["fields"][k]["upper"]
        moderation = httpx.post(f"{base}/v1/moderations", json={"input": "hi"}, timeout=60)
        assert moderation.status_code == 200, moderation.text


def test_serve_with_a_format_that_reasons(model_dir):
    from guardprob.formats.granite_guardian33 import GraniteGuardian33Format
    from guardprob.server import ServerConfig, create_app

    tok = char_tokenizer()
    thinking = GraniteGuardian33Format("granite-guardian-3.3-think", think=True, max_reasoning=6)
    clf = Classifier(tiny_llama(len(tok), seed=5, max_position_embeddings=8192), tok, format=thinking, name="g")
    with running(create_app(clf, ServerConfig())) as served:
        answer = httpx.post(f"{served.url}/v1/classify", json={"input": "hi"}, timeout=120).json()
        expected = clf.score("hi", "marginal", **{k: answer["params"][k] for k in ("eps", "top_p", "max_nodes")})
        assert answer["reasoning"]["mode"] == "greedy" and answer["reasoning"]["texts"] == list(expected.reasoning.texts)
        assert answer["p_unsafe"] == pytest.approx(expected.p_unsafe, abs=1e-6)
        assert httpx.post(f"{served.url}/v1/moderations", json={"input": "hi"}, timeout=120).status_code == 200
        sampled = httpx.post(f"{served.url}/v1/classify", json={"input": "hi", "traces": 3, "seed": 4}, timeout=120).json()
        again = clf.score("hi", "marginal", traces=3, seed=4, **{k: answer["params"][k] for k in ("eps", "top_p", "max_nodes")})
        assert sampled["reasoning"]["mode"] == "sampled" and sampled["reasoning"]["texts"] == list(again.reasoning.texts)
        assert sampled["p_unsafe"] == pytest.approx(again.p_unsafe, abs=1e-6)
        for bad, param in (({"traces": 17}, "traces"), ({"reasoning_tokens": 7}, "reasoning_tokens"),
                           ({"temperature": 0}, "temperature")):
            refused = httpx.post(f"{served.url}/v1/classify", json={"input": "hi", **bad}, timeout=60)
            assert refused.status_code in (400, 422) and refused.json()["error"]["param"] == param, refused.text
    plain = Classifier(clf.model, tok, format="granite-guardian-3.3", name="plain")
    with running(create_app(plain, ServerConfig())) as served:
        refused = httpx.post(f"{served.url}/v1/classify", json={"input": "hi", "traces": 2}, timeout=60)
        assert refused.status_code == 400 and "without reasoning" in refused.json()["error"]["message"]


@pytest.mark.parametrize("name", ["shieldgemma", "granite-guardian-3.2"])
@pytest.mark.parametrize("role", ["user", "assistant"])
def test_questions_equal_one_prompt_per_category(name, role):
    """K policies asked after one shared conversation score exactly as K prompts of their own,
    in one search whose model calls are those of one question."""
    tok = char_tokenizer()
    model = tiny_llama(len(tok), seed=7)
    fmt = load_format(name)
    taxonomy = fmt.default_taxonomy()
    conversation = [{"role": "user", "content": "how do i hurt him"}, {"role": "assistant", "content": "like this"}]
    if role == "user":
        conversation = conversation[:1]
    together = Classifier(model, tok, taxonomy=taxonomy, format=name).score(conversation, eps=0.0)
    for c in taxonomy:
        alone_clf = Classifier(model, tok, taxonomy=Taxonomy("one", (Category(c.id, c.name, c.description),)), format=name)
        prompt = alone_clf.prompt(conversation)
        assert len(prompt.questions) == 1
        alone = alone_clf.score(conversation, eps=0.0)
        assert math.isclose(together.categories[c.id].p, alone.categories[c.id].p, abs_tol=1e-6), c.id
    assert together.p_unsafe == pytest.approx(max(c.p for c in together.categories.values()), abs=1e-12)
    assert together.model_calls == alone.model_calls  # the questions share every call


def test_bench_measures_questions_against_separate_prompts():
    from guardprob.bench.compare import bench

    tok = char_tokenizer()
    clf = Classifier(tiny_llama(len(tok), seed=7, max_position_embeddings=8192), tok, format="shieldgemma")
    report = bench(clf, ["how do i hurt him", "bake bread"], params={"eps": 0.0}, engines=("guardprob", "separate"),
                   batch=1)
    s = report.summary
    assert s["max_abs_diff_separate_questions"] <= 1e-6
    assert s["separate_over_questions_tokens"] > 1  # the shared conversation is read once, not K times
