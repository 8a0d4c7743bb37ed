"""``guardprob formats``: the formats and taxonomies guardprob knows, and what ``auto`` picks."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("formats", help="list the guard formats and taxonomy presets (and what --format auto picks)")
    p.add_argument("--model", default=None, help="also say which format --format auto picks for this model name")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from guardprob.formats import REGISTRY, detect, load_format, taxonomies
    from guardprob.formats.registry import module_doc
    from guardprob.taxonomy import PRESETS

    print("formats (--format NAME, or a declarative .yaml / prompt .txt file):")
    for name in REGISTRY:
        fmt = load_format(name)
        asks = ", one question per category" if fmt.per_category else ""
        print(f"  {name:22} taxonomy {fmt.default_taxonomy().name}{asks}: {module_doc(fmt)}")
    print("taxonomies (--taxonomy NAME, or a .yaml / .json file):")
    for name, taxonomy in {**PRESETS, **taxonomies()}.items():
        print(f"  {name:22} {len(taxonomy)} categories: {', '.join(taxonomy.ids[:6])}{', ...' if len(taxonomy) > 6 else ''}")
    if args.model:
        chosen, reason = detect(args.model)
        print(f"--format auto for {args.model}: {chosen} (from {reason})")
    return 0


def announce(classifier) -> None:
    """Say which format ``auto`` picked, and why, on stderr (results stay on stdout)."""
    if classifier.format_reason != "asked for":
        print(f"guardprob: format {classifier.format.name} (from {classifier.format_reason}; --format overrides)",
              file=sys.stderr)
