"""Every option, declared once: its name, type, default, range, help and group.

Scoring options (groups search, trace, decision): the CLI flags of ``guardprob score``, ``bench``
and ``eval`` (commands/options.py), the request fields of ``/v1/classify`` and ``/v1/moderations``
(server/schemas.py), the evaluation API's ``params`` (evaluation/api.py) and the range checks of
``SearchConfig`` and ``TraceConfig`` are all read from ``OPTIONS``.

Settings (groups engine, llamacpp, openai, server, ray, run): the engines' options (``--cache-mb``,
``--prefill-chunk``, ``LlamaCppOptions``, ``OpenAIOptions``), the keys of the server config file
(``ServerConfig``, ``RayServeConfig``, the ``guardprob serve`` flags that mirror them) and the
settings of a run over many conversations (``batch_size``, ``limit``): their defaults, type and
range checks, and the config file's unknown keys, come from here too.

An option's error always names it and says what to give instead (``check``).

A leaf module: it imports nothing of guardprob but its errors, so every layer may read it.
"""

from __future__ import annotations

import math
import reprlib
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, make_dataclass
from typing import Any

from guardprob.errors import InputError

SEARCH, TRACE, DECISION = "search", "trace", "decision"
ENGINE, LLAMACPP, OPENAI = "engine", "llamacpp", "openai"
SERVER, RAY, RUN = "server", "ray", "run"
SCORING = (SEARCH, TRACE, DECISION)  # Classifier.score's keyword arguments
GROUPS = (*SCORING, ENGINE, LLAMACPP, OPENAI, SERVER, RAY, RUN)
CONFIG_GROUPS = (SERVER, ENGINE)  # the scalar keys of the server config file (ray: its ``ray`` mapping)

# Bad values shown in messages are cut short: a file may hold a huge list where a number belongs.
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 40


