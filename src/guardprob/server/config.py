"""Server settings: a frozen ``ServerConfig``, loaded from YAML/JSON, and per-category thresholds.

A config file (every field optional; each scalar key, and each key under ``ray``, is declared
once in guardprob.options.table, groups server, engine and ray: its type, default, range and
the fix its error gives)::

    method: marginal            # the estimator /v1/moderations uses and /v1/classify defaults to
    search: {eps: 0.001, top_p: 1.0, max_nodes: 2048, max_depth: null, constrained: true}   # null: no limit
    thresholds: {S1: 0.3, hate: 0.7, "Sexual Content": 0.6}   # by id, lower_snake key or name
    default_threshold: 0.5
    max_inputs: 32              # strings per /v1/moderations request
    max_chars: 20000            # characters per input text or message
    max_body_bytes: 2000000     # counted as the body arrives (chunked too): refused with 413 at the limit
    batch_wait_ms: 10           # how long the batcher waits for more requests to join a batch
    max_batch: 16               # prompts of one request searched at once
    max_running: 32             # prompts searched at once in all (continuous batching: requests join a running search)
    round_nodes: 128            # tree nodes per model call (shared fairly when more want in): how long one call holds the worker
    continuous: false           # true: requests join the running search (continuous batching)
    queue_size: 256             # prompts waiting to be scored; more are refused with 503
    timeout_s: 60               # per request, queue wait included; later answers are 504
    max_request_chars: 200000   # text in one request, counted before tokenizing (413 above it)
    max_request_tokens: 32768   # prompt tokens of one request: bounds its prefill
    docs: false                 # serve /docs, /redoc and /openapi.json
    decide: true                # /v1/moderations stops each search once its flags are certified (marginal)
    cors_origins: []
    playground: true            # serve the /playground page
    openai_categories: auto     # /v1/moderations keys: auto (the shipped mapping), none, or a YAML file
    cache_mb: 256               # transformers engine: prefix cache across requests (0: off; default 256 on CPU)
    prefill_chunk: 256          # prompt tokens per model call of a prefill; other requests run between chunks
    ray:                        # guardprob serve --ray: the Ray Serve application (docs/server.md)
      replicas: 2               # a fixed number of replicas, each with its own model and scheduler
      min_replicas: 1           # or autoscaling: set max_replicas (min_replicas defaults to 1)
      max_replicas: 4
      target_ongoing_requests: 8   # autoscaling aims at this many requests in flight per replica
      max_ongoing_requests: 64  # requests one replica takes at once; more wait in Ray Serve's router
      num_cpus: 1               # per replica (and torch threads on CPU)
      num_gpus: null            # per replica; null: 1 where the model runs on cuda, else 0
      affinity: true            # a conversation's turns go to the same replica (its prefix cache)
      retries: 2                # further tries of a request whose replica died under it, then 503
      ingress_replicas: 1       # replicas of the light ingress that hashes and forwards requests
      upscale_delay_s: 5        # autoscaling: seconds of high load before a replica is added
      downscale_delay_s: 60     # seconds of low load before one is removed
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guardprob.errors import InputError
from guardprob.inputs.datafile import finite, read_data_file, show
from guardprob.options.table import (
    ENGINE,
    RAY,
    SEARCH,
    SERVER,
    check_params,
    config_keys,
    group,
    settings_class,
)

if TYPE_CHECKING:
    from guardprob.evaluation.calibration import Calibration
    from guardprob.taxonomy import Taxonomy

# The search parameters a config file may set: the table's search options (every field of
# SearchConfig but the one the classifier sets for the method asked for and the evaluation
# baselines' first-id walk).
SEARCH_KEYS = tuple(o.name for o in group(SEARCH))
# The file's keys that are no option of the table: mappings and lists, each read below.
STRUCTURED_KEYS = ("search", "thresholds", "cors_origins", "ray")
# The shortest body either endpoint accepts: a smaller max_body_bytes refuses every request.
_SMALLEST_BODY = len('{"input":"x"}')


def file_keys() -> tuple[str, ...]:
    """Every key a server config file may hold: the table's (server and engine) and the structured ones."""
    return (*(o.name for o in config_keys()), *STRUCTURED_KEYS)


# The scalar keys (groups server and engine) and those of the ray mapping: fields, defaults and
# checks from guardprob.options.table, each error naming the file and the key.
_ServerSettings = settings_class("_ServerSettings", (SERVER, ENGINE), __name__, "The server config file's scalar keys.")
_RaySettings = settings_class("_RaySettings", (RAY,), __name__, "The keys of the config file's ray mapping.",
                              prefix="ray.")


