"""The options the commands share: which model, taxonomy, format and engine, and how to search.

A leaf module: commands import it, and it imports no command.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from guardprob.backends.settings import ENGINES
from guardprob.errors import InputError
from guardprob.options.table import ENGINE, SEARCH, TRACE, Option, group
from guardprob.spec import ClassifierSpec


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options every command uses to pick a model, taxonomy, format and engine."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None, help="model directory, hub id or .gguf file (default: SmolLM2-135M-Instruct, offline)")
    g.add_argument("--taxonomy", default=None,
                   help="a preset (`guardprob formats` lists them) or a .yaml/.json file (default: the format's own)")
    g.add_argument("--format", "--template", dest="format", default="auto",
                   help="the guard family's prompt and verdict language: auto (from the model), a name that "
                        "`guardprob formats` lists, a declarative format file (.yaml) or a prompt file")
    g.add_argument("--backend", default="transformers", choices=ENGINES, help="engine (default: transformers)")
    g.add_argument("--device", default="cpu", help="torch device for the transformers engine (cpu, cuda, cuda:1)")
    g.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory or hub id, if not the model's")
    g.add_argument("--base-url", default=None, help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--served-model", default=None, help="the model name the server knows")
    g.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE",
                   help="engine option, e.g. top_logprobs=100 or text_mismatch=allow (repeatable; see docs/engines.md)")
    for o in group(ENGINE):  # --cache-mb, --prefill-chunk: the table's engine settings
        add_setting_flag(g, o)


def add_setting_flag(parser: argparse._ActionsContainer, o: Option) -> None:
    """The flag of a setting of the table (an engine's, or a server config key's): its value,
    or None when not given (the config file's, else the default); a switch flips the default."""
    if o.default is None:
        default = f"default: {o.none}" if o.none else "default: none"
    else:
        default = f"default {o.default_text()}"
    if o.type is bool:
        parser.add_argument(o.flag, dest=o.name, action="store_const", const=not o.default, default=None,
                            help=f"{o.name}: {o.help} ({default})")
    elif o.choices is not None:
        parser.add_argument(o.flag, dest=o.name, choices=o.choices, default=None, help=f"{o.help} ({default})")
    else:
        parser.add_argument(o.flag, dest=o.name, type=o.type, default=None, metavar=o.metavar,
                            help=f"{o.help} ({default})")


def spec_from_args(args: argparse.Namespace) -> ClassifierSpec:
    return ClassifierSpec(
        model=args.model,
        taxonomy=args.taxonomy,
        format=args.format,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        tokenizer=args.tokenizer,
        base_url=args.base_url,
        served_model=args.served_model,
        options=dict(_option(o) for o in args.backend_option),
        cache_mb=getattr(args, "cache_mb", None),
        prefill_chunk=getattr(args, "prefill_chunk", None),
    )


def _option(text: str) -> tuple[str, Any]:
    """KEY=VALUE, the value read as JSON where it is JSON (numbers, true/false), else as text."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise InputError(f"--backend-option {text!r}: write KEY=VALUE, e.g. top_logprobs=100")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _add_table_options(group: argparse._ArgumentGroup, options: tuple[Option, ...]) -> None:
    """One flag per option of the table that has one; its help ends with the table's default."""
    for o in options:
        if o.flag is None:
            continue
        if o.type is bool:  # a switch that turns the default off (--unconstrained)
            group.add_argument(o.flag, dest=o.dest, action="store_true",
                               help=f"{o.name}: {o.help} (default {o.default_text()})")
            continue
        parse = _limit if o.none == "no limit" else o.type
        none = f"; none: {o.none}" if o.none and o.default is not None else ""
        group.add_argument(o.flag, dest=o.dest, type=parse, default=_UNSET, metavar=o.metavar,
                           help=f"{o.help} (default {o.default_text()}{none})")


def add_search_options(parser: argparse.ArgumentParser) -> None:
    """The search options of the table (guardprob.options.table), one flag each."""
    _add_table_options(parser.add_argument_group("search"), group(SEARCH))


def add_reasoning_options(parser: argparse.ArgumentParser) -> None:
    """For formats whose model reasons before its verdict (granite-guardian-3.3-think, a
    declarative format with ``reasoning``): the trace options of the table."""
    _add_table_options(parser.add_argument_group("reasoning (formats that reason before the verdict)"), group(TRACE))


_UNSET = object()  # an option not given (None is a value: "no limit")


def _limit(text: str) -> int | None:
    """A positive integer, or ``none`` for no limit."""
    if text.strip().lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive integer, or none for no limit") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive integer, or none for no limit")
    return value


def _given(args: argparse.Namespace, options: tuple[Option, ...]) -> dict[str, Any]:
    """The options given on the command line, by option name (a switch: its value when given)."""
    out: dict[str, Any] = {}
    for o in options:
        if o.flag is None:
            continue
        value = getattr(args, o.dest, _UNSET)
        if o.type is bool:
            if value:
                out[o.name] = not o.default
        elif value is not _UNSET:
            out[o.name] = value
    return out


def search_params(args: argparse.Namespace) -> dict:
    """The search options given on the command line (``Classifier.score``'s keyword arguments)."""
    return _given(args, group(SEARCH))


def reasoning_params(args: argparse.Namespace) -> dict:
    """The trace options given on the command line (``Classifier.score``'s keyword arguments)."""
    return _given(args, group(TRACE))
