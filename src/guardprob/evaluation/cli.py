"""``guardprob eval``: every estimator and baseline over a labelled dataset, with a report."""

from __future__ import annotations

import argparse

from guardprob.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    from guardprob.commands.options import add_model_options, add_reasoning_options, add_search_options
    from guardprob.evaluation.api import DEFAULT_OUT
    from guardprob.evaluation.datasets import FORMATS
    from guardprob.evaluation.presets import PRESETS
    from guardprob.evaluation.runner import ALL_METHODS

    p = sub.add_parser(
        "eval", help="evaluate the estimators on a labelled dataset (default: the shipped sample)",
        description="Score a labelled dataset with every estimator and baseline, fit thresholds and calibrators "
        "on a development part, and report test-part metrics, plots and an HTML page.",
    )
    d = p.add_argument_group("data")
    d.add_argument("--data", default=None,
                   help="labelled .jsonl, .csv, .parquet, .arrow or .feather file, a directory saved with datasets' "
                        "save_to_disk, or a hub id owner/name (default: the sample shipped with guardprob, or the preset's)")
    d.add_argument("--data-format", dest="data_format", default="auto", choices=FORMATS, help="dataset layout (default: detected)")
    d.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="a public dataset's columns and label map (see docs/evaluation.md); reads its hub copy unless --data is given")
    d.add_argument("--split", default=None, help="split of a saved or hub dataset (e.g. test)")
    d.add_argument("--subset", default=None, help="configuration of a hub dataset (e.g. wildguardtest)")
    d.add_argument("--text-column", default=None, help="column with the user message (default: text)")
    d.add_argument("--messages-column", default=None, help="column with a list of {role, content} (default: messages)")
    d.add_argument("--prompt-column", default=None, help="another name for the user message column (default: prompt)")
    d.add_argument("--response-column", default=None,
                   help="column with the assistant's answer, judged where a row has one (default: response)")
    d.add_argument("--labels-column", action="append", default=None, metavar="COLUMN",
                   help="column with the labels: ids or names, a list, a {name: flag} mapping, or a 0/1 flag naming its "
                        "own column (repeatable, e.g. one column per category; default: labels)")
    d.add_argument("--unsafe-column", default=None,
                   help="column saying whether a row is unsafe (true/false, 0/1, safe/unsafe, harmful/unharmful); its "
                        "safe rows have no labels, and its unsafe rows without a mapped label are left out")
    d.add_argument("--label-map", default=None, metavar="FILE",
                   help='.json/.yaml map of label name to ids: {"violence": "S1", "benign": [], "politics": null}')
    d.add_argument("--map", action="append", default=[], metavar="NAME=ID[,ID]",
                   help="map one label name to category ids (repeatable; NAME= means safe, NAME=- no category)")
    d.add_argument("--skip-invalid", action="store_true", help="count and skip bad rows instead of stopping")
    d.add_argument("--limit", type=int, default=None, help="use only the first N examples")
    e = p.add_argument_group("evaluation")
    e.add_argument("--methods", default=",".join(ALL_METHODS), help=f"comma-separated (default: all of {','.join(ALL_METHODS)})")
    e.add_argument("--out", default=DEFAULT_OUT, help=f"results directory (default: ./{DEFAULT_OUT})")
    e.add_argument("--dev-fraction", type=float, default=0.5, help="share of examples used to fit thresholds (default 0.5)")
    e.add_argument("--seed", type=int, default=0, help="seed of the development/test split")
    e.add_argument("--calibration", default="isotonic", choices=("isotonic", "temperature", "none"))
    e.add_argument("--batch-size", type=int, default=8, help="examples per model call")
    e.add_argument("--resume", action="store_true", help="continue the run whose results are in --out")
    e.add_argument("--force", action="store_true", help="overwrite the results in --out")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--ray", metavar="ADDRESS", default=None, help="score on a Ray cluster (needs the ray extra)")
    e.add_argument("--ray-workers", metavar="N", type=int, default=1, help="Ray workers, each with its own model")
    e.add_argument("--ray-batch-timeout", metavar="SECONDS", type=float, default=None,
                   help="kill a Ray worker whose batch runs longer (a hung worker) and retry the batch elsewhere")
    add_model_options(p)
    add_search_options(p)
    add_reasoning_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from guardprob.commands.options import reasoning_params, search_params, spec_from_args
    from guardprob.evaluation.api import evaluate
    from guardprob.evaluation.datasets import Columns
    from guardprob.evaluation.labels import LabelMap, load_label_map, parse_map_options

    if args.ray_workers < 1:
        raise InputError(f"--ray-workers {args.ray_workers}: use a positive number")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    columns = Columns(args.text_column, args.messages_column, args.prompt_column, args.response_column,
                      tuple(args.labels_column) if args.labels_column else None, args.unsafe_column)
    label_map = load_label_map(args.label_map) if args.label_map else LabelMap()
    label_map = label_map.merged(parse_map_options(args.map))
    evaluate(
        args.data, spec=spec_from_args(args), methods=methods, out=args.out, format=args.data_format, columns=columns,
        preset=args.preset, label_map=label_map or None, split=args.split, subset=args.subset,
        skip_invalid=args.skip_invalid, limit=args.limit, dev_fraction=args.dev_fraction, seed=args.seed,
        calibration=args.calibration, batch_size=args.batch_size, params={**search_params(args), **reasoning_params(args)}, resume=args.resume,
        force=args.force, ray=args.ray, ray_workers=args.ray_workers,
        ray_batch_timeout=args.ray_batch_timeout, progress=not args.no_progress,
    )
    return 0
