"""Scoring a dataset into a resumable results file: one JSON line per example, appended as
each batch finishes, after a header line that identifies the run.

A killed run resumes with ``resume=True``: the examples already in the file are skipped, and a
line cut off by the kill is dropped and scored again. Each record is checked first (its index
names an example of this dataset, with that example's labels, and it holds every field the
analysis reads): one that fails, or a second record of an example, is dropped from the file with
one warning, and its example is scored again. Values are checked against their meaning, not
only their type (probabilities in [0, 1], lower <= p <= upper, counts and times >= 0), so a
forged or corrupted record cannot move the fitted calibration. Scoring a batch is the top-level function
``score_example_batch``, so remote workers (``guardprob.evaluation.distributed.ray_map``) can run it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from guardprob.core.estimators import METHODS
from guardprob.errors import GuardprobWarning, InputError
from guardprob.evaluation.baselines import BASELINES, FIRST_ID_EPS, check_baselines, first_id
from guardprob.evaluation.datasets import Example
from guardprob.inputs.datafile import JSON_ERRORS, finite, show
from guardprob.options.table import RUN, option

RESULTS = "results.jsonl"
ALL_METHODS = (*METHODS, *BASELINES)
# Stored values are the scorer's own floats; a range check allows for their last bits only.
_SLACK = 1e-9
# The first-id measures' ranges: entropy up to log(ids) is checked loosely (any finite
# non-negative value), max_prob is 1 - a probability, logtoku's epistemic part k / (evidence + k).
_FIRST_ID_RANGES = {"entropy": (0.0, math.inf), "max_prob": (0.0, 1.0), "logtoku": (0.0, 1.0),
                    "logtoku_aleatoric": (0.0, math.inf)}


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown or not methods:
        raise InputError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; use some of {', '.join(ALL_METHODS)}")
    return tuple(dict.fromkeys(methods))


def score_example_batch(classifier: Any, examples: Sequence[Example], methods: Sequence[str], params: dict) -> list[dict]:
    """Score examples with every requested estimator and baseline, from one tree search each
    (the baselines read the first-id walk that search also takes).

    params: search parameters for ``Classifier.score_methods`` (eps, top_p, max_nodes, ...).
    Returns one record per example, carrying the example's index.
    """
    started = time.perf_counter()
    if not examples:
        return []
    baselines = any(m in BASELINES for m in methods)
    prompts = [classifier.prompt([dict(m) for m in e.messages]) for e in examples]
    if baselines:  # before the search, so a format they cannot read costs nothing
        check_baselines(classifier, [p.role for p in prompts])
        params = {**params, "first_id": FIRST_ID_EPS}
    run = classifier.start(prompts, searched_methods(methods), **params).finish()  # one search: one engine session
    results = run.results()
    ids = classifier.taxonomy.ids
    first = [first_id(tree, ids) for _, _, tree in run.trees()] if baselines else None
    seconds = (time.perf_counter() - started) / max(len(examples), 1)
    records = []
    for i, (example, scores) in enumerate(zip(examples, results)):
        record: dict[str, Any] = {"index": example.index, "labels": list(example.labels), "role": example.role, "scores": {}}
        for method, s in scores.items():
            record["scores"][method] = {
                "p_unsafe": s.p_unsafe,
                "p": s.probabilities,
                "lower": {k: c.lower for k, c in s.categories.items()},
                "upper": {k: c.upper for k, c in s.categories.items()},
                "verdict": s.verdict,
                "verdict_unsafe": s.verdict_unsafe,
                "fields": {k: f.p for k, f in s.fields.items()},
                "nodes": s.expanded_nodes,
            }
        if first is not None:
            record["first_id"] = first[i].as_dict()
        record["seconds"] = seconds
        records.append(record)
    return records


def searched_methods(methods: Sequence[str]) -> list[str]:
    """The estimators one tree search computes for ``methods``: those asked for, and first_token
    for the baselines (their safe/unsafe decision is its P(unsafe))."""
    baselines = any(m in BASELINES for m in methods)
    return [m for m in METHODS if m in methods or (baselines and m == "first_token")]


def record_problem(
    record: object, examples: Mapping[int, Example], methods: Sequence[str], ids: Sequence[str] | None = None
) -> str | None:
    """Why a results line cannot stand for one of ``examples`` (by index) in a run of ``methods``
    over taxonomy ``ids`` (None: not checked), or None. Every field that the analysis, report and
    summary read is checked, so a resumed run never crashes on a record or counts a stray one."""
    if not isinstance(record, dict):
        return f"{show(record)} is not a record object"
    index = record.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or index not in examples:
        return f"index {show(index)} is no example of this dataset"
    example = examples[index]
    if record.get("labels") != list(example.labels) or record.get("role") != example.role:
        return f"labels or role differ from example {index}'s"
    scores = record.get("scores")
    if not isinstance(scores, dict):
        return "no 'scores' mapping"
    for method in searched_methods(methods):
        problem = _scores_problem(scores.get(method), ids)
        if problem:
            return f"scores.{method}: {problem}"
    if any(m in BASELINES for m in methods):
        problem = _first_id_problem(record.get("first_id"), ids)
        if problem:
            return f"first_id: {problem}"
    seconds = finite(record.get("seconds"))
    if seconds is None or seconds < 0:
        return f"seconds is {show(record.get('seconds'))}, not a duration (a number >= 0)"
    return None


def _scores_problem(scores: object, ids: Sequence[str] | None) -> str | None:
    if not isinstance(scores, dict):
        return "missing"
    for key in ("p", "lower", "upper"):
        problem = _per_category_problem(scores.get(key), ids)
        if problem:
            return f"{key}: {problem}"
    p, lower, upper = scores["p"], scores["lower"], scores["upper"]
    if set(p) != set(lower) or set(p) != set(upper):
        return "p, lower and upper name different categories"
    crossed = next((k for k in p if not lower[k] - _SLACK <= p[k] <= upper[k] + _SLACK), None)
    if crossed is not None:
        return f"{crossed}: lower {lower[crossed]} <= p {p[crossed]} <= upper {upper[crossed]} does not hold"
    problem = _probability_problem("p_unsafe", scores.get("p_unsafe"))
    if problem:
        return problem
    fields = scores.get("fields", {})
    if not isinstance(fields, dict):
        return f"fields is {show(fields)}, not a mapping of outcome to probability"
    problem = next((_probability_problem(f"fields.{k}", v) for k, v in fields.items()
                    if _probability_problem(f"fields.{k}", v)), None)
    if problem:
        return problem
    if not (scores.get("verdict") is None or isinstance(scores.get("verdict"), str)):
        return "verdict is neither text nor null"
    if "verdict_unsafe" not in scores or scores["verdict_unsafe"] not in (True, False, None):
        return "verdict_unsafe is missing or not true, false or null"
    nodes = scores.get("nodes")
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 0:
        return f"nodes is {show(nodes)}, not a count (an integer >= 0)"
    return None


def _first_id_problem(first: object, ids: Sequence[str] | None) -> str | None:
    if not isinstance(first, dict):
        return "missing"
    problem = _per_category_problem(first.get("p"), ids)
    if problem:
        return f"p: {problem}"
    for key, (low, high) in _FIRST_ID_RANGES.items():
        value = first.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isinf(value):
            return f"{key} is {show(value)}, not a finite number"
        if math.isnan(value) and key.startswith("logtoku"):
            continue  # NaN is a value here: an engine that reports no logits
        if not low - _SLACK <= value <= high + _SLACK:  # (NaN fails here too)
            return f"{key} is {value}, outside [{low}, {high}]"
    return None


def _per_category_problem(values: object, ids: Sequence[str] | None) -> str | None:
    if not isinstance(values, dict):
        return f"{show(values)} is not a mapping of category id to probability"
    if ids is not None and set(values) != set(ids):
        return "its ids are not the taxonomy's"
    return next((_probability_problem(str(k), v) for k, v in values.items() if _probability_problem(str(k), v)), None)


def _probability_problem(name: str, value: object) -> str | None:
    number = finite(value)
    if number is None:
        return f"{name} is {show(value)}, not a finite number"
    if not -_SLACK <= number <= 1 + _SLACK:
        return f"{name} is {number}, not a probability (between 0 and 1)"
    return None


def fingerprint(examples: Sequence[Example], **settings: Any) -> dict:
    """What makes two runs the same: the examples' content and the settings."""
    digest = hashlib.sha256(json.dumps([e.as_dict() for e in examples], sort_keys=True).encode()).hexdigest()
    return {"examples": len(examples), "sha256": digest[:16], **settings}