def _number(value: Any) -> bool:
    return isinstance(value, (int, float))


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _real(value: Any) -> bool:
    """A finite number, not a bool (``1e400`` in a file is infinity; ``true`` is no number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer too large for a float
        return False


def _whole(low: int) -> Callable[[Any], bool]:
    """Integers >= ``low``."""
    return lambda v: _integer(v) and v >= low


def _at_least(low: float, high: float = math.inf) -> Callable[[Any], bool]:
    """Finite numbers in [low, high]."""
    return lambda v: _real(v) and low <= v <= high


def _above(low: float, high: float = math.inf) -> Callable[[Any], bool]:
    """Finite numbers in (low, high]."""
    return lambda v: _real(v) and low < v <= high


def _switch(value: Any) -> bool:
    return isinstance(value, bool)


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


@dataclass(frozen=True)
class Option:
    """One scoring option.

    name: the keyword (``Classifier.score(eps=...)``, the request field, the ``params`` key).
    type: its Python type (``int | None`` where None means no limit). default: its value when
    not given. valid: the check a value passes. fix: what to give instead, in the error.
    range: the range or choices, as the docs and help read it. help: one line. group: search,
    trace or decision. flag: its CLI flag (None: not a flag). metavar: the flag's value name.
    none: what None means (None: None is not a value of it). fills: the name of the dataclass
    field it fills where that differs (``reasoning_tokens`` is ``TraceConfig.max_tokens``).
    request: whether the service takes it per request; bounds: pydantic bounds the service
    puts on the request field (a per-request cap, not the option's range). choices: the values
    it takes, where they are a list (its check is membership).
    """

    name: str
    type: type | Any
    default: Any
    valid: Callable[[Any], bool]
    fix: str
    range: str
    help: str
    group: str
    flag: str | None = None
    metavar: str | None = None
    none: str | None = None
    fills: str | None = None
    request: bool = False
    bounds: Mapping[str, Any] = field(default_factory=dict)
    choices: tuple[Any, ...] | None = None

    @property
    def attr(self) -> str:
        """The dataclass field it fills (SearchConfig, TraceConfig)."""
        return self.fills or self.name

    @property
    def dest(self) -> str:
        """The argparse destination of its flag."""
        return (self.flag or "").lstrip("-").replace("-", "_")

    def check(self, value: Any, where: str | None = None) -> Any:
        """``value``, or an InputError naming the option and the fix: ``name=value: fix``, or
        ``where is value; fix`` where ``where`` names it (a config file's key)."""
        if value is None and self.none is not None:
            return value
        if not self.valid(value):
            if where is None:
                raise InputError(f"{self.name}={value!r}: {self.fix}")
            raise InputError(f"{where} is {_REPR.repr(value)}; {self.fix}")
        return value

    def default_text(self) -> str:
        """The default as help text shows it."""
        if self.default is None:
            return f"none: {self.none}" if self.none else "none"
        if isinstance(self.default, bool):
            return str(self.default).lower()
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)


_SCORING_OPTIONS: tuple[Option, ...] = (
    # -- search (core.tree.SearchConfig) ------------------------------------------------
    Option("eps", float, 1e-3, lambda v: _number(v) and 0 <= v <= 1,
           "use a mass between 0 and 1 (0 expands everything)", "[0, 1]",
           "do not expand children below this mass", SEARCH, "--eps", request=True),
    Option("top_p", float, 1.0, lambda v: _number(v) and 0 < v <= 1,
           "use a value in (0, 1] (1 keeps every child)", "(0, 1]",
           "expand only each node's top-p nucleus", SEARCH, "--top-p", request=True),
    Option("max_nodes", int, 2048, lambda v: _integer(v) and v >= 1,
           "use a positive integer, or None for no limit", ">= 1 or none",
           "model-evaluated nodes per example", SEARCH, "--max-nodes", "N|none", none="no limit", request=True),
    Option("max_depth", int, None, lambda v: _integer(v) and v >= 1,
           "use a positive integer, or None for no limit", ">= 1 or none",
           "longest token path expanded", SEARCH, "--max-depth", "N|none", none="no limit", request=True),
    Option("tolerance", float, 0.0, lambda v: _number(v) and 0 <= v < 1,
           "use a mass in [0, 1)", "[0, 1)", "stop once the open frontier holds at most this mass", SEARCH),
    Option("batch", int, 64, lambda v: isinstance(v, int) and v >= 1,
           "use a positive integer", ">= 1", "nodes per prompt per model call", SEARCH),
    Option("constrained", bool, True, lambda v: isinstance(v, bool),
           "use true or false", "true, false",
           "renormalise over grammar tokens; off (--unconstrained): raw softmax, and the mass outside the grammar "
           "is reported as invalid", SEARCH, "--unconstrained"),
    Option("speculate", int, 1, lambda v: isinstance(v, int) and v >= 0,
           "use a number of grammar tokens >= 0 (0 turns speculation off)", ">= 0",
           "evaluate the children of nodes with at most N grammar tokens in the node's own call (0: off)",
           SEARCH, "--speculate", "N"),
    Option("prior", float, 2.0, lambda v: _number(v) and 0 <= v < math.inf,
           "use a number >= 0 (how boldly to guess from earlier searches; 0 turns it off)", ">= 0",
           "with each node, also ask the descendants that recent searches expanded and whose expected mass "
           "reaches eps/B (transformers engine; 0: off)", SEARCH, "--prior", "B"),
    # -- trace (core.reasoning.TraceConfig): formats that reason before the verdict ------
    Option("traces", int, 0, lambda v: _integer(v) and v >= 0,
           "use 0 (the greedy reasoning) or a number of sampled traces", ">= 0",
           "average over N reasoning traces sampled from the model, with standard errors (0: the verdict "
           "scored exactly given the greedy reasoning)", TRACE, "--traces", "N", request=True,
           bounds={"ge": 0, "le": 16}),
    Option("temperature", float, 1.0, lambda v: _number(v) and 0 < v < math.inf,
           "use a number > 0 (1 samples the model as it is)", "> 0",
           "sampling temperature of the traces", TRACE, "--temperature", request=True),
    Option("seed", int, None, _integer, "use an integer, or None", "an integer",
           "seed of the sampled traces", TRACE, "--trace-seed", none="fresh randomness", request=True),
    Option("reasoning_tokens", int, None, lambda v: _integer(v) and v >= 1,
           "use a positive number of tokens", ">= 1",
           "close a trace after N tokens", TRACE, "--reasoning-tokens", "N", none="the format's budget",
           fills="max_tokens", request=True),
    # -- decision ------------------------------------------------------------------------
    Option("decide", bool, False, lambda v: isinstance(v, bool), "use true or false", "true, false",
           "stop once every category's interval lies on one side of its threshold", DECISION, request=True),
)



def _choice(name: str, default: str, choices: tuple[str, ...], help: str, group: str, **more: Any) -> Option:
    """An option that takes one of ``choices``."""
    return Option(name, str, default, lambda v: v in choices, f"use {_either(choices)}", ", ".join(choices), help,
                  group, choices=choices, **more)


def _either(choices: tuple[str, ...]) -> str:
    return ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]