@dataclass(frozen=True)
class ServerConfig(_ServerSettings):
    """The service's settings: the table's scalar keys (``guardprob.options.table``, groups server
    and engine: method, default_threshold, max_inputs, max_chars, max_body_bytes, batch_wait_ms,
    max_batch, max_running, round_nodes, continuous, queue_size, timeout_s, max_request_chars,
    max_request_tokens, docs, decide, playground, openai_categories, cache_mb, prefill_chunk),
    and the structured ones below."""

    search: Mapping[str, Any] = field(default_factory=dict)
    thresholds: Mapping[str, float] = field(default_factory=dict)  # as written: id, key or name -> threshold
    api_keys: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    calibration: Calibration | None = None
    ray: RayServeConfig = field(default_factory=lambda: RayServeConfig())  # guardprob serve --ray
    source: str = "defaults"  # where the values came from, for error messages

    def __post_init__(self) -> None:
        super().__post_init__()  # every scalar key: the table's type and range check
        where = self.source
        if not isinstance(self.ray, RayServeConfig):
            raise InputError(f"{where}: field 'ray' is {show(self.ray)}; use a mapping of Ray Serve settings")
        if not isinstance(self.search, Mapping):
            raise InputError(f"{where}: field 'search' is {show(self.search)}; use a mapping of search options, "
                             "e.g. {eps: 0.001, max_nodes: 2048}")
        unknown = set(self.search) - set(SEARCH_KEYS)
        if unknown:
            raise InputError(
                f"{where}: field 'search' has unknown key(s) {', '.join(sorted(map(str, unknown)))}; use {', '.join(SEARCH_KEYS)}"
            )
        try:  # each value in its range: the table's check, as a request's would be
            check_params(self.search, (SEARCH,))
        except InputError as exc:
            raise InputError(f"{where}: field 'search': {exc}") from None
        for name, value in self.thresholds.items():
            if finite(value) is None or not 0 <= value <= 1:
                raise InputError(f"{where}: threshold {name!r} is {show(value)}; use a probability between 0 and 1")
        self._check_can_serve()
        if self.calibration is not None and self.calibration.method and self.calibration.method != self.method:
            raise InputError(
                f"the calibration file was fitted for method {self.calibration.method!r} but the server scores with "
                f"{self.method!r}; set method: {self.calibration.method} (or --method {self.calibration.method})"
            )

    def _check_can_serve(self) -> None:
        """Refuse settings that are each valid but together could never answer a request."""
        where = self.source
        if self.queue_size < self.max_inputs:  # the batcher queues a request's inputs all or none
            raise InputError(
                f"{where}: field 'queue_size' is {self.queue_size} but 'max_inputs' is {self.max_inputs}: a request "
                f"with more than {self.queue_size} inputs could never enter even an empty queue and would always get "
                "503 queue_full; set queue_size to at least max_inputs (or lower max_inputs)"
            )
        if self.max_running < self.max_batch:
            raise InputError(
                f"{where}: field 'max_running' is {self.max_running} but 'max_batch' is {self.max_batch}: a request's "
                f"batch of {self.max_batch} prompts could never all search at once; set max_running to at least "
                "max_batch (or lower max_batch)"
            )
        if self.max_request_chars < self.max_chars:
            raise InputError(
                f"{where}: field 'max_request_chars' is {self.max_request_chars} but 'max_chars' is {self.max_chars}: "
                "a single text of the allowed length would always get 413; set max_request_chars to at least max_chars"
            )
        if self.max_body_bytes < _SMALLEST_BODY:
            raise InputError(
                f"{where}: field 'max_body_bytes' is {self.max_body_bytes}, below the {_SMALLEST_BODY} bytes of the "
                "shortest request ({\"input\":\"x\"}), so every request would get 413; use a few kilobytes at least"
            )
        if self.max_batch > 1 and self.batch_wait_ms >= self.timeout_s * 1000:
            raise InputError(
                f"{where}: field 'batch_wait_ms' is {self.batch_wait_ms!r} but 'timeout_s' is {self.timeout_s!r}: a "
                "request that arrives alone waits batch_wait_ms for others before it is scored, so it would always "
                "time out (504); keep batch_wait_ms well below timeout_s * 1000 (or set max_batch: 1)"
            )

    def with_overrides(self, **values: Any) -> ServerConfig:
        """A copy with the given fields replaced (None values are ignored); search keys merge."""
        values = {k: v for k, v in values.items() if v is not None}
        if "search" in values:
            values["search"] = {**self.search, **values["search"]}
        return replace(self, **values)


def load_config(path: str | Path) -> ServerConfig:
    """Read a YAML (.yaml/.yml) or JSON (.json) server config file."""
    path = Path(path)
    data = read_data_file(path, "server config file", InputError)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"server config file {path}: expected a mapping of settings, got {type(data).__name__}")
    allowed = file_keys()  # the table's keys (guardprob.options.table) and the structured ones
    unknown = set(data) - set(allowed)
    if unknown:
        raise InputError(
            f"server config file {path}: unknown field(s) {', '.join(sorted(map(str, unknown)))}; "
            f"use {', '.join(sorted(allowed))} (API keys go in --api-key or GUARDPROB_API_KEYS, not in files)"
        )
    for name, kind in (("search", dict), ("thresholds", dict), ("cors_origins", list), ("ray", dict)):
        if name in data and not isinstance(data[name], kind):
            raise InputError(f"server config file {path}: field {name!r} must be a {'mapping' if kind is dict else 'list'}")
    if "cors_origins" in data:
        bad = next((o for o in data["cors_origins"] if not isinstance(o, str)), None)
        if bad is not None:
            raise InputError(f"server config file {path}: field 'cors_origins' holds {show(bad)}; list origins "
                             "as text, e.g. https://app.example.com")
        data["cors_origins"] = tuple(data["cors_origins"])
    if "thresholds" in data:
        data["thresholds"] = {str(k): v for k, v in data["thresholds"].items()}
    if "ray" in data:
        data["ray"] = RayServeConfig.from_mapping(data["ray"], f"server config file {path}")
    return ServerConfig(**data, source=f"server config file {path}")