def run(
    examples: Sequence[Example],
    out_dir: str | Path,
    *,
    methods: Sequence[str],
    params: dict,
    header: dict,
    classifier: Any = None,
    spec: Any = None,
    resume: bool = False,
    force: bool = False,
    batch_size: int = 8,
    ids: Sequence[str] | None = None,
    ray: str | None = None,
    ray_workers: int = 1,
    ray_batch_timeout: float | None = None,
    progress: bool = True,
    after_batch: Callable[[int], None] | None = None,
    on_ray_stats: Callable[[Any], None] | None = None,
) -> list[dict]:
    """Score every example not yet in ``out_dir/results.jsonl``; return all records by index.

    header: the run's fingerprint, stored as the file's first line and checked on resume.
    ids: the taxonomy's category ids, which a resumed record's scores must hold.
    after_batch(n_done): called after each appended batch (tests use it to stop a run).
    on_ray_stats(stats): with ray, called once at the end with the run's distributed.RayStats.
    """
    methods = check_methods(methods)
    option(RUN, "batch_size").check(batch_size)  # the table's check (guardprob.options.table)
    if ray:
        try:
            from guardprob.evaluation import distributed  # imported only when asked for
        except ImportError as exc:
            raise InputError(f"--ray needs guardprob.evaluation.distributed and ray ({exc}); install guardprob[ray]") from None
        if spec is None:
            raise InputError("--ray needs a classifier spec (model options) that workers can rebuild")
        distributed.check_address(ray)  # a typo or unreachable cluster fails before the results file is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS
    done = _open_results(path, header, resume, force, examples, methods, ids)
    todo = [e for e in examples if e.index not in done]
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    fn = functools.partial(score_example_batch, methods=methods, params=params)
    if ray:
        stream: Iterable[Any] = distributed.ray_map(
            spec, batches, fn, address=ray, workers=ray_workers, batch_timeout=ray_batch_timeout, on_stats=on_ray_stats
        )
    else:
        from guardprob.classifier import Classifier

        clf = classifier if classifier is not None else Classifier.from_spec(spec)
        stream = (fn(clf, batch) for batch in batches)
    bar = _bar(len(examples), len(done), progress)
    try:
        with path.open("a", encoding="utf-8") as handle:
            for item in stream:
                records = item if isinstance(item, list) else [item]
                handle.write("".join(json.dumps(r) + "\n" for r in records))
                handle.flush()
                for r in records:
                    done[r["index"]] = r
                bar.update(len(records))
                if after_batch is not None:
                    after_batch(len(done))
    finally:
        bar.close()
    return [done[i] for i in sorted(done)]


