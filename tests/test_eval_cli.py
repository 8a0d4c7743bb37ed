"""``guardprob eval`` through its argument parser: bad input, and a short run on the real model."""

from __future__ import annotations

import argparse
import json

import pytest

from guardprob import InputError
from guardprob.evaluation import cli


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="guardprob")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["eval", *argv])


def test_defaults():
    args = parse()
    assert args.data is None and args.methods.split(",")[0] == "greedy" and "logtoku" in args.methods
    assert args.dev_fraction == 0.5 and args.calibration == "isotonic" and args.ray is None


@pytest.mark.parametrize("argv, message", [
    (["--data", "missing.jsonl"], "does not exist"),
    (["--methods", "greedy,bogus"], "unknown method.*bogus"),
    (["--resume", "--force"], "contradict"),
    (["--limit", "0"], "limit"),
])
def test_bad_input_fails_before_loading_a_model(tmp_path, argv, message):
    args = parse("--out", str(tmp_path / "o"), *argv)
    with pytest.raises(InputError, match=message):
        args.func(args)


def test_existing_results_need_resume_or_force(tmp_path):
    (tmp_path / "results.jsonl").write_text('{"run": {}}\n')
    args = parse("--out", str(tmp_path))
    with pytest.raises(InputError, match="--resume.*--force"):
        args.func(args)


@pytest.mark.slow
def test_eval_on_default_model_and_sample(tmp_path, capsys):
    args = parse("--out", str(tmp_path), "--limit", "6", "--no-progress", "--max-nodes", "64")
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "marginal" in printed and "logtoku" in printed and "report.html" in printed
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()[1:]]
    assert len(records) == 6
    assert set(records[0]["scores"]) == {"greedy", "first_token", "conditional", "joint", "marginal"}
    for r in records:
        s = r["scores"]
        for cid in s["marginal"]["p"]:  # the invariants of docs/design.md section 3 hold in what was written
            assert s["joint"]["p"][cid] <= s["conditional"]["p"][cid] + 1e-9
            assert s["marginal"]["lower"][cid] <= s["marginal"]["upper"][cid] + 1e-12
            assert s["marginal"]["p"][cid] <= s["marginal"]["p_unsafe"] + 1e-9
    assert (tmp_path / "report.html").stat().st_size > 0
