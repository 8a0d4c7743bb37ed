"""Scoring a dataset into a resumable results file: one JSON line per example, appended as
each batch finishes, after a header line that identifies the run.

A killed run resumes with ``resume=True``: the examples already in the file are skipped, and a
line cut off by the kill is dropped and scored again. Scoring a batch is the top-level
function ``score_example_batch``, so remote workers (``guardprob.distributed.ray_map``) can run it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from guardprob.errors import InputError
from guardprob.estimators import METHODS
from guardprob.evaluation.baselines import BASELINES, first_id_distributions
from guardprob.evaluation.datasets import Example

RESULTS = "results.jsonl"
ALL_METHODS = (*METHODS, *BASELINES)


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown or not methods:
        raise InputError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; use some of {', '.join(ALL_METHODS)}")
    return tuple(dict.fromkeys(methods))


def score_example_batch(classifier: Any, examples: Sequence[Example], methods: Sequence[str], params: dict) -> list[dict]:
    """Score examples with every requested estimator (one tree search each) and baseline.

    params: search parameters for ``Classifier.score_methods`` (eps, top_p, max_nodes, ...).
    Returns one record per example, carrying the example's index.
    """
    started = time.perf_counter()
    baselines = [m for m in methods if m in BASELINES]
    searched = [m for m in METHODS if m in methods or (baselines and m == "first_token")]
    conversations = [[dict(m) for m in e.messages] for e in examples]
    results = classifier.score_methods(conversations, searched, batch_size=max(len(examples), 1), **params)
    first = first_id_distributions(classifier, [classifier.prompt(c) for c in conversations]) if baselines else None
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
                "nodes": s.expanded_nodes,
            }
        if first is not None:
            record["first_id"] = first[i].as_dict()
        record["seconds"] = seconds
        records.append(record)
    return records


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
    ray: str | None = None,
    ray_workers: int = 1,
    ray_batch_timeout: float | None = None,
    progress: bool = True,
    after_batch: Callable[[int], None] | None = None,
    on_ray_stats: Callable[[Any], None] | None = None,
) -> list[dict]:
    """Score every example not yet in ``out_dir/results.jsonl``; return all records by index.

    header: the run's fingerprint, stored as the file's first line and checked on resume.
    after_batch(n_done): called after each appended batch (tests use it to stop a run).
    on_ray_stats(stats): with ray, called once at the end with the run's distributed.RayStats.
    """
    methods = check_methods(methods)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size={batch_size!r}: use a positive integer")
    if ray:
        try:
            from guardprob import distributed  # imported only when asked for
        except ImportError as exc:
            raise InputError(f"--ray needs guardprob.distributed and ray ({exc}); install guardprob[ray]") from None
        if spec is None:
            raise InputError("--ray needs a classifier spec (model options) that workers can rebuild")
        distributed.check_address(ray)  # a typo or unreachable cluster fails before the results file is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS
    done = _open_results(path, header, resume, force)
    todo = [e for e in examples if e.index not in done]
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    fn = functools.partial(score_example_batch, methods=methods, params=params)
    if ray:
        stream: Iterable[Any] = distributed.ray_map(
            spec, batches, fn, address=ray, workers=ray_workers, batch_timeout=ray_batch_timeout, on_stats=on_ray_stats
        )
    else:
        clf = classifier if classifier is not None else spec.build()
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


def read_results(path: str | Path) -> tuple[dict, list[dict]]:
    """(header, records by index) of a results file."""
    header, done = _read(Path(path), repair=False)
    return header, [done[i] for i in sorted(done)]


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


def _open_results(path: Path, header: dict, resume: bool, force: bool) -> dict[int, dict]:
    check_out_dir(path.parent, resume, force)
    if force or not path.exists() or path.stat().st_size == 0:
        path.write_text(json.dumps({"run": header}) + "\n", encoding="utf-8")
        return {}
    stored, done = _read(path, repair=True)
    if stored != header:
        changed = sorted(k for k in set(stored) | set(header) if stored.get(k) != header.get(k))
        raise InputError(
            f"{path} comes from another run (differs in {', '.join(changed)}); "
            "use --force to overwrite it or another --out"
        )
    return done


def _read(path: Path, repair: bool) -> tuple[dict, dict[int, dict]]:
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    try:
        header = json.loads(lines[0])["run"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise InputError(f"{path} is not a guardprob results file (no header line); use --force to overwrite it") from None
    done: dict[int, dict] = {}
    good = len(lines[0]) + 1
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            good += len(line) + 1
            continue
        try:
            record = json.loads(line)
            done[int(record["index"])] = record
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if number == len(lines) or (number == len(lines) - 1 and not lines[-1]):
                if repair:  # the last line, cut off by a killed run: drop it and score it again
                    with path.open("r+b") as handle:
                        handle.truncate(good)
                break
            raise InputError(f"{path}, line {number}: not a results record; use --force to start again") from None
        good += len(line) + 1
    if repair and raw and not raw.endswith(b"\n") and good > len(raw):
        with path.open("ab") as handle:  # a complete last record that lost only its newline
            handle.write(b"\n")
    return header, done


def _bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="ex", desc="eval", disable=not enabled, dynamic_ncols=True)
