"""The command line: thin commands over the Python API.

Each command lives in its own module and registers itself here through ``register``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from guardprob.errors import GuardprobError

# command name -> module with ``register(subparsers)``
COMMANDS = {
    "score": "guardprob.commands.score",
    "formats": "guardprob.commands.formats",
    "eval": "guardprob.evaluation.cli",
    "bench": "guardprob.commands.bench",
    "serve": "guardprob.server.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guardprob", description="Per-category probabilities from guard models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except GuardprobError as exc:
        print(f"guardprob: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