def _count(name: str, default: int, help: str, group: str, low: int = 1, **more: Any) -> Option:
    """A whole number >= ``low``."""
    fix = more.pop("fix", "use a positive integer" if low == 1 else f"use a whole number >= {low}")
    return Option(name, int, default, _whole(low), fix, f">= {low}", help, group, **more)


def _flag(name: str, default: bool, help: str, group: str, **more: Any) -> Option:
    return Option(name, bool, default, _switch, "use true or false", "true, false", help, group, **more)


# The estimators (guardprob.core.estimators.METHODS; tests/test_options.py keeps the two equal).
METHOD_NAMES = ("greedy", "first_token", "conditional", "joint", "marginal")

SETTINGS: tuple[Option, ...] = (
    # -- engine: ClassifierSpec's settings of the local engines, and server config keys ---------
    Option("cache_mb", float, None, _at_least(0),
           "use a number of megabytes >= 0 for the prefix cache (0 turns it off; leave it out for the default)",
           ">= 0", "transformers engine: megabytes of keys and values kept across requests for prompts that share "
           "a prefix (0: off)", ENGINE, "--cache-mb", "MB", none="256 on CPU, 2048 on a GPU"),
    Option("prefill_chunk", int, None, _whole(1),
           "use a positive number of prompt tokens per model call (leave it out for the default)", ">= 1",
           "transformers and llamacpp engines: the most prompt tokens one model call of a prefill runs; the server "
           "runs other requests between chunks and stops a prompt at any of them", ENGINE, "--prefill-chunk", "N",
           none="256; llamacpp: n_batch"),
    # -- llamacpp: LlamaCppOptions (--backend-option KEY=VALUE) ------------------------------
    _count("n_ctx", 0, "key/value cells per session (0: sized from the prompts)", LLAMACPP, low=0),
    _count("n_batch", 512, "tokens per decode call (a prefill chunk is at most this)", LLAMACPP),
    _count("n_threads", 0, "CPU threads (0: all cores)", LLAMACPP, low=0),
    _count("n_gpu_layers", 0, "layers offloaded to a GPU build (0: CPU only; -1: all)", LLAMACPP, low=-1),
    _count("max_sequences", 64, "sequences a session keeps beyond one per prompt (the search's open nodes)", LLAMACPP),
    _flag("extra_buffers", False, "use llama.cpp's extra buffer types (AMX, weight repacking; off: the portable "
          "layout)", LLAMACPP),
    # -- openai: OpenAIOptions (--backend-option KEY=VALUE) ----------------------------------
    _count("top_logprobs", 20, "log-probabilities per request (vLLM caps it with --max-logprobs, default 20)", OPENAI,
           fix="use a positive integer (20 is vLLM's default cap)"),
    _count("concurrency", 8, "requests in flight at once", OPENAI),
    Option("timeout", float, 60.0, _above(0), "use a positive number of seconds", "> 0",
           "seconds one HTTP request may take", OPENAI),
    _count("retries", 4, "further tries of a request that failed on the way (429, 5xx, a lost connection)", OPENAI,
           low=0),
    Option("backoff", float, 0.5, _at_least(0), "use a number of seconds >= 0", ">= 0",
           "seconds before the first retry, doubling after each", OPENAI),
    _choice("prompt_format", "auto", ("auto", "ids", "text"),
            "prompts as token ids, text, or auto (ids, falling back to text if the server refuses)", OPENAI),
    _flag("token_ids", False, "ask vLLM for token_id:N strings (return_tokens_as_token_ids)", OPENAI),
    _choice("verify", "auto", ("auto", "server", "local"),
            "how text prompts are checked: the server's tokenize endpoint, the local tokenizer, or auto", OPENAI),
    Option("api_key", str, None, _text, "use the key as text, or leave it out", "text", "the server's bearer key",
           OPENAI, none="OPENAI_API_KEY, if set"),
    _count("max_context", None, "prompt tokens the served model takes", OPENAI, none="the tokenizer's"),
    _choice("text_mismatch", "error", ("error", "allow"),
            "a text-only server that would tokenize a prompt differently: an error, or allow (score the server's "
            "tokenization)", OPENAI),
    _choice("batch_prompts", "auto", ("auto", "on", "off"),
            "a round's token-id prompts in one request: auto (where the server takes a list), on or off", OPENAI),
    # -- server: the scalar keys of the server config file (ServerConfig) ---------------------
    _choice("method", "marginal", METHOD_NAMES, "the estimator /v1/moderations uses and /v1/classify defaults to",
            SERVER, flag="--method"),
    Option("default_threshold", float, 0.5, _at_least(0, 1), "use a probability between 0 and 1", "[0, 1]",
           "the threshold of the categories the thresholds mapping leaves out", SERVER),
    _count("max_inputs", 32, "strings per /v1/moderations request", SERVER),
    _count("max_chars", 20_000, "characters per input text or message", SERVER),
    _count("max_body_bytes", 2_000_000, "request body bytes, counted as the body arrives (413 at the limit)", SERVER),
    Option("batch_wait_ms", float, 10.0, _at_least(0), "use a number of milliseconds >= 0", ">= 0",
           "how long the batcher waits for more requests to join a batch", SERVER),
    _count("max_batch", 16, "prompts of one request searched at once", SERVER),
    _count("max_running", 32, "prompts searched at once in all (continuous batching)", SERVER),
    _count("round_nodes", 128, "tree nodes per model call, shared fairly by the searches that want more", SERVER),
    _flag("continuous", False, "requests join a running search (continuous batching)", SERVER),
    _count("queue_size", 256, "prompts waiting to be scored; more are refused with 503", SERVER),
    Option("timeout_s", float, 60.0, _above(0, threading.TIMEOUT_MAX),
           f"use a positive number of seconds (at most {threading.TIMEOUT_MAX:.0f})", "> 0",
           "seconds per request, queue wait included; later answers are 504", SERVER),
    _count("max_request_chars", 200_000, "text in one request, counted before tokenizing (413 above it)", SERVER),
    _count("max_request_tokens", 32_768, "prompt tokens of one request: bounds its prefill", SERVER),
    _flag("docs", False, "serve the API's documentation pages (/docs, /redoc, /openapi.json)", SERVER, flag="--docs"),
    _flag("decide", True, "/v1/moderations stops each search once its flags are certified (method marginal)", SERVER),
    _flag("playground", True, "serve the /playground page over /v1/classify", SERVER, flag="--no-playground"),
    Option("openai_categories", str, "auto", _text, "use auto, none or the path of a YAML mapping", "auto, none, a file",
           "the /v1/moderations keys: auto (the shipped mapping), none (the taxonomy's own), or a YAML file", SERVER),
    # -- ray: the config file's ray mapping (RayServeConfig, guardprob serve --ray) -------------
    _count("replicas", 1, "with --ray: a fixed number of replicas, each with its own model and scheduler (given: over "
           "the config's ray section, autoscaling bounds included)", RAY, flag="--replicas", metavar="N"),
    _count("min_replicas", None, "autoscaling's lower bound", RAY, low=0, none="1 (with max_replicas)"),
    _count("max_replicas", None, "autoscaling's upper bound (set: autoscaling)", RAY, none="a fixed number"),
    Option("target_ongoing_requests", float, 8.0, _above(0), "use a positive number", "> 0",
           "autoscaling aims at this many requests in flight per replica", RAY),
    _count("max_ongoing_requests", 64, "requests one replica takes at once; more wait in Ray Serve's router", RAY),
    Option("num_cpus", float, 1.0, _above(0), "use a positive number", "> 0",
           "CPUs per replica (and torch threads on CPU)", RAY),
    Option("num_gpus", float, None, _at_least(0), "use a number >= 0, or null for 1 on cuda", ">= 0",
           "GPUs per replica", RAY, none="1 where the model runs on cuda, else 0"),
    _flag("affinity", True, "a conversation's turns go to the same replica (its prefix cache)", RAY),
    _count("retries", 2, "further tries of a request whose replica died under it, then 503", RAY, low=0),
    _count("ingress_replicas", 1, "replicas of the light ingress that hashes and forwards requests", RAY),
    Option("upscale_delay_s", float, 5.0, _at_least(0), "use a number of seconds >= 0", ">= 0",
           "autoscaling: seconds of high load before a replica is added", RAY),
    Option("downscale_delay_s", float, 60.0, _at_least(0), "use a number of seconds >= 0", ">= 0",
           "seconds of low load before one is removed", RAY),
    # -- run: scoring many conversations (Classifier.score_batch, evaluate) -------------------
    _count("batch_size", 16, "conversations searched at once", RUN),
    _count("limit", None, "examples read from the dataset", RUN, fix="use a positive number of examples",
           none="every example"),
)

