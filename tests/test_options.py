"""Every option is declared once (guardprob.options.table): the CLI flags of score, bench and
eval, the service's request fields (/v1/classify and /v1/moderations), the evaluation API's
params and the range checks of SearchConfig and TraceConfig follow the table; so do the
engines' options, the server config file's keys (types, ranges, unknown keys), the serve flags
that mirror them, and the run settings; and one ``flags`` rule gives the flags the service,
the judges, ``guardprob score`` and DecisionRule gave."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardprob.cli import build_parser
from guardprob.commands.options import reasoning_params, search_params
from guardprob.core.decision import DEFAULT_THRESHOLD, DecisionRule, calibrated, flags, side
from guardprob.core.estimators import METHODS
from guardprob.core.reasoning import TraceConfig
from guardprob.core.tree import SearchConfig
from guardprob.errors import InputError
from guardprob.options import OPTIONS, check, check_params, group
from guardprob.options.table import (
    ENGINE,
    GROUPS,
    LLAMACPP,
    METHOD_NAMES,
    OPENAI,
    RAY,
    SCORING,
    SEARCH,
    SERVER,
    TRACE,
    config_keys,
)
from guardprob.options.table import option as declared

# A value inside and one outside each option's range: a range that drifts fails here.
INSIDE = {"eps": 0.0, "top_p": 1.0, "max_nodes": 1, "max_depth": 1, "tolerance": 0.0, "batch": 1,
          "constrained": False, "speculate": 0, "prior": 0.0, "traces": 0, "temperature": 0.5, "seed": 3,
          "reasoning_tokens": 1, "decide": True}
OUTSIDE = {"eps": 1.5, "top_p": 0.0, "max_nodes": 0, "max_depth": 0, "tolerance": 1.0, "batch": 0,
           "constrained": "yes", "speculate": -1, "prior": math.inf, "traces": -1, "temperature": 0.0, "seed": 1.5,
           "reasoning_tokens": 0, "decide": "yes"}
# The settings (engine, server config, run), by group.name: inside values that also pass the
# config's checks across keys (queue_size >= max_inputs, ...), and outside ones of a wrong type or range.
SETTING_INSIDE = {
    "engine.cache_mb": 0, "engine.prefill_chunk": 1,
    "llamacpp.n_ctx": 0, "llamacpp.n_batch": 1, "llamacpp.n_threads": 2, "llamacpp.n_gpu_layers": -1,
    "llamacpp.max_sequences": 1, "llamacpp.extra_buffers": True,
    "openai.top_logprobs": 1, "openai.concurrency": 1, "openai.timeout": 0.5, "openai.retries": 0, "openai.backoff": 0,
    "openai.prompt_format": "ids", "openai.token_ids": True, "openai.verify": "local", "openai.api_key": "k",
    "openai.max_context": 1, "openai.text_mismatch": "allow", "openai.batch_prompts": "off",
    "server.method": "joint", "server.default_threshold": 1.0, "server.max_inputs": 1, "server.max_chars": 1,
    "server.max_body_bytes": 100, "server.batch_wait_ms": 0, "server.max_batch": 1, "server.max_running": 16,
    "server.round_nodes": 1, "server.continuous": True, "server.queue_size": 32, "server.timeout_s": 1,
    "server.max_request_chars": 20_000, "server.max_request_tokens": 1, "server.docs": True, "server.decide": False,
    "server.playground": False, "server.openai_categories": "none",
    "ray.replicas": 3, "ray.min_replicas": 0, "ray.max_replicas": 1, "ray.target_ongoing_requests": 1,
    "ray.max_ongoing_requests": 8, "ray.num_cpus": 0.5, "ray.num_gpus": 0, "ray.affinity": False, "ray.retries": 0,
    "ray.ingress_replicas": 2, "ray.upscale_delay_s": 0, "ray.downscale_delay_s": 0,
    "run.batch_size": 1, "run.limit": 1,
}
SETTING_OUTSIDE = {
    "engine.cache_mb": -3, "engine.prefill_chunk": 0,
    "llamacpp.n_ctx": -1, "llamacpp.n_batch": 0, "llamacpp.n_threads": 1.5, "llamacpp.n_gpu_layers": -2,
    "llamacpp.max_sequences": 0, "llamacpp.extra_buffers": "no",
    "openai.top_logprobs": 0, "openai.concurrency": True, "openai.timeout": 0, "openai.retries": -1,
    "openai.backoff": math.nan, "openai.prompt_format": "bytes", "openai.token_ids": 1, "openai.verify": "both",
    "openai.api_key": "", "openai.max_context": 0, "openai.text_mismatch": "ignore", "openai.batch_prompts": "yes",
    "server.method": "best", "server.default_threshold": 2, "server.max_inputs": 0, "server.max_chars": "20000",
    "server.max_body_bytes": 1.5, "server.batch_wait_ms": -1, "server.max_batch": 0, "server.max_running": False,
    "server.round_nodes": -5, "server.continuous": "yes", "server.queue_size": 0, "server.timeout_s": 0,
    "server.max_request_chars": None, "server.max_request_tokens": 0, "server.docs": 1, "server.decide": "no",
    "server.playground": None, "server.openai_categories": " ",
    "ray.replicas": 0, "ray.min_replicas": -1, "ray.max_replicas": 0, "ray.target_ongoing_requests": 0,
    "ray.max_ongoing_requests": 0, "ray.num_cpus": math.inf, "ray.num_gpus": -1, "ray.affinity": "yes",
    "ray.retries": -1, "ray.ingress_replicas": 0, "ray.upscale_delay_s": -1, "ray.downscale_delay_s": "1m",
    "run.batch_size": 0, "run.limit": 0,
}
# The server config file's keys that are no option: mappings and lists, read on their own.
STRUCTURED = {"search", "thresholds", "cors_origins", "ray"}


def key(o) -> str:
    return f"{o.group}.{o.name}"


def test_the_table_names_each_option_once_in_a_known_group():
    for g in GROUPS:
        names = [o.name for o in group(g)]
        assert len(names) == len(set(names)), g
    assert len(OPTIONS) == sum(len(group(g)) for g in GROUPS)
    scoring = [o.name for o in OPTIONS if o.group in SCORING]
    assert len(scoring) == len(set(scoring)) and set(INSIDE) == set(scoring) == set(OUTSIDE)
    assert set(SETTING_INSIDE) == {key(o) for o in OPTIONS if o.group not in SCORING} == set(SETTING_OUTSIDE)
    assert {o.group for o in OPTIONS} == set(GROUPS)
    assert METHOD_NAMES == METHODS  # the server's method choices are the estimators


@pytest.mark.parametrize("option", OPTIONS, ids=key)
def test_each_option_checks_its_range_and_names_itself(option):
    inside = INSIDE[option.name] if option.group in SCORING else SETTING_INSIDE[key(option)]
    outside = OUTSIDE[option.name] if option.group in SCORING else SETTING_OUTSIDE[key(option)]
    assert option.check(inside) == inside
    assert option.check(option.default) == option.default
    with pytest.raises(InputError, match=f"^{option.name}=.*: use "):
        option.check(outside)
    with pytest.raises(InputError, match=f"^the file: field '{option.name}' is .*; {re.escape(option.fix)}$"):
        option.check(outside, f"the file: field '{option.name}'")
    if option.group in SCORING:
        assert check(option.name, inside) == inside


def test_search_and_trace_configs_take_the_tables_defaults_and_checks():
    assert {o.attr: o.default for o in group(SEARCH)} == {k: v for k, v in SearchConfig().as_dict().items()
                                                           if k in {o.attr for o in group(SEARCH)}}
    assert {o.attr: o.default for o in group(TRACE)} == vars(TraceConfig())
    for o in group(SEARCH):
        with pytest.raises(InputError, match=f"^{o.name}="):
            SearchConfig(**{o.attr: OUTSIDE[o.name]})
    for o in group(TRACE):
        with pytest.raises(InputError, match=f"^{o.name}="):
            TraceConfig(**{o.attr: OUTSIDE[o.name]})
    # the old messages, word for word
    with pytest.raises(InputError, match=r"^speculate=-1: use a number of grammar tokens >= 0 \(0 turns speculation off\)$"):
        SearchConfig(speculate=-1)
    with pytest.raises(InputError, match=r"^reasoning_tokens=0: use a positive number of tokens$"):
        TraceConfig(max_tokens=0)


def _table_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.option_strings[0]: a for g in parser._action_groups if g.title in ("search", "reasoning (formats that reason before the verdict)")
            for a in g._group_actions}


@pytest.mark.parametrize("command", ["score", "bench", "eval"])
def test_the_cli_flags_are_the_tables(command):
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    actions = _table_actions(sub)
    flagged = [o for o in OPTIONS if o.flag and o.group in (SEARCH, TRACE)]
    assert set(actions) == {o.flag for o in flagged}
    for o in flagged:
        assert f"default {o.default_text()}" in actions[o.flag].help, o.name
    # each flag, given, arrives under the option's name; none given: nothing
    argv = ["x"] if command == "score" else []
    args = sub.parse_args(argv)
    assert search_params(args) == {} and reasoning_params(args) == {}
    for o in flagged:
        if o.type is bool:
            extra = [o.flag]
            want = not o.default
        else:
            want = INSIDE[o.name]
            extra = [o.flag, str(want)]
        got = {**search_params(sub.parse_args(argv + extra)), **reasoning_params(sub.parse_args(argv + extra))}
        assert got == {o.name: want}


def test_the_request_fields_are_the_tables():
    from pydantic import ValidationError

    from guardprob.server.schemas import ClassifyRequest

    fields = ClassifyRequest.model_fields
    taken = [o for o in OPTIONS if o.request]
    assert {o.name for o in taken} <= set(fields)
    assert set(fields) - {o.name for o in taken} == {"messages", "input", "role", "method", "model", "deadline_ms",
                                                      "stream", "chunks"}
    for o in taken:
        f = fields[o.name]
        assert f.default == (o.default if o.type is bool else None), o.name
        bounds = {k: getattr(m, k) for m in f.metadata for k in ("ge", "gt", "le", "lt") if hasattr(m, k)}
        assert bounds == dict(o.bounds), o.name
    assert ClassifyRequest(traces=16).traces == 16
    with pytest.raises(ValidationError):
        ClassifyRequest(traces=17)


# -- settings: engines, the server config file, guardprob serve, /v1/moderations -------------
def _holds(cls, group_name: str, skip: tuple[str, ...] = ()) -> None:
    """A dataclass's fields are the group's options, with the table's defaults."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    assert sorted(names) == sorted(o.name for o in group(group_name)), cls
    for o in group(group_name):
        assert getattr(cls(), o.attr) == o.default, o.name


