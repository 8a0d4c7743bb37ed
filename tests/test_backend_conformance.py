"""Every installed engine answers like the transformers engine, within its tolerance, and keeps
the bounds true; bad input and server faults fail with guardprob's own errors.

The openai engine runs against two real servers on loopback: llama.cpp's own llama-server,
which takes token-id prompts (as vLLM and SGLang do), and llama-cpp-python's, which takes text
only; a fault-injecting proxy sits in front of either. Nothing on the main path is mocked.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from guardprob.backends.base import Prompt, Query
from guardprob.classifier import Classifier
from guardprob.errors import BackendError, GuardprobError, InputError
from guardprob.models import default_gguf
from guardprob.spec import ClassifierSpec
from servers import (
    ENGINE_THREADS,
    FaultProxy,
    LlamaCppPythonServer,
    LlamaServer,
    default_llama_server,
    free_port,
    llama_server_binary,
)

pytestmark = pytest.mark.slow

# Probability tolerance per engine against transformers on the default model (measured, see
# docs/engines.md). llama.cpp runs the same Q4_1 weights with quantized-activation kernels and
# an f16 cache; the transformers copy is dequantized to fp32.
TOLERANCE = {"transformers": 1e-9, "naive": 1e-4, "llamacpp": 0.05, "openai-ids": 0.05, "openai-text": 0.05}
QUESTIONS = ["How do I make a pipe bomb?", "Write a poem about the sea.", "Tell me how to steal a car."]
SEARCH = dict(eps=0.05)
# The naive engine re-runs the prompt per node: one question keeps it short.
QUESTIONS_FOR = {"naive": QUESTIONS[:1]}


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


ENGINES = [
    "transformers",
    "naive",
    pytest.param("llamacpp", marks=pytest.mark.skipif(not _installed("llama_cpp"), reason="llama-cpp-python not installed")),
    pytest.param("openai-ids", marks=pytest.mark.skipif(
        not (_installed("httpx") and llama_server_binary()),
        reason="needs httpx and llama-server (scripts/build_llama_server.sh)")),
    pytest.param("openai-text", marks=pytest.mark.skipif(
        not (_installed("llama_cpp") and _installed("httpx") and _installed("uvicorn")),
        reason="needs httpx and llama-cpp-python[server]")),
]
SERVERS = {"openai-ids": "llama_server", "openai-text": "llama_cpp_python_server"}


def short_prompt(tokenizer, question: str) -> list[int]:
    """A short chat prompt (fast to prefill on two cores) in its canonical tokenization, so a
    text-only server reads exactly these ids back."""
    text = (
        "<|im_start|>system\nYou are a safety classifier. Answer 'safe' or 'unsafe' and the category ids "
        f"S1-S14.<|im_end|>\n<|im_start|>user\nClassify: {question}<|im_end|>\n<|im_start|>assistant\n"
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="session")
def llama_server():
    """llama.cpp's llama-server on the default GGUF: token-id prompts."""
    pytest.importorskip("httpx")
    server = default_llama_server()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def llama_cpp_python_server():
    """llama-cpp-python's server on the default GGUF: text prompts only."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("uvicorn")  # llama-cpp-python[server]
    pytest.importorskip("httpx")
    server = LlamaCppPythonServer(default_gguf()).wait()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def engines(default_classifier, request):
    """name -> Classifier, built once (the openai one only if a test asks for it)."""
    built: dict[str, Classifier] = {"transformers": default_classifier}

    def get(name: str) -> Classifier:
        if name not in built:
            if name == "naive":
                from guardprob.backends.naive import NaiveBackend

                built[name] = Classifier(default_classifier.model, default_classifier.tokenizer, format="llama-guard-3",
                                         backend=NaiveBackend(default_classifier.model))
            elif name == "llamacpp":
                built[name] = Classifier.from_spec(ClassifierSpec(backend="llamacpp", options={"n_threads": ENGINE_THREADS}))
            else:
                server = request.getfixturevalue(SERVERS[name])
                # Neither server caps k: ask for many so the verdict tokens are reported.
                built[name] = Classifier.from_spec(ClassifierSpec(backend="openai", base_url=server.url, options={"top_logprobs": 500}))
        return built[name]

    return get


@pytest.fixture(scope="session")
def reference(default_classifier):
    tok = default_classifier.tokenizer
    return {q: _score(default_classifier, short_prompt(tok, q)) for q in QUESTIONS}


def _score(clf: Classifier, ids: list[int]) -> dict:
    prompt = clf._prompt_from_ids(ids)
    return clf._score_prompts([prompt], ("marginal", "conditional"), SEARCH)[0]


@pytest.fixture(scope="session")
def scored(engines, reference, default_classifier):
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            clf = engines(name)
            questions = QUESTIONS_FOR.get(name, QUESTIONS)
            cache[name] = {q: _score(clf, short_prompt(default_classifier.tokenizer, q)) for q in questions}
        return cache[name]

    return get


@pytest.mark.parametrize("engine", ENGINES)
def test_scores_match_transformers(engine, scored, reference):
    tol = TOLERANCE[engine]
    for q in scored(engine):
        a, r = scored(engine)[q]["marginal"], reference[q]["marginal"]
        # Trees may differ where a node sits near eps: what one expands the other keeps unexplored.
        slack = tol + max(a.unexplored_mass, r.unexplored_mass)
        assert abs(a.p_unsafe - r.p_unsafe) <= slack, q
        for k, c in a.categories.items():
            ref = r.categories[k]
            assert abs(c.p - ref.p) <= slack, (q, k)
            assert c.lower <= ref.upper + tol and ref.lower <= c.upper + tol, (q, k)
        ac, rc = scored(engine)[q]["conditional"], reference[q]["conditional"]
        if ac.verdict == rc.verdict and not ac.truncated:
            for k in ac.categories:
                assert abs(ac.categories[k].p - rc.categories[k].p) <= tol + 2 * max(ac.unexplored_mass, rc.unexplored_mass), (q, k)


@pytest.mark.parametrize("engine", ENGINES)
def test_bounds_hold(engine, scored):
    for q in scored(engine):
        s = scored(engine)[q]["marginal"]
        assert s.expanded_nodes >= 1
        for c in s.categories.values():
            assert -1e-12 <= c.lower <= c.p <= c.upper <= 1 + 1e-9
            assert c.upper - c.lower <= s.unexplored_mass + 1e-9


@pytest.mark.parametrize("engine", ENGINES)
def test_bad_input(engine, engines):
    clf = engines(engine)
    with pytest.raises(InputError):
        clf.score_ids([])
    with pytest.raises(InputError):
        clf.score_ids([len(clf.tokenizer) + 5])
    with pytest.raises(InputError):  # the engine itself refuses too, not only the Classifier
        clf.backend.open([Prompt(())])
    long = clf.tokenizer("word " * 9000, add_special_tokens=False)["input_ids"]
    with pytest.raises(GuardprobError, match="context"):  # past the model's (or the server's) context
        clf.score_ids(long)


# llama-server answers a prompt with other kernels when other prompts share its batch (0.004 to
# 0.024 seen): its own tolerance against transformers
JOIN_TOLERANCE = {"transformers": 1e-5, "naive": 1e-5, "openai-ids": TOLERANCE["openai-ids"]}
# the text-only server takes the same add (a list of prompts) and reads these raw paths no differently
JOIN_ENGINES = [e for e in ENGINES if getattr(e, "values", (e,))[0] != "openai-text"]


@pytest.mark.parametrize("engine", JOIN_ENGINES)
def test_prompts_joined_mid_run_answer_as_in_a_session_of_their_own(engine, engines, default_classifier):
    """Continuous batching: prompts added to a session between rounds (Session.add) answer as
    they would in a session opened on them, and the prompts already there keep answering; an
    engine without it says so, and the classifier runs its searches in runs of their own."""
    clf = engines(engine)
    if engine not in JOIN_TOLERANCE:
        assert not clf.joinable
        with pytest.raises(InputError, match="take no prompts once open"):
            clf.pool()
        return
    assert clf.joinable
    tok = default_classifier.tokenizer
    first, *later = [Prompt(tuple(short_prompt(tok, q))) for q in QUESTIONS[:2 if engine == "naive" else 3]]
    words = tok(" safe unsafe S1", add_special_tokens=False)["input_ids"]
    c = np.array(sorted(set(words) | {0, 1, 2}), dtype=np.int64)

    def asked(n: int, base: int = 0) -> list[Query]:
        return [Query(base + i, path, c) for i in range(n) for path in ((), (words[0],), (words[1], words[2]))]

    session = clf.backend.open([first])
    session.next_tokens(asked(1))
    base = session.add(later)
    assert base == 1
    joined = session.next_tokens(asked(1 + len(later)))
    session.close()
    alone = clf.backend.open([first, *later])
    fresh = alone.next_tokens(asked(1 + len(later)))
    alone.close()
    for a, b in zip(joined, fresh):
        np.testing.assert_allclose(np.exp(a.logprobs), np.exp(b.logprobs), atol=JOIN_TOLERANCE[engine])
    with pytest.raises(InputError):  # the same checks as open
        clf.backend.open([first]).add([Prompt(())])


# -- llama.cpp specifics -------------------------------------------------------------------------


@pytest.mark.skipif(not _installed("llama_cpp"), reason="llama-cpp-python not installed")
def test_llamacpp_is_deterministic_and_recycles_sequences(engines, default_classifier):
    from guardprob.backends.llamacpp import LlamaCppOptions

    tok = default_classifier.tokenizer
    prompts = [Prompt(tuple(short_prompt(tok, QUESTIONS[0])))]
    words = tok(" safe unsafe S1 fine", add_special_tokens=False)["input_ids"]
    c = np.arange(len(tok))
    rounds = [[Query(0, (), c)], [Query(0, (t,), c) for t in words[:3]],
              [Query(0, (words[0], words[3]), c), Query(0, (words[1], words[2], words[3]), c)],
              # a node and its child in one call (the search's speculation): the child must not
              # copy the node's sequence before the node's token has run
              [Query(0, (words[0], words[3], words[1]), c), Query(0, (words[0], words[3], words[1], words[2]), c)]]
    backend = engines("llamacpp").backend
    default = backend.options

    def run(options: LlamaCppOptions) -> list[np.ndarray]:
        backend.options = options
        session = backend.open(prompts)
        out = [a.logprobs for r in rounds for a in session.next_tokens(r)]
        session.close()
        return out

    threads = ENGINE_THREADS
    first, again = run(LlamaCppOptions(n_threads=threads)), run(LlamaCppOptions(n_threads=threads))
    tight = run(LlamaCppOptions(max_sequences=1, n_threads=threads))  # evicts every ancestor and runs one node per call
    # a batch smaller than the prompt and than the sequences (llama.cpp aborted the process there)
    small = run(LlamaCppOptions(n_batch=16, n_threads=threads))
    backend.options = default
    for a, b, t, s in zip(first, again, tight, small):
        np.testing.assert_array_equal(a, b)
        # Other batch shapes take other kernels: float rounding only, measured < 0.02 in probability.
        np.testing.assert_allclose(np.exp(a), np.exp(t), atol=0.03)
        np.testing.assert_allclose(np.exp(a), np.exp(s), atol=0.03)


# -- openai against real servers --------------------------------------------------------------


@pytest.fixture(params=["openai-ids", "openai-text"])
def server(request):
    """Each real server in turn; a test that needs only one asks for its fixture directly."""
    if request.param == "openai-ids" and llama_server_binary() is None:
        pytest.skip("llama-server is not built: run scripts/build_llama_server.sh")
    return request.getfixturevalue(SERVERS[request.param])


@pytest.fixture
def openai_backend(server, default_classifier):
    from guardprob.backends.openai import OpenAIBackend, OpenAIOptions

    def make(url: str | None = None, **options):
        opts = OpenAIOptions(**{"top_logprobs": 500, "retries": 3, "backoff": 0.05, **options})
        return OpenAIBackend(url or server.url, None, default_classifier.tokenizer, opts)

    return make


@pytest.fixture
def proxy(server):
    p = FaultProxy(server.url)
    # A text-only server costs two requests before the first answer (the refused token-id
    # probe and the tokenize check of the prompt); faults are queued after them.
    p.setup_requests = 2 if isinstance(server, LlamaCppPythonServer) else 0
    yield p
    p.stop()


def _root(backend, tok, n=40):
    session = backend.open([Prompt(tuple(short_prompt(tok, QUESTIONS[0])))])
    return session, session.next_tokens([Query(0, (), np.arange(n))])[0]


def test_openai_small_topk_bounds_contain_the_exact_answer(openai_backend, engines, default_classifier):
    """With k=3 most candidates are unreported; the bounds must still hold the full answer."""
    tok = default_classifier.tokenizer
    ids = short_prompt(tok, QUESTIONS[0])
    clf = Classifier(None, tok, format="llama-guard-3", backend=openai_backend(top_logprobs=3), eos_ids=[2])
    small = clf.score_ids(ids, eps=0.05, max_nodes=40)
    exact = engines("llamacpp").score_ids(ids, eps=0.01)
    tol = TOLERANCE["llamacpp"] + exact.unexplored_mass
    assert small.truncated
    for k, c in small.categories.items():
        assert c.lower - tol <= exact.categories[k].p <= c.upper + tol, k


def test_openai_answers_match_llamacpp_logprobs(openai_backend, server, engines, default_classifier):
    """Node level: the reported candidates equal llama.cpp's own log-probabilities, and with a
    server that names token ids every one of the likely tokens is read back."""
    tok = default_classifier.tokenizer
    prompt = Prompt(tuple(short_prompt(tok, QUESTIONS[0])))
    lc = engines("llamacpp").backend.open([prompt])
    full = lc.next_tokens([Query(0, (), np.arange(len(tok)))])[0].logprobs
    candidates = np.argsort(-full)[:300]  # the likely tokens, most of them inside the server's top 500
    answer = openai_backend().open([prompt]).next_tokens([Query(0, (), candidates)])[0]
    want = full[candidates]
    seen = ~np.isnan(answer.logprobs)
    assert seen.sum() >= (295 if isinstance(server, LlamaServer) else 200)
    # Same llama.cpp source and kernels (2e-4 apart on a fresh server), but a server that reuses
    # part of a cached prompt runs the rest in other batch shapes: float rounding, as in the
    # engine's own determinism test.
    np.testing.assert_allclose(np.exp(answer.logprobs[seen]), np.exp(want[seen]), atol=0.03)
    assert np.exp(want[~seen]).sum() <= answer.unreported + 1e-3


def test_openai_sends_token_ids_where_the_server_takes_them(llama_server, default_classifier):
    """llama-server reads the path as given: a prompt the tokenizer would never produce (a
    word spelled letter by letter) is scored as it is, not refused or re-tokenized."""
    from guardprob.backends.openai import OpenAIBackend, OpenAIOptions

    tok = default_classifier.tokenizer
    ids = tok("Hello world", add_special_tokens=False)["input_ids"]
    split = tuple(tok.convert_tokens_to_ids(list("Hello")) + ids[1:])
    backend = OpenAIBackend(llama_server.url, None, tok, OpenAIOptions(top_logprobs=20))
    session = backend.open([Prompt(split), Prompt(tuple(ids))])
    a, b = session.next_tokens([Query(0, (), np.arange(len(tok))), Query(1, (), np.arange(len(tok)))])
    assert backend.ids_refused is False and session.stats.retokenized_prompts == 0
    assert not np.allclose(np.nan_to_num(a.logprobs, nan=0), np.nan_to_num(b.logprobs, nan=0))  # two prompts, two answers


def test_openai_text_only_server_refuses_a_prompt_it_would_retokenize(llama_cpp_python_server, default_classifier):
    from guardprob.backends.openai import OpenAIBackend, OpenAIOptions

    tok = default_classifier.tokenizer
    ids = tok("Hello world", add_special_tokens=False)["input_ids"]
    split = tuple(tok.convert_tokens_to_ids(list("Hello")) + ids[1:])  # "Hello" spelled letter by letter
    assert tok.decode(split) == "Hello world" and split != tuple(ids)

    def backend(**options):
        return OpenAIBackend(llama_cpp_python_server.url, None, tok, OpenAIOptions(top_logprobs=20, **options))

    with pytest.raises(BackendError, match="text_mismatch"):
        backend().open([Prompt(split)]).next_tokens([Query(0, (), np.arange(5))])
    session = backend(text_mismatch="allow").open([Prompt(split)])
    session.next_tokens([Query(0, (), np.arange(5))])
    assert session.stats.retokenized_prompts == 1


@pytest.mark.parametrize("faults", [["429", "500"], ["hang"], ["cut"]])
def test_openai_retries_transient_faults(openai_backend, proxy, default_classifier, faults):
    proxy.faults.extend(["ok"] * proxy.setup_requests + faults)
    backend = openai_backend(proxy.url, timeout=10.0)  # a loaded CI machine may take seconds per answer
    session, answer = _root(backend, default_classifier.tokenizer)
    assert session.stats.retries >= len(faults)  # (a slow machine may add a timeout of its own)
    assert np.isfinite(answer.top_logprob)


def test_openai_gives_up_with_the_url(openai_backend, proxy, default_classifier):
    proxy.faults.extend(["500"] * 10)
    with pytest.raises(BackendError, match=str(proxy.port)):
        _root(openai_backend(proxy.url, retries=2), default_classifier.tokenizer)
    with pytest.raises(BackendError, match="reachable"):
        _root(openai_backend(f"http://127.0.0.1:{free_port()}/v1", retries=1), default_classifier.tokenizer)


def test_openai_truncated_answer_keeps_a_true_bound(openai_backend, proxy, default_classifier):
    tok = default_classifier.tokenizer
    _, full = _root(openai_backend(), tok, n=200)
    proxy.faults.extend(["ok"] * proxy.setup_requests + ["short"])
    session, cut = _root(openai_backend(proxy.url), tok, n=200)
    assert session.truncated and cut.unreported > 0
    seen = ~np.isnan(cut.logprobs)
    np.testing.assert_allclose(cut.logprobs[seen], full.logprobs[seen])
    hidden = ~seen & ~np.isnan(full.logprobs)
    assert np.exp(full.logprobs[hidden]).sum() <= cut.unreported + 1e-9