OPTIONS: tuple[Option, ...] = _SCORING_OPTIONS + SETTINGS
# The scoring options by name (``check``); a setting's name may repeat in another group
# (``decide``: the request's, and the server's default for /v1/moderations).
BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS if o.group in SCORING}
_BY_GROUP: dict[str, dict[str, Option]] = {g: {o.name: o for o in OPTIONS if o.group == g} for g in GROUPS}


def group(name: str) -> tuple[Option, ...]:
    """The options of one group (search, trace, decision, engine, llamacpp, openai, server, ray, run)."""
    if name not in GROUPS:
        raise InputError(f"option group {name!r}: use one of {', '.join(GROUPS)}")
    return tuple(_BY_GROUP[name].values())


def option(group_name: str, name: str) -> Option:
    """One option of one group."""
    return _BY_GROUP[group_name][name]


def config_keys() -> tuple[Option, ...]:
    """The scalar keys of the server config file: the server's settings and the engine's."""
    return tuple(o for g in CONFIG_GROUPS for o in group(g))


def check_fields(value: Any, group_name: str, where: str | None = None, prefix: str = "") -> None:
    """Every option of a group on a dataclass that holds them (``ServerConfig``, ``OpenAIOptions``):
    the table's checks; ``where``: the file they came from, named in the error with the key
    (``prefix``: the mapping it sits in, e.g. ``ray.``)."""
    for o in group(group_name):
        o.check(getattr(value, o.attr), None if where is None else f"{where}: field {prefix + o.name!r}")


