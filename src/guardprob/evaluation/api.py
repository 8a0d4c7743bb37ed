"""``evaluate``: score a labelled dataset with every estimator and write the report."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guardprob.evaluation.analysis import Analysis, analyse
from guardprob.evaluation.datasets import Columns, Dataset, read_dataset
from guardprob.evaluation.labels import LabelMap
from guardprob.evaluation.runner import ALL_METHODS, check_methods, check_out_dir, fingerprint, run
from guardprob.options.table import RUN, SEARCH, TRACE, check_params, option

DEFAULT_OUT = "guardprob-eval"


@dataclass(frozen=True)
class EvalReport:
    """What ``evaluate`` produced: the data read, the analysis, the table rows and the files."""

    dataset: Dataset
    analysis: Analysis
    rows: list[dict]
    files: dict[str, Path]
    records: list[dict]


def evaluate(
    data: str | Path | None = None,
    *,
    classifier: Any = None,
    spec: Any = None,
    methods: Sequence[str] = ALL_METHODS,
    out: str | Path = DEFAULT_OUT,
    format: str = "auto",
    columns: Columns | None = None,
    preset: str | None = None,
    label_map: LabelMap | None = None,
    split: str | None = None,
    subset: str | None = None,
    skip_invalid: bool = False,
    limit: int | None = None,
    dev_fraction: float = 0.5,
    seed: int = 0,
    calibration: str = "isotonic",
    batch_size: int = 8,
    params: dict | None = None,  # Classifier.score's search and trace options (guardprob.options.OPTIONS)
    resume: bool = False,
    force: bool = False,
    ray: str | None = None,
    ray_workers: int = 1,
    ray_batch_timeout: float | None = None,
    progress: bool = True,
    show: bool = True,
    after_batch: Callable[[int], None] | None = None,
) -> EvalReport:
    """Run ``methods`` over a labelled dataset (None: the shipped sample, or the preset's hub
    dataset) and write the report to ``out``. ``columns``, ``preset``, ``label_map``, ``split``
    and ``subset`` say how to read it (``read_dataset``).

    classifier: a loaded Classifier, or spec: a ClassifierSpec to build one (default model if
    neither). Thresholds and calibrators are fitted on a seeded development part
    (``dev_fraction``) and measured on the rest; see docs/evaluation.md.
    """
    from guardprob.evaluation import report
    from guardprob.formats import load_taxonomy
    from guardprob.spec import ClassifierSpec

    methods = check_methods(methods)
    params = check_params(params or {}, (SEARCH, TRACE))  # before any work: the table's options and ranges
    option(RUN, "limit").check(limit)
    check_out_dir(out, resume, force)
    if spec is None and classifier is None:
        spec = ClassifierSpec()
    target = classifier.taxonomy.name if classifier is not None else (spec.taxonomy or _format_taxonomy(spec.format))
    dataset = read_dataset(data, format=format, columns=columns, taxonomy=target, skip_invalid=skip_invalid,
                           label_map=label_map, preset=preset, split=split, subset=subset)
    if classifier is None and not ray:
        from guardprob.classifier import Classifier
        from guardprob.commands.formats import announce

        classifier = Classifier.from_spec(spec)
        announce(classifier)
    taxonomy = classifier.taxonomy if classifier is not None else load_taxonomy(target)
    dataset.check_taxonomy(taxonomy)
    examples = dataset.examples[:limit] if limit else dataset.examples
    # a --ray driver has no classifier: its spec names the model as the workers' build() will
    model = classifier.name if classifier is not None else spec.name
    # speculation changes the cost of a search, not its results: a run may resume with another
    same_results = {k: v for k, v in params.items() if k not in ("speculate", "prior")}
    header = fingerprint(examples, dataset=Path(dataset.path).name, model=model, taxonomy=taxonomy.name,
                         methods=list(methods), params=same_results)
    ray_stats: list = []  # distributed.RayStats of a --ray run, printed with the summary
    records = run(
        examples, out, methods=methods, params=params, header=header, classifier=classifier, spec=spec,
        resume=resume, force=force, batch_size=batch_size, ids=taxonomy.ids, ray=ray, ray_workers=ray_workers,
        ray_batch_timeout=ray_batch_timeout,
        progress=progress, after_batch=after_batch, on_ray_stats=ray_stats.append,
    )
    analysis = analyse(records, taxonomy.ids, methods, dev_fraction=dev_fraction, seed=seed, calibration=calibration,
                       about={"taxonomy": taxonomy.name, "model": model})
    out = Path(out)
    rows = report.table_rows(analysis)
    files = {"results": out / "results.jsonl", "csv": report.write_csv(rows, out / "metrics.csv")}
    files["markdown"] = out / "metrics.md"
    files["markdown"].write_text(report.markdown(rows), encoding="utf-8")
    for name, r in analysis.results.items():
        if r.calibration is not None:
            files[f"calibration-{name}"] = r.calibration.save(out / f"calibration-{name}.json")
    title = f"guardprob eval: {Path(dataset.path).name} on {model}"
    files.update(report.write_plots(analysis, out, title))
    summary = _summary(dataset, records, analysis, model, taxonomy.name, calibration)
    files["html"] = report.write_html(rows, analysis, {k: files[k] for k in ("reliability", "roc", "pr", "f1")},
                                      out / "report.html", title, summary)
    if show:
        report.print_table(rows, title)
        for line in [*summary, *analysis.notes]:
            print(f"- {line}")
        for stats in ray_stats:
            print(stats.summary())
        print(f"- report: {files['html']}")
    return EvalReport(dataset, analysis, rows, files, records)


def _summary(dataset: Dataset, records: list[dict], analysis: Analysis, model: str, taxonomy: str, calibration: str) -> list[str]:
    seconds = sum(r.get("seconds", 0.0) for r in records) / max(len(records), 1)
    lines = [
        f"{len(records)} examples ({sum(1 for r in records if not r['labels'])} safe), model {model}, taxonomy {taxonomy}",
        f"development part {len(analysis.dev)}, test part {len(analysis.test)}; calibration: {calibration}",
        f"mean scoring time {seconds:.2f} s per example (all methods together)",
    ]
    if dataset.skipped:
        lines.append(f"{len(dataset.skipped)} invalid row(s) skipped, first: {dataset.skipped[0]}")
    if dataset.unmapped:
        lines.append(f"{dataset.unmapped} unsafe row(s) with no category in the taxonomy left out")
    if dataset.unlabelled:
        lines.append(f"{dataset.unlabelled} row(s) with an empty label cell left out")
    switches = {n: r.switch_threshold for n, r in analysis.results.items() if r.switch_threshold is not None}
    if switches:
        lines.append("selection switch thresholds (dev part): " + ", ".join(f"{n} {t:.3g}" for n, t in switches.items()))
    return lines


def _format_taxonomy(name: str) -> str:
    """The taxonomy a format's prompt is written for (``auto``: Llama Guard 3's, until a model says)."""
    from guardprob.formats import load_format

    taxonomy = load_format(name).taxonomy if name != "auto" else "llama-guard-3"
    return taxonomy if isinstance(taxonomy, str) else taxonomy.name
