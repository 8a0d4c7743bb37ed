"""Every scoring option is declared once (guardprob.options.table): the CLI flags of score,
bench and eval, the service's request fields, the evaluation API's params and the range
checks of SearchConfig and TraceConfig all follow the table, and one ``flags`` rule gives
the flags the service, the judges, ``guardprob score`` and DecisionRule gave."""

from __future__ import annotations

import argparse
import math
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardprob.cli import build_parser
from guardprob.commands.options import reasoning_params, search_params
from guardprob.core.decision import DEFAULT_THRESHOLD, DecisionRule, calibrated, flags, side
from guardprob.core.reasoning import TraceConfig
from guardprob.core.tree import SearchConfig
from guardprob.errors import InputError
from guardprob.options import OPTIONS, check, check_params, group
from guardprob.options.table import DECISION, SEARCH, TRACE

# A value inside and one outside each option's range: a range that drifts fails here.
INSIDE = {"eps": 0.0, "top_p": 1.0, "max_nodes": 1, "max_depth": 1, "tolerance": 0.0, "batch": 1,
          "constrained": False, "speculate": 0, "prior": 0.0, "traces": 0, "temperature": 0.5, "seed": 3,
          "reasoning_tokens": 1, "decide": True}
OUTSIDE = {"eps": 1.5, "top_p": 0.0, "max_nodes": 0, "max_depth": 0, "tolerance": 1.0, "batch": 0,
           "constrained": "yes", "speculate": -1, "prior": math.inf, "traces": -1, "temperature": 0.0, "seed": 1.5,
           "reasoning_tokens": 0, "decide": "yes"}


def test_the_table_names_each_option_once_in_a_known_group():
    names = [o.name for o in OPTIONS]
    assert len(names) == len(set(names))
    assert set(INSIDE) == set(names) == set(OUTSIDE)
    assert {o.group for o in OPTIONS} == {SEARCH, TRACE, DECISION}


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_each_option_checks_its_range_and_names_itself(option):
    assert check(option.name, INSIDE[option.name]) == INSIDE[option.name]
    assert check(option.name, option.default) == option.default
    with pytest.raises(InputError, match=f"^{option.name}=.*: use "):
        check(option.name, OUTSIDE[option.name])


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


def test_the_eval_api_takes_exactly_the_search_and_trace_options(tmp_path):
    from guardprob.evaluation.api import evaluate

    assert check_params({o.name: o.default for o in OPTIONS if o.group != DECISION}) is not None
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
