"""``guardprob score``: per-category probabilities for a text, a conversation, or a JSONL batch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from guardprob.core.estimators import METHODS
from guardprob.errors import GuardprobError, InputError
from guardprob.inputs.conversation import ConversationLike, conversation_from_row, to_messages
from guardprob.inputs.datafile import JSON_ERRORS, check_file, json_reason, read_text, unicode_problem
from guardprob.result import Scores


def register(sub: argparse._SubParsersAction) -> None:
    from guardprob.commands.options import add_model_options, add_reasoning_options, add_search_options

    p = sub.add_parser("score", help="score a text (or a JSONL batch) per category")
    p.add_argument("text", nargs="?", help="the user message to judge; omit to read JSONL from --input or stdin")
    p.add_argument("--response", help="an agent reply to TEXT: judge the reply instead of the user message")
    p.add_argument("--input", help="JSONL file with one {'text': ...}, {'messages': [...]} or {'prompt', 'response'} per line ('-' for stdin)")
    p.add_argument("--method", default="marginal", choices=METHODS)
    p.add_argument("--json", action="store_true", help="print JSON (one object per line for batches)")
    p.add_argument("--batch-size", type=int, default=8, help="conversations per model call in batch mode")
    p.add_argument("--calibration", help="a calibration file written by `guardprob eval`: adds calibrated scores and flags")
    p.add_argument("--decide", action="store_true",
                   help="stop once every score lies wholly on one side of its threshold: the flags the exhaustive search "
                        "would give, at a fraction of its cost")
    p.add_argument("--threshold", action="append", default=[], metavar="P|ID=P",
                   help="with --decide: one threshold for every score, or ID=P for a category id or 'unsafe' "
                        "(repeatable; default 0.5, or the --calibration file's)")
    add_model_options(p)
    add_search_options(p)
    add_reasoning_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from guardprob.commands.formats import announce
    from guardprob.commands.options import reasoning_params, search_params, spec_from_args

    if args.text is not None:
        conversations: list[object] = [args.text]
        if args.response is not None:
            conversations = [[{"role": "user", "content": args.text}, {"role": "assistant", "content": args.response}]]
    elif args.input is not None or not sys.stdin.isatty():
        conversations = read_input(args.input or "-")
    else:
        raise InputError("nothing to score: give TEXT, --input FILE.jsonl, or JSONL on stdin")
    if not conversations:
        raise InputError("the input holds no conversations")
    calibration = _load_calibration(args.calibration, args.method)
    from guardprob.classifier import Classifier

    clf = Classifier.from_spec(spec_from_args(args))
    announce(clf)
    if calibration is not None:  # the taxonomy is known once the model is (a preset may follow the template)
        calibration.check_taxonomy(clf.taxonomy)
    params = {**search_params(args), **reasoning_params(args)}
    if args.decide:
        params.update(decide=True, thresholds=parse_thresholds(args.threshold), calibration=calibration)
    elif args.threshold:
        raise InputError("--threshold sets what --decide decides on; add --decide")
    if len(conversations) == 1:
        results = [clf.score(conversations[0], args.method, **params)]
    else:
        results = _score_with_progress(clf, conversations, args.method, args.batch_size, params)
    for scores in results:
        if args.json:
            row = scores.as_dict()
            if calibration is not None:
                row["calibrated"] = {k: calibration.calibrate(k, c.p) for k, c in scores.categories.items()}
                row["flagged"] = _flagged(scores, calibration)
            print(json.dumps(row))
        else:
            print_table(scores, calibration)
    return 0


def _flagged(scores: Scores, calibration) -> list[str]:
    """The ids whose calibrated probability reaches the calibration's threshold (0.5 where it has none)."""
    from guardprob.core.decision import DEFAULT_THRESHOLD, flags

    marks = flags(scores.probabilities, calibration.thresholds, calibration, DEFAULT_THRESHOLD)
    return [cid for cid, flag in marks.items() if flag]


def parse_thresholds(values: list[str]) -> float | dict[str, float] | None:
    """``--threshold 0.3`` (every score) or ``--threshold S1=0.3 --threshold unsafe=0.5``."""
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        return _probability("--threshold", values[0])
    out = {}
    for value in values:
        key, sep, number = value.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--threshold {value!r}: use ID=P (a category id or 'unsafe'), or one P for every score")
        out[key.strip()] = _probability(f"--threshold {key.strip()}", number)
    return out


