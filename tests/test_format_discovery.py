"""Formats found outside the package: a module on GUARDPROB_FORMAT_PATH and an installed
plugin's entry point, each with its own inline taxonomy, through ``guardprob formats``,
``guardprob score`` (in a fresh process, as a user runs them) and the service (uvicorn on
loopback); and the registry's own promises (a name taken twice is refused, naming both modules).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from guardprob import (
    Classifier,
    TemplateError,
    load_taxonomy,  # presets, files and the formats' own taxonomies
)
from guardprob.formats import REGISTRY, detect, load_format
from guardprob.formats.discovery import ENV
from helpers import char_tokenizer, tiny_llama
from serving import running

SRC = Path(__file__).resolve().parents[1] / "src"

PLUGIN = '''
"""A throwaway topic format: one topic id, or none."""

from dataclasses import dataclass

from guardprob.formats import Format, register_format
from guardprob.formats.base import encode, transcript
from guardprob.formats.language import UNSAFE, Branch, Language
from guardprob.taxonomy import Category, Taxonomy

TOPICS = Taxonomy("{name}-topics", (Category("billing", "Billing"), Category("outage", "Outage")))


@register_format("{name}", markers=("{name}-guard",))
@dataclass(frozen=True)
class TopicFormat(Format):
    name: str = "{name}"
    taxonomy: Taxonomy = TOPICS

    def language(self, taxonomy, role):
        branches = [Branch(("none",))] + [Branch((c,), frozenset({{c, UNSAFE}})) for c in taxonomy.ids]
        return Language(branches, (*taxonomy.ids, UNSAFE), first_words=taxonomy.ids)

    def render(self, messages, role, taxonomy, tokenizer):
        return encode(tokenizer, [("Topics: billing, outage.\\n", False)], transcript(messages) + [("Topic: ", False)], role)
'''


def write_plugin(directory: Path, name: str, stem: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem or name.replace('-', '_')}.py"
    path.write_text(PLUGIN.format(name=name))
    return path


def cli(*args: str, env: dict[str, str], path: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), path]))}
    return subprocess.run([sys.executable, "-m", "guardprob.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tok = char_tokenizer()
    tiny_llama(len(tok), seed=3, max_position_embeddings=4096).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_a_module_on_the_path_is_listed_picked_and_scored(tmp_path, model_dir):
    write_plugin(tmp_path / "formats", "acme-topics")
    env = {ENV: str(tmp_path / "formats")}
    listed = cli("formats", "--model", "acme/acme-topics-guard-1b", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "acme-topics            taxonomy acme-topics-topics: A throwaway topic format" in listed.stdout
    assert "acme-topics-topics     2 categories: billing, outage" in listed.stdout
    assert "--format auto for acme/acme-topics-guard-1b: acme-topics (from the model name" in listed.stdout
    scored = cli("score", "my invoice is wrong", "--model", str(model_dir), "--format", "acme-topics", "--json",
                 "--eps", "0", env=env)
    assert scored.returncode == 0, scored.stderr
    row = json.loads(scored.stdout.strip().splitlines()[-1])
    assert set(row["categories"]) == {"billing", "outage"}
    assert row["p_unsafe"] == pytest.approx(sum(c["p"] for c in row["categories"].values()), abs=1e-6)
    named = cli("score", "hi", "--model", str(model_dir), "--format", "acme-topics", "--taxonomy", "acme-topics-topics",
                "--json", "--eps", "0.5", env=env)
    assert named.returncode == 0, named.stderr
    without = cli("formats", env={ENV: ""})
    assert "acme-topics" not in without.stdout  # found through the variable, nowhere else


def test_an_installed_plugin_is_found_through_its_entry_point(tmp_path):
    site = tmp_path / "site"
    write_plugin(site, "plug-topics", stem="plug_topics_format")
    info = site / "plug_topics-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plug-topics\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[guardprob.formats]\nplug-topics = plug_topics_format\n")
    listed = cli("formats", "--model", "x/plug-topics-guard", env={ENV: ""}, path=str(site))
    assert listed.returncode == 0, listed.stderr
    assert "plug-topics            taxonomy plug-topics-topics" in listed.stdout
    assert "--format auto for x/plug-topics-guard: plug-topics" in listed.stdout


def test_a_name_taken_twice_is_refused_naming_both_modules(tmp_path):
    write_plugin(tmp_path / "one", "twin-topics")
    write_plugin(tmp_path / "two", "twin-topics", stem="twin_again")
    refused = cli("formats", env={ENV: os.pathsep.join([str(tmp_path / "one"), str(tmp_path / "two")])})
    assert refused.returncode == 2
    assert "two formats are registered as 'twin-topics'" in refused.stderr
    assert "guardprob_format_path.twin_topics.TopicFormat" in refused.stderr
    assert "guardprob_format_path.twin_again.TopicFormat" in refused.stderr
    shipped = cli("formats", env={ENV: str(write_plugin(tmp_path / "three", "qwen3guard").parent)})
    assert shipped.returncode == 2 and "guardprob.formats.qwen3guard.Qwen3GuardFormat" in shipped.stderr


def test_a_broken_module_or_a_missing_directory_says_what_to_do(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.py").write_text("raise RuntimeError('boom')\n")
    broken = cli("formats", env={ENV: str(tmp_path / "bad")})
    assert broken.returncode == 2 and "broken.py" in broken.stderr and "boom" in broken.stderr
    missing = cli("formats", env={ENV: str(tmp_path / "nowhere")})
    assert missing.returncode == 2 and "is not a directory" in missing.stderr


def test_the_service_scores_a_format_found_on_the_path(tmp_path, monkeypatch):
    from guardprob.server import ServerConfig, create_app

    write_plugin(tmp_path / "served", "served-topics")
    monkeypatch.setenv(ENV, str(tmp_path / "served"))
    assert "served-topics" in REGISTRY and detect("me/served-topics-guard")[0] == "served-topics"
    assert load_taxonomy("served-topics-topics").ids == ("billing", "outage")
    tok = char_tokenizer()
    clf = Classifier(tiny_llama(len(tok), seed=5, max_position_embeddings=4096), tok, format="served-topics", name="t")
    assert clf.taxonomy is load_format("served-topics").taxonomy  # the inline taxonomy is the default
    with running(create_app(clf, ServerConfig())) as served:
        answer = httpx.post(f"{served.url}/v1/classify", json={"input": "the site is down"}, timeout=60).json()
        expected = clf.score("the site is down", "marginal", **{k: answer["params"][k] for k in ("eps", "top_p", "max_nodes")})
        assert answer["format"] == "served-topics" and set(answer["categories"]) == {"billing", "outage"}
        for cid, score in expected.categories.items():
            assert answer["categories"][cid]["p"] == pytest.approx(score.p, abs=1e-6)


def test_a_format_object_must_be_a_format():
    with pytest.raises(TemplateError, match="subclass guardprob.formats.Format"):
        load_format(object())  # type: ignore[arg-type]
