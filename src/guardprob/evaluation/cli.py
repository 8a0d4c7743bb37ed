"""``guardprob eval``: every estimator and baseline over a labelled dataset, with a report."""

from __future__ import annotations

import argparse

from guardprob.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    from guardprob.commands.options import add_model_options, add_reasoning_options, add_search_options
    from guardprob.evaluation.api import DEFAULT_OUT
    from guardprob.evaluation.datasets import FORMATS
    from guardprob.evaluation.runner import ALL_METHODS

    p = sub.add_parser(
        "eval", help="evaluate the estimators on a labelled dataset (default: the shipped sample)",
        description="Score a labelled dataset with every estimator and baseline, fit thresholds and calibrators "
        "on a development part, and report test-part metrics, plots and an HTML page.",
    )
    d = p.add_argument_group("data")
    d.add_argument("--data", default=None, help="labelled .jsonl or .csv file (default: the sample shipped with guardprob)")
    d.add_argument("--data-format", dest="data_format", default="auto", choices=FORMATS, help="dataset layout (default: detected)")
    d.add_argument("--text-column", default="text", help="generic files: column with one user message")
    d.add_argument("--messages-column", default="messages", help="generic files: column with a list of {role, content}")
    d.add_argument("--prompt-column", default="prompt", help="generic files: user prompt column (with --response-column)")
    d.add_argument("--response-column", default="response", help="generic files: agent response column (judged)")
    d.add_argument("--labels-column", default="labels", help="generic files: column with the category ids")
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

    if args.ray_workers < 1:
        raise InputError(f"--ray-workers {args.ray_workers}: use a positive number")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    columns = Columns(args.text_column, args.messages_column, args.prompt_column, args.response_column, args.labels_column)
    evaluate(
        args.data, spec=spec_from_args(args), methods=methods, out=args.out, format=args.data_format, columns=columns,
        skip_invalid=args.skip_invalid, limit=args.limit, dev_fraction=args.dev_fraction, seed=args.seed,
        calibration=args.calibration, batch_size=args.batch_size, params={**search_params(args), **reasoning_params(args)}, resume=args.resume,
        force=args.force, ray=args.ray, ray_workers=args.ray_workers,
        ray_batch_timeout=args.ray_batch_timeout, progress=not args.no_progress,
    )
    return 0
