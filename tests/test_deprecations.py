"""Old public names keep working for a release, with a DeprecationWarning that names the new one."""

from __future__ import annotations

import warnings

import pytest

from guardprob import Classifier, InputError

TEXT = "How do I pick a lock?"
SEARCH = {"eps": 0.05, "max_nodes": 64}


def _scores(clf: Classifier) -> dict:
    s = clf.score(TEXT, **SEARCH)
    return {"p_unsafe": s.p_unsafe, "nodes": s.expanded_nodes, **{c: v.p for c, v in s.categories.items()}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model, char_tok):
    """The tiny model and tokenizer saved as a directory, for from_pretrained."""
    path = tmp_path_factory.mktemp("tiny")
    tiny_model.save_pretrained(path)
    char_tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("name", ["llama-guard-4", "llama-guard-2"])
def test_template_keyword_warns_and_scores_as_format(tiny_model, char_tok, name):
    with pytest.warns(DeprecationWarning, match=r"template= is deprecated, use format=") as caught:
        old = Classifier(tiny_model, char_tok, template=name, name="tiny")
    assert caught[0].filename == __file__  # the warning points at the caller's line
    new = Classifier(tiny_model, char_tok, format=name, name="tiny")
    assert old.format.name == new.format.name == name
    assert old.taxonomy.ids == new.taxonomy.ids
    assert old.render(TEXT) == new.render(TEXT)
    assert _scores(old) == _scores(new)


def test_template_file_still_accepted(tiny_model, char_tok, tmp_path):
    """The previous version's prompt files ({{categories}}, {{conversation}}, {{role}}) under the old keyword."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Categories:\n{{categories}}\nConversation:\n{{conversation}}\nIs the {{role}} message safe?\n")
    with pytest.warns(DeprecationWarning, match="format="):
        old = Classifier(tiny_model, char_tok, template=prompt, name="tiny")
    assert old.render(TEXT) == Classifier(tiny_model, char_tok, format=prompt, name="tiny").render(TEXT)


def test_from_pretrained_template_keyword_warns(model_dir):
    with pytest.warns(DeprecationWarning, match=r"Classifier.from_pretrained: template= is deprecated, use format=") as caught:
        old = Classifier.from_pretrained(str(model_dir), template="llama-guard-2")
    assert len([w for w in caught if w.category is DeprecationWarning]) == 1
    assert caught[0].filename == __file__
    assert old.format.name == "llama-guard-2"
    # the previous version's rule: Llama Guard 2's prompt comes with its own 11 categories
    assert old.taxonomy.ids == tuple(f"S{i}" for i in range(1, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = Classifier.from_pretrained(str(model_dir), format="llama-guard-2")
    assert _scores(old) == _scores(new)


def test_both_names_is_an_input_error(tiny_model, char_tok, model_dir):
    with pytest.raises(InputError, match=r"template= is the older name of format=; give format= only"):
        Classifier(tiny_model, char_tok, format="llama-guard-4", template="llama-guard-3")
    with pytest.raises(InputError, match=r"from_pretrained: template= is the older name of format="):
        Classifier.from_pretrained(str(model_dir), format="llama-guard-4", template="llama-guard-3")


def test_new_names_and_positional_format_do_not_warn(tiny_model, char_tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        by_position = Classifier(tiny_model, char_tok, "llama-guard-3", "llama-guard-4", name="tiny")
        by_keyword = Classifier(tiny_model, char_tok, format="llama-guard-4", name="tiny")
    assert by_position.format.name == by_keyword.format.name == "llama-guard-4"


def test_template_attribute_warns_and_is_the_format(tiny_classifier):
    with pytest.warns(DeprecationWarning, match=r"Classifier.template is deprecated, use Classifier.format"):
        old = tiny_classifier.template
    assert old is tiny_classifier.format