def test_the_engine_options_are_the_tables():
    from guardprob.backends.llamacpp import LlamaCppOptions
    from guardprob.backends.openai import OpenAIOptions
    from guardprob.backends.registry import _options
    from guardprob.backends.settings import check_cache_mb, check_prefill_chunk
    from guardprob.spec import ClassifierSpec

    _holds(LlamaCppOptions, LLAMACPP)
    _holds(OpenAIOptions, OPENAI)
    for cls, name in ((LlamaCppOptions, LLAMACPP), (OpenAIOptions, OPENAI)):
        for o in group(name):  # each option, as --backend-option KEY=VALUE gives it, checked by the table
            assert getattr(_options(cls, {o.name: SETTING_INSIDE[key(o)]}, name), o.name) == SETTING_INSIDE[key(o)]
            with pytest.raises(InputError, match=f"^{o.name}=.*: {re.escape(o.fix)}$"):
                _options(cls, {o.name: SETTING_OUTSIDE[key(o)]}, name)
    # cache_mb and prefill_chunk: the spec's and the engines' checks are the table's
    assert {o.name for o in group(ENGINE)} <= {f.name for f in dataclasses.fields(ClassifierSpec)}
    assert all(getattr(ClassifierSpec(), o.name) == o.default for o in group(ENGINE))
    for o, check_one in ((declared(ENGINE, "cache_mb"), check_cache_mb), (declared(ENGINE, "prefill_chunk"), check_prefill_chunk)):
        assert check_one(SETTING_INSIDE[key(o)]) == SETTING_INSIDE[key(o)]
        with pytest.raises(InputError, match=f"^{o.name} is .*; {re.escape(o.fix)}$"):
            check_one(SETTING_OUTSIDE[key(o)])
        with pytest.raises(InputError, match=re.escape(o.fix)):
            ClassifierSpec(**{o.name: SETTING_OUTSIDE[key(o)]})