def defaults(name: str) -> dict[str, Any]:
    """A group's defaults, by option name (a dataclass's field defaults: ``= defaults(g)[name]``)."""
    return {o.name: o.default for o in group(name)}


def check(name: str, value: Any) -> Any:
    """``value`` if it is one of option ``name``'s, else an InputError that names it and the fix."""
    return BY_NAME[name].check(value)


def check_params(params: Mapping[str, Any], groups: Iterable[str] = (SEARCH, TRACE), where: str = "params") -> dict:
    """Scoring keyword arguments (``params``) checked against the table: every key an option of
    ``groups``, every value in its range. A copy of them."""
    known = {o.name: o for g in groups for o in group(g)}
    if not isinstance(params, Mapping):
        raise InputError(f"{where}={params!r}: give a mapping of option name to value, e.g. {{'eps': 0.001}}")
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise InputError(f"{where}: unknown option(s) {', '.join(map(str, unknown))}; use {', '.join(known)}")
    return {k: known[k].check(v) for k, v in params.items()}


def settings_class(name: str, groups: tuple[str, ...], module: str, doc: str, prefix: str = "") -> type:
    """A frozen dataclass whose fields are the options of ``groups``, each with the table's type
    and default, and whose ``__post_init__`` runs the table's checks: an instance's ``source``
    (where a subclass has one: the config file) and ``prefix`` (``ray.``) name the key in the
    error. A subclass adds its own fields and its rules across fields (``super().__post_init__()``)."""

    def __post_init__(self: Any) -> None:
        for g in groups:
            check_fields(self, g, getattr(self, "source", None), prefix)

    columns = [(o.attr, o.type | None if o.none else o.type, field(default=o.default)) for g in groups for o in group(g)]
    cls = make_dataclass(name, columns, frozen=True, namespace={"__post_init__": __post_init__, "__doc__": doc})
    cls.__module__ = module
    return cls
