"""Bad input gets the package's own error, naming the problem and the fix."""

from __future__ import annotations

import json

import pytest

from guardprob import Classifier, InputError, TaxonomyError, TemplateError, load_taxonomy
from guardprob.errors import GrammarError, GuardprobError


@pytest.mark.parametrize(
    "conversation, match",
    [
        ("", "empty"),
        ("   \n\t", "empty"),
        ([], "empty"),
        ([{"role": "user", "content": 5}], "content of type int"),
        ([{"role": "wizard", "content": "hi"}], "role 'wizard'"),
        (["hello"], "must be a mapping"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}], "empty"),
    ],
)
def test_bad_conversations(tiny_classifier, conversation, match):
    with pytest.raises(InputError, match=match):
        tiny_classifier.score(conversation)


def test_conversation_must_end_with_the_judged_role(tiny_classifier):
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(InputError, match="ends with a assistant message but the user role is judged"):
        tiny_classifier.score(convo, role="user")
    assert tiny_classifier.score(convo, "greedy", role="agent").verdict is not None


def test_prompt_longer_than_the_context(tiny_classifier):
    with pytest.raises(InputError, match="past the model's context"):
        tiny_classifier.score("word " * 1000)


def test_unknown_method_and_parameters(tiny_classifier):
    with pytest.raises(InputError, match="unknown method 'softmax'"):
        tiny_classifier.score("hi", method="softmax")
    with pytest.raises(InputError, match="unknown search parameter"):
        tiny_classifier.score("hi", beam=2)
    with pytest.raises(InputError, match="without reasoning first"):  # a reasoning setting, for formats that reason
        tiny_classifier.score("hi", temperature=2)
    with pytest.raises(InputError, match="eps=-1"):
        tiny_classifier.score("hi", eps=-1)
    with pytest.raises(InputError, match="top_p=0"):
        tiny_classifier.score("hi", top_p=0)
    with pytest.raises(InputError, match="speculate=-1.*0 turns speculation off"):
        tiny_classifier.score("hi", speculate=-1)


def test_bad_prompt_ids(tiny_classifier):
    with pytest.raises(InputError, match="empty"):
        tiny_classifier.score_ids([])
    with pytest.raises(InputError, match="not token ids"):
        tiny_classifier.score_ids([1, 2, 10_000_000])


def test_unknown_presets(tiny_model, char_tok):
    with pytest.raises(TaxonomyError, match="unknown taxonomy preset 'llama-guard-9'"):
        Classifier(tiny_model, char_tok, taxonomy="llama-guard-9")
    with pytest.raises(TemplateError, match="unknown format 'mistral'"):
        Classifier(tiny_model, char_tok, format="mistral")
    with pytest.raises(TemplateError, match="chat template"):
        Classifier(tiny_model, char_tok, format="instruction").score("hi")


def test_taxonomy_files(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("name: mine\ncategories:\n  - {id: V, name: Violence, description: hurting people}\n  - {id: F, name: Fraud}\n")
    assert load_taxonomy(good).ids == ("V", "F")
    as_json = tmp_path / "mine.json"
    as_json.write_text(json.dumps([{"id": "A", "name": "Alpha"}]))
    assert load_taxonomy(as_json).name == "mine"
    cases = {
        "dup.yaml": ("- {id: A, name: a}\n- {id: A, name: b}\n", "id 'A' twice"),
        "empty_id.yaml": ("- {id: '', name: a}\n", "field 'id'"),
        "no_name.yaml": ("- {id: A}\n", "field 'name'"),
        "comma.yaml": ("- {id: 'A,B', name: a}\n", "comma"),
        "broken.json": ("[{", "not valid JSON"),
        "empty.yaml": ("", "non-empty list"),
    }
    for name, (text, match) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(TaxonomyError, match=match) as err:
            load_taxonomy(path)
        assert str(path) in str(err.value)
    with pytest.raises(TaxonomyError, match="does not exist"):
        load_taxonomy(tmp_path / "missing.yaml")


def test_tokenizer_that_cannot_spell_a_custom_id(tiny_model, char_tok, tmp_path):
    path = tmp_path / "greek.json"
    path.write_text(json.dumps([{"id": "Ω1", "name": "omega"}]))
    with pytest.raises(GrammarError, match="Ω1"):
        Classifier(tiny_model, char_tok, taxonomy=path, format="llama-guard-3")


def test_errors_share_one_base_class():
    for error in (InputError, TaxonomyError, TemplateError, GrammarError):
        assert issubclass(error, GuardprobError) and issubclass(error, ValueError)


def test_conversation_files_name_the_line_and_the_fix(tmp_path):
    from guardprob.inputs.conversation import read_conversations

    with pytest.raises(InputError, match="does not exist"):
        list(read_conversations(tmp_path / "missing.jsonl"))
    path = tmp_path / "c.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}\n\n{"label": 1}\n', encoding="utf-8")
    rows = read_conversations(path)
    assert next(rows)[1] == {"role": "assistant", "content": "r"}  # the response is judged
    with pytest.raises(InputError, match=r"line 3: expected an object with 'messages'"):
        next(rows)


def test_spec_names_the_model_as_its_build_does():
    """A Ray driver writes the results header from spec.name before any worker builds the model."""
    from guardprob.spec import ClassifierSpec

    openai = ClassifierSpec(backend="openai", base_url="http://127.0.0.1:9/v1", served_model="guard")
    assert openai.name == Classifier.from_spec(openai).name == "guard"
    default = ClassifierSpec(backend="openai", base_url="http://127.0.0.1:9/v1")
    assert default.name == Classifier.from_spec(default).name
    assert ClassifierSpec(backend="llamacpp", model="models/llama-guard.Q4_K_M.gguf").name == "llama-guard.Q4_K_M"
    with pytest.raises(InputError, match="transformers backend takes none"):
        ClassifierSpec(options={"top_logprobs": 5})