def test_the_server_config_keys_are_the_tables(tmp_path):
    from guardprob.server.config import STRUCTURED_KEYS, RayServeConfig, ServerConfig, file_keys, load_config

    # every field of ServerConfig a file may set is a table option or a structured key, and back
    not_in_files = {"api_keys", "calibration", "source"}
    assert set(STRUCTURED_KEYS) == STRUCTURED
    assert {f.name for f in dataclasses.fields(ServerConfig)} - not_in_files == set(file_keys())
    assert set(file_keys()) == {o.name for o in config_keys()} | STRUCTURED
    assert {o.group for o in config_keys()} == {SERVER, ENGINE}
    for o in config_keys():
        assert getattr(ServerConfig(), o.attr) == o.default, o.name
    _holds(RayServeConfig, RAY, skip=("source",))
    path = tmp_path / "server.json"
    for o in config_keys():  # a file's key: its value read, or the table's error naming the file, the key and the fix
        path.write_text(json.dumps({o.name: SETTING_INSIDE[key(o)]}))
        assert getattr(load_config(path), o.attr) == SETTING_INSIDE[key(o)], o.name
        path.write_text(json.dumps({o.name: SETTING_OUTSIDE[key(o)]}))
        with pytest.raises(InputError, match=f"^server config file {re.escape(str(path))}: field '{o.name}' is "
                                             f".*; {re.escape(o.fix)}$"):
            load_config(path)
    for o in group(RAY):  # the ray mapping's keys, named ray.KEY
        context = {"max_replicas": 2} if o.name == "min_replicas" else {}
        path.write_text(json.dumps({"ray": {o.name: SETTING_INSIDE[key(o)], **context}}))
        assert getattr(load_config(path).ray, o.attr) == SETTING_INSIDE[key(o)], o.name
        path.write_text(json.dumps({"ray": {o.name: SETTING_OUTSIDE[key(o)], **context}}))
        with pytest.raises(InputError, match=f"field 'ray.{o.name}' is .*; {re.escape(o.fix)}$"):
            load_config(path)
    path.write_text(json.dumps({"max_batches": 4}))
    with pytest.raises(InputError, match=r"unknown field\(s\) max_batches; use .*max_batch"):
        load_config(path)
    path.write_text(json.dumps({"search": {"eps": 7}}))  # search values: the table's check, at load
    with pytest.raises(InputError, match=r"field 'search': eps=7: use a mass"):
        load_config(path)


