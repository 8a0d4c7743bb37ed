"""``guardprob bench``: the command over the engine comparison (bench/compare.py), certified
decisions (bench/decisions.py) and streaming moderation (bench/streaming.py)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from guardprob.bench.compare import ENGINES, bench, load_conversations, print_report
from guardprob.classifier import Classifier
from guardprob.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    from guardprob.commands.options import add_model_options, add_reasoning_options, add_search_options
    from guardprob.core.estimators import METHODS

    p = subparsers.add_parser("bench", help="time the engine against the per-node baseline and the floor")
    p.add_argument("--data", default=None, help="JSONL with 'messages', 'text' or 'unsafe_query' per line (default: the shipped sample)")
    p.add_argument("--limit", type=int, default=8, help="examples to run (default 8)")
    p.add_argument("--warm", type=int, default=16,
                   help="conversations after the measured ones searched first, unmeasured, for the search's guesses "
                        "from history (--prior; default 16)")
    p.add_argument("--method", default="marginal", choices=METHODS)
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {','.join(ENGINES)}")
    p.add_argument("--naive-limit", type=int, default=1, help="examples the naive baseline runs (it is ~100x slower; default 1)")
    p.add_argument("--batch", type=int, default=32, help="prompts searched together for the batch comparison (1: skip it)")
    p.add_argument("--turns", type=int, default=16,
                   help="exchanges (user message and reply) of the turn-by-turn conversation (engine turns; default 16)")
    p.add_argument("--every-message", action="store_true",
                   help="turn by turn: score after every message (judged roles alternate), not after every reply")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", dest="json_path", default=None, help="also write the full report to this JSON file")
    p.add_argument("--decide", action="store_true",
                   help="measure certified decisions instead (bench_decisions.py): at thresholds 0.5 and, with "
                        "--calibration, the file's, against the full marginal and greedy generation")
    p.add_argument("--calibration", default=None, help="with --decide: a calibration file whose thresholds to decide")
    p.add_argument("--stream", action="store_true",
                   help="measure streaming moderation instead (bench_streaming.py): an answer judged every --every "
                        "tokens against judging it once, with and without the prefix cache (with --decide: certified "
                        "flags per chunk)")
    p.add_argument("--stream-tokens", type=int, default=600, help="with --stream: the answer's length in tokens")
    p.add_argument("--every", type=int, default=20, help="with --stream: tokens per chunk")
    add_model_options(p)
    add_search_options(p)
    add_reasoning_options(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import sys

    from guardprob.commands.formats import announce
    from guardprob.commands.options import reasoning_params, search_params, spec_from_args
    from guardprob.options.table import RUN, option

    option(RUN, "limit").check(args.limit, "--limit")  # the table's check (guardprob.options.table)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip())
    if args.warm < 0:
        raise InputError(f"--warm {args.warm}: use a number of conversations >= 0")
    if args.turns < 1:
        raise InputError(f"--turns {args.turns}: use a number of exchanges >= 1 (or leave turns out of --engines)")
    rows = load_conversations(args.data, args.limit + args.warm)
    conversations, warm = rows[: args.limit], rows[args.limit :]
    if args.stream:
        return _run_streaming(args, conversations)
    clf = Classifier.from_spec(spec_from_args(args))
    announce(clf)
    if args.decide:
        return _run_decisions(args, clf, conversations)
    report = bench(
        clf, conversations, method=args.method, params={**search_params(args), **reasoning_params(args)}, engines=engines,
        naive_limit=args.naive_limit, batch=args.batch, warm=warm, turns=args.turns, every_message=args.every_message,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    report.settings.update({"model": clf.name, "format": clf.format.name, "data": args.data or "sample", "threads": _threads()})
    print_report(report)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8")
    return 0


def _run_decisions(args: argparse.Namespace, clf: Any, conversations: Sequence[object]) -> int:
    import sys

    from guardprob.bench.decisions import bench_decisions, print_summary
    from guardprob.commands.options import search_params

    rules = {"0.5": clf.decision_rule(True)}
    if args.calibration:
        rules["calibrated"] = clf.decision_rule(True, calibration=args.calibration)
    report = bench_decisions(clf, conversations, rules, search_params(args),
                             progress=lambda line: print(line, file=sys.stderr, flush=True))
    report["settings"] = {"model": clf.name, "format": clf.format.name, "data": args.data or "sample",
                          "examples": len(conversations), "threads": _threads(), **search_params(args)}
    print_summary(report["summary"])
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


def _run_streaming(args: argparse.Namespace, conversations: Sequence[object]) -> int:
    import sys

    from guardprob.bench.streaming import answer_chunks, bench_streaming, print_streaming
    from guardprob.commands.options import search_params, spec_from_args
    from guardprob.inputs.conversation import to_messages

    spec = spec_from_args(args)
    texts = [to_messages(c)[-1].content for c in conversations]
    built: dict = {}

    def build(cache_mb: int | None):
        built[cache_mb] = Classifier.from_spec(replace(spec, cache_mb=spec.cache_mb if cache_mb is None else cache_mb))
        return built[cache_mb]

    tokenizer = build(None).tokenizer
    chunks = answer_chunks(tokenizer, texts[1:], args.stream_tokens, args.every)
    params = {**search_params(args), **({"decide": True} if args.decide else {})}  # --decide: certified flags per chunk
    report = bench_streaming(build, texts[0], chunks, params,
                             progress=lambda line: print(line, file=sys.stderr, flush=True))
    report["settings"] = {"data": args.data or "sample", "answer_tokens": args.stream_tokens, "every": args.every,
                          "threads": _threads(), **params}
    print_streaming(report)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()