# -- Ray Serve ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RayServeConfig(_RaySettings):
    """How ``guardprob serve --ray`` spreads the service over replicas (docs/server.md).

    ``max_replicas`` set: autoscaling between ``min_replicas`` and it, aiming at
    ``target_ongoing_requests`` per replica; otherwise ``replicas`` fixed replicas. The keys
    (replicas, min_replicas, max_replicas, target_ongoing_requests, max_ongoing_requests,
    num_cpus, num_gpus, affinity, retries, ingress_replicas, upscale_delay_s, downscale_delay_s)
    are the table's (``guardprob.options.table``, group ray)."""

    source: str = "defaults"

    def __post_init__(self) -> None:
        super().__post_init__()  # each key's type and range: the table's
        where = f"{self.source}: field 'ray'"
        if self.min_replicas is not None and self.max_replicas is None:
            raise InputError(f"{where}: 'min_replicas' is set but 'max_replicas' is not; autoscaling needs both bounds "
                             "(or use 'replicas' for a fixed number)")
        if self.max_replicas is not None and self.max_replicas < (self.min_replicas or 1):
            raise InputError(f"{where}: 'max_replicas' is {self.max_replicas}, below 'min_replicas' "
                             f"{self.min_replicas or 1}; raise max_replicas")
        if self.target_ongoing_requests > self.max_ongoing_requests:
            raise InputError(f"{where}: 'target_ongoing_requests' is {self.target_ongoing_requests:g}, above "
                             f"'max_ongoing_requests' {self.max_ongoing_requests}, so autoscaling could never see it; "
                             "lower it")

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str) -> RayServeConfig:
        allowed = {o.name for o in group(RAY)}
        unknown = set(data) - allowed
        if unknown:
            raise InputError(f"{source}: field 'ray' has unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                             f"use {', '.join(sorted(allowed))}")
        return cls(**data, source=source)


# -- categories ---------------------------------------------------------------------------
def snake_key(name: str) -> str:
    """'Suicide & Self-Harm' -> 'suicide_self_harm': lowercase, every run of other characters one '_'."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def category_keys(taxonomy: Taxonomy) -> dict[str, str]:
    """id -> the response key: the name in lower_snake style, or ``<key>_<id>`` where two names collide."""
    keys = {c.id: snake_key(c.name) or snake_key(c.id) for c in taxonomy}
    counts: dict[str, int] = {}
    for key in keys.values():
        counts[key] = counts.get(key, 0) + 1
    return {cid: (key if counts[key] == 1 else f"{key}_{snake_key(cid)}") for cid, key in keys.items()}


@dataclass(frozen=True)
class Thresholds:
    """The threshold of every category id and where it came from (config, calibration or default)."""

    values: Mapping[str, float]
    sources: Mapping[str, str]


def resolve_thresholds(
    config: ServerConfig, taxonomy: Taxonomy, calibration: Calibration | None = None, others: Iterable[str] = (),
) -> Thresholds:
    """Config thresholds (by id, key or name) first, then the calibration file's, then the default;
    ``others``: names the config may also set (the OpenAI categories), left out here."""
    others = set(others)
    keys = category_keys(taxonomy)
    lookup: dict[str, str] = {}
    for c in taxonomy:
        for alias in (c.id, keys[c.id], c.name, c.name.lower()):
            lookup.setdefault(alias, c.id)
    configured: dict[str, float] = {}
    for written, value in config.thresholds.items():
        cid = lookup.get(written) or lookup.get(written.lower())
        if cid is None and written in others:
            continue
        if cid is None:
            raise InputError(
                f"{config.source}: field 'thresholds' names {written!r}, not a category of taxonomy "
                f"{taxonomy.name!r}; use an id ({', '.join(taxonomy.ids)}) or a key ({', '.join(keys.values())})"
            )
        configured[cid] = float(value)
    if calibration is not None:
        calibration.check_taxonomy(taxonomy)
    values: dict[str, float] = {}
    sources: dict[str, str] = {}
    for cid in taxonomy.ids:
        if cid in configured:
            values[cid], sources[cid] = configured[cid], "config"
        elif calibration is not None and cid in calibration.thresholds:
            values[cid], sources[cid] = float(calibration.thresholds[cid]), "calibration"
        else:
            values[cid], sources[cid] = float(config.default_threshold), "default"
    return Thresholds(values, sources)
