"""The options the commands share: which model, taxonomy, format and engine, and how to search.

A leaf module: commands import it, and it imports no command.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from guardprob.backends.settings import ENGINES
from guardprob.errors import InputError
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
    g.add_argument("--cache-mb", type=float, default=None, metavar="MB",
                   help="transformers engine: megabytes of keys and values kept across requests for prompts that "
                        "share a prefix (default 256 on CPU, 2048 on a GPU; 0: off)")
    g.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="transformers and llamacpp engines: the most prompt tokens one model call of a prefill "
                        "runs; the server runs other requests between chunks and stops a prompt at any of them "
                        "(default 256; llamacpp: n_batch)")


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


def add_search_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("search")
    g.add_argument("--eps", type=float, default=None, help="do not expand children below this mass (default 1e-3)")
    g.add_argument("--top-p", type=float, default=None, help="expand only each node's top-p nucleus (default 1)")
    g.add_argument("--max-nodes", type=_limit, default=_UNSET, metavar="N|none",
                   help="model-evaluated nodes per example (default 2048; none: no limit)")
    g.add_argument("--max-depth", type=_limit, default=_UNSET, metavar="N|none",
                   help="longest token path expanded (default none)")
    g.add_argument("--unconstrained", action="store_true", help="raw softmax; mass outside the grammar is reported as invalid")
    g.add_argument("--speculate", type=int, default=None, metavar="N",
                   help="evaluate the children of nodes with at most N grammar tokens in the node's own call (default 1; 0: off)")
    g.add_argument("--prior", type=float, default=None, metavar="B",
                   help="with each node, also ask the descendants that recent searches expanded and whose expected "
                        "mass reaches eps/B (transformers engine; default 2; 0: off)")


def add_reasoning_options(parser: argparse.ArgumentParser) -> None:
    """For formats whose model reasons before its verdict (granite-guardian-3.3-think, a
    declarative format with ``reasoning``)."""
    g = parser.add_argument_group("reasoning (formats that reason before the verdict)")
    g.add_argument("--traces", type=int, default=None, metavar="N",
                   help="average over N reasoning traces sampled from the model, with standard errors "
                        "(default: the verdict scored exactly given the greedy reasoning)")
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature of the traces (default 1)")
    g.add_argument("--trace-seed", type=int, default=None, help="seed of the sampled traces")
    g.add_argument("--reasoning-tokens", type=int, default=None, metavar="N",
                   help="close a trace after N tokens (default: the format's, 512)")


def reasoning_params(args: argparse.Namespace) -> dict:
    return {k: v for k, v in (("traces", args.traces), ("temperature", args.temperature), ("seed", args.trace_seed),
                              ("reasoning_tokens", args.reasoning_tokens)) if v is not None}


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


def search_params(args: argparse.Namespace) -> dict:
    params = {k: v for k, v in (("eps", args.eps), ("top_p", args.top_p), ("speculate", args.speculate),
                                ("prior", args.prior)) if v is not None}
    params.update({k: v for k, v in (("max_nodes", args.max_nodes), ("max_depth", args.max_depth)) if v is not _UNSET})
    if args.unconstrained:
        params["constrained"] = False
    return params
