"""``guardprob serve``: the moderation service on uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace

from guardprob.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    from guardprob.commands.options import add_model_options, add_search_options, add_setting_flag
    from guardprob.options.table import RAY, SERVER, group, option

    p = sub.add_parser("serve", help="serve /v1/moderations (OpenAI-compatible) and /v1/classify over HTTP")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--config", help="server config file (.yaml/.json): thresholds, limits, batching; see docs/server.md")
    p.add_argument("--calibration", help="calibration file written by `guardprob eval`: calibrated scores and thresholds")
    p.add_argument("--api-key", action="append", default=None, dest="api_keys",
                   help="accept this bearer key (repeatable; also GUARDPROB_API_KEYS=key1,key2); none: no auth")
    p.add_argument("--cors-origin", action="append", default=None, dest="cors_origins",
                   help="allow browser requests from this origin (repeatable; CORS is off by default)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    config = p.add_argument_group("server config (each flag over its key in --config)")
    for o in group(SERVER):  # --method, --docs, --no-playground: the table's server settings with a flag
        if o.flag is not None:
            add_setting_flag(config, o)
    p.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                   help="serve on Ray Serve, one model per replica (needs the serve extra): auto (RAY_ADDRESS or a "
                        "cluster started here, else a new local one; the default without ADDRESS), local, HOST:PORT "
                        "or ray://HOST:PORT; see docs/server.md")
    add_setting_flag(p, option(RAY, "replicas"))  # --replicas: the table's ray.replicas
    add_model_options(p)
    add_search_options(p)
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace):
    """The ServerConfig from --config, then the command-line options over it."""
    from guardprob.commands.options import search_params
    from guardprob.options.table import RAY, config_keys, option
    from guardprob.server.config import ServerConfig, load_config

    config = load_config(args.config) if args.config else ServerConfig()
    keys = list(args.api_keys or [])
    keys += [k.strip() for k in os.environ.get("GUARDPROB_API_KEYS", "").split(",") if k.strip()]
    calibration = None
    if args.calibration:
        from guardprob.evaluation.calibration import load_calibration

        calibration = load_calibration(args.calibration)
    if getattr(args, "replicas", None) is not None:
        if getattr(args, "ray", None) is None:
            raise InputError(f"--replicas {args.replicas}: replicas are Ray Serve's; add --ray (one process serves "
                             "without it)")
        option(RAY, "replicas").check(args.replicas, "--replicas")
        config = replace(config, ray=replace(config.ray, replicas=args.replicas, min_replicas=None, max_replicas=None))
    flagged = {o.name: getattr(args, o.name, None) for o in config_keys() if o.flag is not None}
    return config.with_overrides(
        search=search_params(args) or None,
        api_keys=tuple(keys) or None,
        cors_origins=tuple(args.cors_origins) if args.cors_origins else None,
        calibration=calibration,
        **flagged,  # --method, --docs, --no-playground, --cache-mb, --prefill-chunk (guardprob.options.table)
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from guardprob.commands.options import spec_from_args
    from guardprob.server.app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(message)s", stream=sys.stderr)
    config = build_config(args)
    spec = spec_from_args(args)
    if args.cache_mb is None and config.cache_mb is not None:  # the config file's, where --cache-mb is not given
        spec = replace(spec, cache_mb=config.cache_mb)
    if args.prefill_chunk is None and config.prefill_chunk is not None:
        spec = replace(spec, prefill_chunk=config.prefill_chunk)
    if args.ray is not None:
        from guardprob.server.ray_serve import serve_forever

        serve_forever(spec, config, address=args.ray, host=args.host, port=args.port)
        return 0
    failed: list[BaseException] = []

    def on_load_error(exc: BaseException) -> None:
        failed.append(exc)
        server.should_exit = True

    app = create_app(spec.build, config, on_load_error=on_load_error)
    # uvicorn's own access log is off: the app writes JSON access lines (without headers).
    server = uvicorn.Server(uvicorn.Config(
        app, host=args.host, port=args.port, access_log=False, log_level=args.log_level,
        timeout_graceful_shutdown=int(config.timeout_s) + 5,
    ))
    server.run()
    if failed:
        print(f"guardprob: error: the model failed to load: {failed[0]}", file=sys.stderr)
        return 2
    return 0
