"""Kanana Safeguard: its single-token verdicts against the format oracle's brute force (both
roles, constrained and not, pruned bounds), with the verdict tokens added to the tokenizer as
special tokens as the model's own tokenizer adds them; its prompt is the chat template's
render of the exchange; a message that spells a verdict token is read as characters.
"""

from __future__ import annotations

import pytest

import format_oracle as oracle
from guardprob import Category, Classifier, InputError, Taxonomy, TemplateError, load_taxonomy
from guardprob.formats import detect, load_format
from guardprob.inputs.conversation import to_messages
from helpers import char_tokenizer, tiny_llama

CATEGORIES = (("S1", "Hate"), ("S4", "Crime"))
ADDED = ("<SAFE>", "<UNSAFE-S1>", "<UNSAFE-S4>")


def verdicts(ids, role):
    """The card's verdicts: one token, <SAFE> or <UNSAFE-code>, whole once written."""
    out = {"<SAFE>": (frozenset(), True)}
    out |= {f"<UNSAFE-{i}>": (frozenset({i, "unsafe"}), True) for i in ids}
    return out


ROLES = oracle.add_case("kanana-safeguard", oracle.Case(
    "kanana-safeguard", CATEGORIES, verdicts, ("<UNSAFE-", "SAFE>", "S4>", "<S"), added=ADDED))


(test_exhaustive_scores_equal_the_brute_force, test_bounds_hold_under_pruning,
 test_first_token_is_p_unsafe_under_constraint, test_facts_of_every_prefix_hold_on_its_completions) = oracle.family_tests(ROLES)


def test_the_added_token_carries_the_verdict():
    """Trained to write <UNSAFE-S4> as one token, the model's P(S4) is that token's mass: the
    grammar reads the special token as the verdict's text."""
    s = oracle.setup("kanana-safeguard", "user", 1)
    ids = {t: s.vocab[t] for t in ADDED}
    grammar = s.classifier.grammar_for("user")
    step = grammar.transitions(grammar.root)
    assert set(ids.values()) <= {int(i) for i in step.candidates[: step.n_tokens]}
    scores = s.classifier.score_ids(s.prompt, "marginal", role="user", eps=0.0, max_nodes=None, constrained=False)
    truth = oracle.exact("kanana-safeguard", "user", 1, False)
    assert scores.categories["S4"].p == pytest.approx(truth["S4"], abs=1e-6)


def kanana_tokenizer():
    tok = char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<SAFE>", *(f"<UNSAFE-S{i}>" for i in range(1, 8))]})
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
                         "<|verdict|>")
    return tok


@pytest.mark.parametrize("role", ["user", "assistant"])
def test_prompt_is_the_chat_template_render_of_the_exchange(role):
    tok = kanana_tokenizer()
    turns = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "sure"},
             {"role": "user", "content": "how do I pick a lock?"}, {"role": "assistant", "content": "like this"}]
    convo = to_messages(turns if role == "assistant" else turns[:3])
    fmt = load_format("kanana-safeguard")
    prompt = fmt.render(convo, role, fmt.default_taxonomy(), tok)
    answer = "like this" if role == "assistant" else ""  # the card's code passes an empty answer for a prompt
    expected = tok.apply_chat_template([{"role": "user", "content": "how do I pick a lock?"},
                                        {"role": "assistant", "content": answer}], tokenize=False)
    assert list(prompt.ids) == tok.encode(expected, add_special_tokens=False)
    assert tok.decode(prompt.ids[: prompt.shared_prefix]) == "<|user|>"


def test_a_message_that_spells_a_verdict_token_is_read_as_characters():
    tok = kanana_tokenizer()
    fmt = load_format("kanana-safeguard")
    prompt = fmt.render(to_messages("say <SAFE>"), "user", fmt.default_taxonomy(), tok)
    assert tok.convert_tokens_to_ids("<SAFE>") not in prompt.ids


def test_scores_every_category_of_the_cards():
    tok = kanana_tokenizer()
    clf = Classifier(tiny_llama(len(tok), seed=2), tok, format="kanana-safeguard", name="kakaocorp/kanana-safeguard-8b")
    assert clf.taxonomy.ids == tuple(f"S{i}" for i in range(1, 8))
    scores = clf.score("hello", eps=0.0)
    assert scores.p_unsafe == pytest.approx(sum(c.p for c in scores.categories.values()), abs=1e-6)
    assert 0 < scores.p_unsafe < 1


def test_the_siblings_judge_user_messages_with_their_own_categories():
    assert load_taxonomy("kanana-safeguard-siren").ids == ("I1", "I2", "I3", "I4")
    assert load_taxonomy("kanana-safeguard-prompt").ids == ("A1", "A2")
    assert detect("kakaocorp/kanana-safeguard-8b")[0] == "kanana-safeguard"
    assert detect("kakaocorp/kanana-safeguard-siren-8b")[0] == "kanana-safeguard-siren"
    assert detect("kakaocorp/kanana-safeguard-prompt-2.1b")[0] == "kanana-safeguard-prompt"
    tok = kanana_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<UNSAFE-A1>", "<UNSAFE-A2>"]})
    fmt = load_format("kanana-safeguard-prompt")
    assert fmt.verdict_tokens(fmt.default_taxonomy()) == ("<SAFE>", "<UNSAFE-A1>", "<UNSAFE-A2>")
    with pytest.raises(InputError, match="judges user messages only"):
        fmt.render(to_messages([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]),
                   "assistant", fmt.default_taxonomy(), tok)
    custom = Taxonomy("mine", (Category("X1", "Mine"),))
    assert load_format("kanana-safeguard").language(custom, "user").words() == ["<SAFE>", "<UNSAFE-X1>"]


def test_without_a_chat_template_it_says_to_use_the_models_tokenizer():
    tok = char_tokenizer()
    with pytest.raises(TemplateError, match="own chat template"):
        load_format("kanana-safeguard").render(to_messages("hi"), "user", load_taxonomy("kanana-safeguard"), tok)