def _probability(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InputError(f"{name}={text!r}: use a probability between 0 and 1") from None


def read_input(path: str) -> list[ConversationLike]:
    """The conversations of a JSONL file ('-': standard input), one per non-empty line, each
    checked as the model will read it, so that a bad line stops the command before the model loads."""
    where = "standard input" if path == "-" else path
    conversations = []
    # split on "\n" only: str.splitlines would also split inside a JSON string holding U+2028
    for number, line in enumerate(_input_text(path).split("\n"), start=1):
        if line.strip():
            conversations.append(_input_row(line, f"{where}, line {number}"))
    return conversations


def _input_text(path: str) -> str:
    if path != "-":
        check_file(Path(path), "input file", InputError, "give a .jsonl file with one conversation per line "
                   "(or '-' to read standard input)")
        return read_text(Path(path), "input file", InputError)
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text stream put in place of stdin (tests, embedding)
        return sys.stdin.read()
    try:
        return stream.read().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"standard input is not UTF-8 text (byte {exc.start}); send UTF-8 text") from None


def _input_row(line: str, where: str) -> ConversationLike:
    try:
        row = json.loads(line)
    except JSON_ERRORS as exc:
        raise InputError(f"{where}: not valid JSON ({json_reason(exc)}); write one JSON object per line") from None
    try:
        conversation = conversation_from_row(row, where)
        messages = to_messages(conversation)
    except GuardprobError as exc:  # conversation_from_row names the line already; to_messages does not
        message = str(exc)
        raise InputError(message if message.startswith(where) else f"{where}: {message}") from None
    except JSON_ERRORS as exc:  # a 'messages' string holding JSON that json.loads cannot take
        raise InputError(f"{where}: field 'messages' is not a readable JSON list of messages ({json_reason(exc)})") from None
    for i, m in enumerate(messages):
        problem = unicode_problem(m.content)
        if problem:  # the tokenizer would fail on it after the model has loaded
            raise InputError(f"{where}: message {i} is {problem}; fix the text's encoding")
    return conversation


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
    decision = scores.decision
    columns = ["id", "category", "p", "lower", "upper"] + (["calibrated"] if calibration else [])
    columns += ["flagged"] if calibration or decision else []
    for column in columns:
        table.add_column(column, justify="left" if column in ("id", "category") else "right")
    flagged = set(_flagged(scores, calibration)) if calibration else set()
    for c in scores.categories.values():
        row = [c.id, c.name, f"{c.p:.4f}", f"{c.lower:.4f}", f"{c.upper:.4f}"]
        if calibration:
            row += [f"{calibration.calibrate(c.id, c.p):.4f}"]
        if decision:  # certified: yes / no, or "?" while the interval straddles the threshold
            row += [{True: "yes", False: "no", None: "?"}[decision.categories.get(c.id)]]
        elif calibration:
            row += ["yes" if c.id in flagged else ""]
        table.add_row(*row)
    for f in scores.fields.values():  # the format's other outcomes (safety=controversial, refusal=yes)
        table.add_row(f.id, "(field)", f"{f.p:.4f}", f"{f.lower:.4f}", f"{f.upper:.4f}", *([""] * (len(columns) - 5)))
    Console().print(table)
    if scores.reasoning is not None:
        Console().print(reasoning_line(scores))
    if decision is not None:
        Console().print(decision_line(scores))
    if scores.unexplored_mass > 0 or scores.invalid_mass > 0:
        Console().print(f"unexplored mass {scores.unexplored_mass:.4g}, invalid mass {scores.invalid_mass:.4g}")


def decision_line(scores: Scores) -> str:
    d = scores.decision
    unsafe = "" if d.unsafe is None else f"; P(unsafe) {'reaches' if d.unsafe else 'is below'} {d.thresholds['unsafe']:g}"
    if d.decided:
        named = ", ".join(d.flagged_categories) or "no category"
        return f"decision (certified: the exhaustive search's flags): flagged {named}{unsafe}"
    open_ = [c for c, flag in d.categories.items() if flag is None]
    return (f"decision: undecided for {', '.join(open_) or 'P(unsafe)'} (the search stopped at its limits first; "
            f"raise --max-nodes){unsafe}")


def reasoning_line(scores: Scores) -> str:
    """What the scores are conditioned on, or averaged over, when the model reasons first."""
    r = scores.reasoning
    cut = f", {r.cut} cut at the token budget" if r.cut else ""
    if r.mode == "greedy":
        return (f"reasoning: the greedy trace ({r.tokens:.0f} tokens{cut}); the scores are exact given it "
                "(--traces N averages over sampled traces)")
    error = r.stderr.get("p_unsafe")
    spread = f"; standard error of P(unsafe) {error:.4f}" if error is not None else ""
    return (f"reasoning: mean over {r.traces} sampled traces per question (temperature {r.temperature:g}, "
            f"{r.tokens:.0f} tokens on average{cut}){spread}; bounds are those of the mean over these traces")
