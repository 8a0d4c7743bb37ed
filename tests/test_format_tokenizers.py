"""Every format's verdicts with real tokenizers, offline: SmolLM2's (the default model) and
the vocabularies that ship in llama.cpp's source (Llama 3's BPE, Llama 2's SentencePiece,
Qwen2's, Phi-3's), converted by scripts/fetch_vocabs.sh.

Every verdict of every format compiles, can be spelled by the grammar's tokens, and the
token path reads back to the verdict's own outcomes; where the tokenizer writes the verdict
text as is, its own tokenization of the verdict reads back the same way.
"""

from __future__ import annotations

import functools
import itertools
import random

import pytest
from transformers import AutoTokenizer

from guardprob.core.grammar import TokenGrammar, Vocabulary
from guardprob.formats import REGISTRY, load_format
from guardprob.formats.declarative import DeclarativeFormat
from guardprob.formats.language import Labels, Verdict
from guardprob.models import default_model_dir
from vocabs import vocab

TOKENIZERS = ("smollm2", "llama-bpe", "llama-spm", "qwen2", "phi-3")
TOPICS = DeclarativeFormat("topics", "llama-guard-3", "Topics:\n{{categories}}\n{{conversation}}", "name", "json", "[]")


@functools.cache
def tokenizer(name: str):
    return AutoTokenizer.from_pretrained(str(default_model_dir())) if name == "smollm2" else vocab(name)


@functools.cache
def decoded(name: str) -> Vocabulary:
    return Vocabulary.from_tokenizer(tokenizer(name))


def formats():
    return [(name, load_format(name)) for name in REGISTRY] + [("declarative", TOPICS)]


def verdicts(language, rng: random.Random, per_branch: int = 6):
    """Every branch, with lists of one, two and all its labels in random orders (each list of
    a branch with several)."""
    for index, branch in enumerate(language.branches):
        lists: tuple[Labels, ...] = branch.lists
        if not lists:
            yield Verdict(index, branch.says)
            continue
        longest = max(len(labels.words) for labels in lists)
        sizes = sorted({1, min(2, longest), longest})
        for size in itertools.islice(itertools.cycle(sizes), per_branch):
            chosen = tuple(tuple(rng.sample(labels.outcomes, min(size, len(labels.words)))) for labels in lists)
            slotted = next((c for labels, c in zip(lists, chosen) if labels.slotted), ())
            yield Verdict(index, branch.says.union(*chosen), slotted, chosen)


def spell(grammar: TokenGrammar, text: str) -> list[int] | None:
    """A token path that writes ``text`` (longest tokens first), or None."""
    texts = grammar.vocabulary.texts

    def go(state, at: int) -> list[int] | None:
        if at == len(text):
            return []
        step = grammar.transitions(state)
        options = sorted(range(step.n_tokens), key=lambda j: -len(texts[step.candidates[j]]))
        for j in options:
            piece = texts[step.candidates[j]]
            if text.startswith(piece, at):
                rest = go(step.next_states[j], at + len(piece))
                if rest is not None:
                    return [int(step.candidates[j]), *rest]
        return None

    return go(grammar.root, 0)


def ends_with(grammar: TokenGrammar, path: list[int], verdict: Verdict) -> None:
    language = grammar.language
    state = grammar.read(path)
    assert state is not None, (language.write(verdict), path)
    assert language.can_end(state), language.write(verdict)
    assert language.verdict(state).outcomes == verdict.outcomes, language.write(verdict)
    assert language.verdict(state).labels == verdict.labels


@pytest.mark.parametrize("tok_name", TOKENIZERS)
@pytest.mark.parametrize(("name", "fmt"), formats(), ids=[n for n, _ in formats()])
def test_every_verdict_is_spelled_and_read_back(tok_name, name, fmt):
    tok = tokenizer(tok_name)
    rng = random.Random(f"{tok_name}/{name}")
    vocabulary = decoded(tok_name)  # once per tokenizer
    taxonomy = fmt.default_taxonomy()
    per_category = fmt.per_category
    for role in ("user", "assistant"):
        asked = [taxonomy.__class__(taxonomy.name, (c,)) for c in taxonomy] if per_category else [taxonomy]
        for one in asked:
            grammar = TokenGrammar(fmt.language(one, role), vocabulary)
            for verdict in verdicts(grammar.language, rng):
                text = grammar.language.write(verdict)
                path = spell(grammar, text)
                assert path is not None, f"{tok_name} cannot spell {text!r} ({name}, {role})"
                ends_with(grammar, path, verdict)
                own = tok.encode(text, add_special_tokens=False)
                if all(vocabulary.texts[i] for i in own) and "".join(vocabulary.texts[i] for i in own) == text:
                    ends_with(grammar, own, verdict)  # the tokenizer's own spelling reads back too