def _listed_keys(text: str) -> tuple[set[str], set[str]]:
    """The top-level keys and the ray mapping's keys of a config file written out in a page."""
    top = set(re.findall(r"^(\w+):", text, re.M))
    block = re.search(r"^ray:.*\n((?:[ ]{2}\w+:.*\n)+)", text, re.M)
    return top, set(re.findall(r"^[ ]{2}(\w+):", block.group(1), re.M)) if block else set()


@pytest.mark.parametrize("page", ["module docstring", "docs/server.md"])
def test_the_written_out_config_files_list_every_key(page):
    from pathlib import Path

    from guardprob.server import config
    from guardprob.server.config import file_keys

    if page == "module docstring":
        text = "\n".join(line[4:] for line in config.__doc__.splitlines()) + "\n"  # the block: indented four spaces
    else:
        doc = (Path(__file__).resolve().parents[1] / page).read_text(encoding="utf-8")
        text = re.search(r"^## Config file\n.*?```yaml\n(.*?)```", doc, re.S | re.M).group(1)
    top, ray = _listed_keys(text)
    assert top == set(file_keys()), page
    assert ray == {o.name for o in group(RAY)}, page


@pytest.mark.parametrize("engine", [LLAMACPP, OPENAI])
def test_the_engine_pages_list_every_engine_option(engine):
    """docs/engines.md's "Options (`ClassifierSpec.options`)" paragraph of each engine names
    exactly the table's options, and where it gives a default in brackets, the table's."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "engines.md").read_text(encoding="utf-8")
    paragraphs = re.findall(r"^Options \(`ClassifierSpec.options`\): (.*?)\n\n", doc, re.S | re.M)
    options = {o.name: o for o in group(engine)}
    listed = [p for p in paragraphs if set(re.findall(r"`(\w+)`", p)) & set(options)]
    assert len(listed) == 1, paragraphs
    named = re.findall(r"`(\w+)`(?: \(([^)`]*)\))?", listed[0])
    assert set(options) <= {name for name, _ in named}, set(options) - {name for name, _ in named}
    for name, said in named:
        if name in options and re.fullmatch(r"-?\d+|True|False", said):
            assert said == str(options[name].default), (name, said, options[name].default)


def _serve():
    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]


def test_the_serve_flags_that_mirror_config_keys_are_the_tables(tmp_path):
    from guardprob.server.cli import build_config
    from guardprob.server.config import ServerConfig, file_keys

    serve = _serve()
    by_dest = {a.dest: a for a in serve._actions}
    flagged = [o for o in config_keys() if o.flag is not None]
    assert {o.name for o in flagged} >= {"method", "docs", "playground", "cache_mb", "prefill_chunk"}
    # a flag whose destination is a scalar config key (or a key of its ray mapping) is the table's flag for it
    mirrored = {d for d in by_dest if d in set(file_keys()) - STRUCTURED}
    assert mirrored == {o.name for o in flagged}
    ray_flagged = [o for o in group(RAY) if o.flag is not None]
    assert {d for d in by_dest if d in {o.name for o in group(RAY)}} == {o.name for o in ray_flagged} == {"replicas"}
    for o in ray_flagged:
        assert by_dest[o.name].option_strings == [o.flag] and o.help in by_dest[o.name].help
        assert build_config(serve.parse_args(["--ray", o.flag, "3"])).ray.replicas == 3
        with pytest.raises(InputError, match=f"^{o.flag} is 0; {re.escape(o.fix)}$"):
            build_config(serve.parse_args(["--ray", o.flag, "0"]))
    for o in flagged:
        action = by_dest[o.name]
        assert action.option_strings == [o.flag] and action.default is None, o.name
        assert o.help in action.help, o.name
        if o.choices is not None:
            assert tuple(action.choices) == o.choices
    assert build_config(serve.parse_args([])) == ServerConfig()  # nothing given: the table's defaults
    path = tmp_path / "server.yaml"
    for o in flagged:  # given: over the config file's value
        path.write_text(f"{o.name}: {json.dumps(o.default if o.default is not None else SETTING_INSIDE[key(o)])}\n")
        if o.type is bool:
            argv, want = [o.flag], not o.default
        else:
            want = "conditional" if o.name == "method" else SETTING_INSIDE[key(o)] + 1
            argv = [o.flag, str(want)]
        assert getattr(build_config(serve.parse_args(["--config", str(path), *argv])), o.attr) == want, o.name
        assert getattr(build_config(serve.parse_args(["--config", str(path)])), o.attr) == getattr(
            ServerConfig(**{o.name: o.default if o.default is not None else SETTING_INSIDE[key(o)]}), o.attr)


def test_the_moderation_fields_are_the_tables():
    from guardprob.server.schemas import ClassifyRequest, ModerationRequest

    fields = ModerationRequest.model_fields
    taken = [o for o in group(SEARCH) if o.request]
    assert set(fields) - {"input", "model"} == {o.name for o in taken}
    for o in taken:  # as /v1/classify has them
        assert repr(fields[o.name]) == repr(ClassifyRequest.model_fields[o.name]), o.name
        assert fields[o.name].default is None and fields[o.name].description == o.help


def test_moderations_take_the_search_options_from_the_openai_client(tiny_classifier):
    """The openai client's extra_body reaches the search: each field checked as /v1/classify checks
    it (the table's range, the server's max_nodes ceiling); an unknown field or a wrong type is refused."""
    import openai

    from guardprob.server import create_app
    from guardprob.server.config import ServerConfig, category_keys
    from serving import running

    config = ServerConfig(search={"eps": 0.2, "max_nodes": 64}, openai_categories="none", decide=False)
    keys = category_keys(tiny_classifier.taxonomy)  # the response's key of each category id
    with running(create_app(tiny_classifier, config)) as r:
        client = r.client()
        plain = tiny_classifier.score("hello", eps=0.2, max_nodes=64)
        # settings under which the search ends on its own (no budget cut): the same in any order of calls
        for extra in ({}, {"eps": 0.05}, {"eps": 0.02, "top_p": 0.9}, {"eps": 0.02, "max_depth": 10, "max_nodes": 40}):
            got = client.moderations.create(model="tiny", input="hello", extra_body=extra).results[0]
            expected = tiny_classifier.score("hello", **{"eps": 0.2, "max_nodes": 64, **extra})
            assert (expected.expanded_nodes != plain.expanded_nodes) == bool(extra)  # each override changes the search
            rows = {keys[cid]: c.p for cid, c in expected.categories.items()}
            assert got.category_scores.to_dict() == pytest.approx(rows, abs=1e-6), extra
        for o in (o for o in group(SEARCH) if o.request):  # out of range: 400, naming the field
            with pytest.raises(openai.BadRequestError) as info:
                client.moderations.create(model="tiny", input="hello", extra_body={o.name: OUTSIDE[o.name]})
            assert info.value.status_code == 400 and info.value.body["param"] == o.name, o.name
            assert info.value.body["code"] == "invalid_value" and o.fix in info.value.body["message"]
        with pytest.raises(openai.BadRequestError) as info:
            client.moderations.create(model="tiny", input="hello", extra_body={"max_nodes": 65})
        assert "above this server's limit of 64" in info.value.body["message"]
        with pytest.raises(openai.BadRequestError) as info:
            client.moderations.create(model="tiny", input="hello", extra_body={"beam": 3})
        assert info.value.body["code"] == "unknown_parameter" and info.value.body["param"] == "beam"
        with pytest.raises(openai.UnprocessableEntityError) as info:
            client.moderations.create(model="tiny", input="hello", extra_body={"eps": "0.1"})
        assert info.value.body["param"] == "eps"


def test_the_eval_api_takes_exactly_the_search_and_trace_options(tmp_path):
    from guardprob.evaluation.api import evaluate

    assert check_params({o.name: o.default for o in OPTIONS if o.group in (SEARCH, TRACE)}) is not None
    with pytest.raises(InputError, match="unknown option.*bogus"):
        evaluate(out=tmp_path / "o", params={"bogus": 1}, show=False, progress=False)
    with pytest.raises(InputError, match="^eps=7"):
        evaluate(out=tmp_path / "o", params={"eps": 7}, show=False, progress=False)
    with pytest.raises(InputError, match="unknown option.*decide"):
        check_params({"decide": True})


# -- one flag rule --------------------------------------------------------------------------
class _Calibration:
    """A monotone calibration: p ** power per category (the identity where none)."""

    def __init__(self, powers: dict[str, float], thresholds: dict[str, float]):
        self.powers, self.thresholds = powers, thresholds

    def calibrate(self, category: str, p: float) -> float:
        return float(p) ** self.powers.get(category, 1.0)

    def flagged(self, probabilities):  # Calibration.flagged, as guardprob score read it before
        return [c for c, p in probabilities.items() if self.calibrate(c, p) >= self.thresholds.get(c, 0.5)]


IDS = ["S1", "S2", "S3"]
probability = st.floats(0, 1, allow_subnormal=False)  # a fast-math library loaded earlier may flush subnormals


@settings(max_examples=200, deadline=None)
@given(st.fixed_dictionaries({c: probability for c in IDS}), st.fixed_dictionaries({c: probability for c in IDS}),
       st.one_of(st.none(), st.fixed_dictionaries({c: st.sampled_from([0.5, 1.0, 2.0]) for c in IDS})),
       st.dictionaries(st.sampled_from(IDS), probability))
def test_flags_give_the_old_answers(scores, thresholds, powers, fitted):
    calibration = None if powers is None else _Calibration(powers, fitted)
    got = flags(scores, thresholds, calibration)
    # the service's and the judges' rows: score = calibrated (or p) >= threshold
    old = {c: (p if calibration is None else calibration.calibrate(c, p)) >= thresholds[c] for c, p in scores.items()}
    assert got == old
    assert all(calibrated(c, p, calibration) == (p if calibration is None else calibration.calibrate(c, p))
               for c, p in scores.items())
    # DecisionRule on a point interval
    taxonomy = SimpleNamespace(ids=IDS, name="t")
    rule = DecisionRule.build(taxonomy, thresholds, calibration)
    assert {c: rule.category_side(c, p, p) for c, p in scores.items()} == got
    assert all(side(p, p, thresholds[c], None if calibration is None else
                    (lambda q, c=c: calibration.calibrate(c, q))) == got[c] for c, p in scores.items())
    # guardprob score's --calibration flags: the calibration's thresholds, 0.5 where it has none
    if calibration is not None:
        marks = flags(scores, fitted, calibration, DEFAULT_THRESHOLD)
        assert [c for c, f in marks.items() if f] == calibration.flagged(scores)
    # the OpenAI names: p against the configured threshold, else the default
    assert flags(scores, {"S1": 0.3}, None, 0.5) == {c: p >= (0.3 if c == "S1" else 0.5) for c, p in scores.items()}


def test_flags_without_a_threshold_say_so():
    with pytest.raises(InputError, match="no threshold for 'S2'"):
        flags({"S1": 0.2, "S2": 0.9}, {"S1": 0.5})


# -- one options object -----------------------------------------------------------------------
def test_keyword_arguments_become_one_options_object_at_the_boundary(tiny_classifier):
    from guardprob.options.score import ScoreOptions

    clf = tiny_classifier
    options = clf.options("marginal", eps=0.01, max_nodes=30, temperature=1.0)
    assert options == ScoreOptions(clf.search_config("marginal", eps=0.01, max_nodes=30), TraceConfig())
    assert options.decision is None and hash(options) == hash(ScoreOptions(options.search, TraceConfig()))
    assert clf.options("marginal", decide=True, thresholds=0.3).decision.thresholds["unsafe"] == 0.3
    prompt = clf.prompt("hello")
    by_keywords = clf.score_prompts([prompt], ("marginal",), eps=0.01, max_nodes=30)[0]["marginal"]
    run = clf.start([prompt], ("marginal",), options=options).finish()
    # the same search (a tree prior from the first changes the calls, hence float rounding only)
    assert run.results()[0]["marginal"].p_unsafe == pytest.approx(by_keywords.p_unsafe, abs=1e-6)
    assert clf.score("hello", eps=0.01, max_nodes=30).p_unsafe == pytest.approx(by_keywords.p_unsafe, abs=1e-6)
    with pytest.raises(InputError, match="either as one ScoreOptions"):
        clf.start([prompt], ("marginal",), options=options, eps=0.5)
    with pytest.raises(InputError, match=r"^eps=2: use a mass"):
        clf.score("hello", eps=2)
    with pytest.raises(InputError, match=r"^deadline=0: give a number of seconds"):
        clf.score("hello", deadline=0)
