"""``guardprob score``: per-category probabilities for a text, a conversation, or a JSONL batch."""

from __future__ import annotations

import argparse
import json
import sys

from guardprob.conversation import read_conversations
from guardprob.errors import InputError
from guardprob.estimators import METHODS
from guardprob.result import Scores


def register(sub: argparse._SubParsersAction) -> None:
    from guardprob.cli import add_model_options, add_search_options

    p = sub.add_parser("score", help="score a text (or a JSONL batch) per category")
    p.add_argument("text", nargs="?", help="the user message to judge; omit to read JSONL from --input or stdin")
    p.add_argument("--response", help="an agent reply to TEXT: judge the reply instead of the user message")
    p.add_argument("--input", help="JSONL file with one {'text': ...}, {'messages': [...]} or {'prompt', 'response'} per line ('-' for stdin)")
    p.add_argument("--method", default="marginal", choices=METHODS)
    p.add_argument("--json", action="store_true", help="print JSON (one object per line for batches)")
    p.add_argument("--batch-size", type=int, default=8, help="conversations per model call in batch mode")
    p.add_argument("--calibration", help="a calibration file written by `guardprob eval`: adds calibrated scores and flags")
    add_model_options(p)
    add_search_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from guardprob.cli import search_params, spec_from_args

    if args.text is not None:
        conversations: list[object] = [args.text]
        if args.response is not None:
            conversations = [[{"role": "user", "content": args.text}, {"role": "assistant", "content": args.response}]]
    elif args.input is not None or not sys.stdin.isatty():
        conversations = list(read_conversations(args.input or "-"))
    else:
        raise InputError("nothing to score: give TEXT, --input FILE.jsonl, or JSONL on stdin")
    if not conversations:
        raise InputError("the input holds no conversations")
    calibration = _load_calibration(args.calibration, args.method)
    clf = spec_from_args(args).build()
    params = search_params(args)
    if len(conversations) == 1:
        results = [clf.score(conversations[0], args.method, **params)]
    else:
        results = _score_with_progress(clf, conversations, args.method, args.batch_size, params)
    for scores in results:
        if args.json:
            row = scores.as_dict()
            if calibration is not None:
                row["calibrated"] = {k: calibration.calibrate(k, c.p) for k, c in scores.categories.items()}
                row["flagged"] = calibration.flagged(scores.probabilities)
            print(json.dumps(row))
        else:
            print_table(scores, calibration)
    return 0


def _load_calibration(path: str | None, method: str):
    if path is None:
        return None
    from guardprob.evaluation.calibration import load_calibration

    calibration = load_calibration(path)
    if calibration.method and calibration.method != method:
        raise InputError(
            f"calibration file {path} was fitted for method {calibration.method!r}, not {method!r}; "
            f"score with --method {calibration.method}"
        )
    return calibration


def _score_with_progress(clf, conversations: list, method: str, batch_size: int, params: dict) -> list[Scores]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    out: list[Scores] = []
    columns = (TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True, console=_stderr_console()) as bar:
        task = bar.add_task("score", total=len(conversations))
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start : start + batch_size]
            out.extend(clf.score_batch(chunk, method, batch_size=batch_size, **params))
            bar.advance(task, len(chunk))
    return out


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def print_table(scores: Scores, calibration=None) -> None:
    from rich.console import Console
    from rich.table import Table

    verdict = "invalid" if scores.verdict is None else scores.verdict.replace("\n", " ")
    title = (
        f"P(unsafe) = {scores.p_unsafe:.4f} [{scores.p_unsafe_lower:.4f}, {scores.p_unsafe_upper:.4f}]   greedy verdict: {verdict}   method: {scores.method}   "
        f"{scores.expanded_nodes} nodes, {scores.model_calls} model calls, {scores.seconds:.2f} s"
    )
    table = Table(title=title, title_justify="left")
    columns = ["id", "category", "p", "lower", "upper"] + (["calibrated", "flagged"] if calibration else [])
    for column in columns:
        table.add_column(column, justify="left" if column in ("id", "category") else "right")
    flagged = set(calibration.flagged(scores.probabilities)) if calibration else set()
    for c in scores.categories.values():
        row = [c.id, c.name, f"{c.p:.4f}", f"{c.lower:.4f}", f"{c.upper:.4f}"]
        if calibration:
            row += [f"{calibration.calibrate(c.id, c.p):.4f}", "yes" if c.id in flagged else ""]
        table.add_row(*row)
    Console().print(table)
    if scores.unexplored_mass > 0 or scores.invalid_mass > 0:
        Console().print(f"unexplored mass {scores.unexplored_mass:.4g}, invalid mass {scores.invalid_mass:.4g}")