def check_out_dir(out_dir: str | Path, resume: bool, force: bool) -> None:
    """Refuse, before any work, a directory that holds another run's results without resume or force."""
    if resume and force:
        raise InputError("resume and force contradict each other; pass one (--resume or --force)")
    path = Path(out_dir) / RESULTS
    if not (force or resume) and path.exists() and path.stat().st_size > 0:
        raise InputError(
            f"{path.parent} already holds results ({path.name}); pass --resume to continue that run, "
            "--force to overwrite it, or choose another --out"
        )


def _open_results(
    path: Path, header: dict, resume: bool, force: bool, examples: Sequence[Example], methods: Sequence[str],
    ids: Sequence[str] | None,
) -> dict[int, dict]:
    check_out_dir(path.parent, resume, force)
    if force or not path.exists() or path.stat().st_size == 0:
        path.write_text(json.dumps({"run": header}) + "\n", encoding="utf-8")
        return {}
    stored, first_line, rows, clean = _read(path)
    if stored != header:
        changed = sorted(k for k in set(stored) | set(header) if stored.get(k) != header.get(k))
        raise InputError(
            f"{path} comes from another run (differs in {', '.join(changed)}); "
            "use --force to overwrite it or another --out"
        )
    by_index = {e.index: e for e in examples}
    done: dict[int, dict] = {}
    kept: list[bytes] = []
    dropped: list[str] = []
    for number, line, record in rows:
        problem = record_problem(record, by_index, methods, ids)
        if problem is None and record["index"] in done:
            problem = f"a second record of example {record['index']}"
        if problem is not None:
            dropped.append(f"line {number}: {problem}")
            continue
        done[record["index"]] = record
        kept.append(line)
    if dropped or not clean:
        _rewrite(path, [first_line, *kept])
    if dropped:
        warnings.warn(
            f"{path}: dropped {len(dropped)} record(s) this run cannot use (first, {dropped[0]}); "
            "examples left without a record are scored again",
            GuardprobWarning, stacklevel=3,
        )
    return done


def _read(path: Path) -> tuple[dict, bytes, list[tuple[int, bytes, Any]], bool]:
    """(header, header line, [(line number, line, parsed JSON)], clean) of a results file.

    clean is False where a killed run cut off the last line (left out here, to be scored
    again) or its newline. A line that is no JSON elsewhere means the file is not ours to fix.
    """
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    try:
        header = json.loads(lines[0])["run"]
    except (*JSON_ERRORS, KeyError, TypeError):
        header = None
    if not isinstance(header, dict):
        raise InputError(f"{path} is not a guardprob results file (no header line); use --force to overwrite it")
    last = max((n for n, line in enumerate(lines, start=1) if line.strip()), default=1)
    rows: list[tuple[int, bytes, Any]] = []
    clean = raw.endswith(b"\n")
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            rows.append((number, line, json.loads(line)))
        except JSON_ERRORS:
            if number == last:
                clean = False
                break
            raise InputError(f"{path}, line {number}: not a results record; use --force to start again") from None
    return header, lines[0], rows, clean


def _rewrite(path: Path, lines: Sequence[bytes]) -> None:
    """Replace the file by ``lines`` at once, so that a kill now leaves the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(line + b"\n" for line in lines))
    os.replace(tmp, path)


def _bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="ex", desc="eval", disable=not enabled, dynamic_ncols=True)
