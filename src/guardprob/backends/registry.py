"""Building the engine a ClassifierSpec names: the engine itself, the tokenizer, the ids that
end a verdict and the model's name (``Engine``), which ``Classifier.from_spec`` completes with
the format and taxonomy (spec -> engine -> Classifier; this module never imports the classifier).

The tokenizer always comes from a local transformers tokenizer (grammar and templates need
it): ``spec.tokenizer``, else ``spec.model`` (a directory or hub id; for a .gguf file, the
GGUF's own vocabulary), else the default model's. ``spec.options`` carries engine extras:
llamacpp: n_ctx, n_batch, n_threads, n_gpu_layers, max_sequences, extra_buffers;
openai: top_logprobs, concurrency, timeout, retries, backoff, prompt_format, token_ids,
verify, api_key, max_context, text_mismatch. ``spec.cache_mb`` sets the transformers engine's
prefix-cache budget (backends/prefix_cache.py); ``spec.prefill_chunk`` the most prompt tokens one
model call of a prefill runs (transformers; llama.cpp: at most n_batch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guardprob.backends.settings import ENGINES, token_ids
from guardprob.errors import InputError, ModelLoadError

if TYPE_CHECKING:
    from guardprob.backends.base import Backend
    from guardprob.spec import ClassifierSpec


@dataclass(frozen=True)
class Engine:
    """What a spec's engine brings to a classifier. ``model``: the in-process model (None for
    engines that hold it elsewhere); ``eos_ids``: the ids that end a verdict."""

    backend: Backend
    tokenizer: Any
    name: str
    model: Any = None
    eos_ids: tuple[int, ...] = ()


def build_engine(spec: ClassifierSpec) -> Engine:
    if spec.backend not in _BUILDERS:
        raise InputError(f"backend {spec.backend!r} is not built here; use {', '.join(ENGINES)}")
    return _BUILDERS[spec.backend](spec)


def _transformers(spec: ClassifierSpec) -> Engine:
    from guardprob import models
    from guardprob.backends.transformers import TransformersBackend

    model, tokenizer, name = models.load(spec.model, device=spec.device, dtype=spec.dtype)
    chunk = {} if spec.prefill_chunk is None else {"prefill_chunk": spec.prefill_chunk}  # else the engine's default
    backend = TransformersBackend(model, cache_mb=spec.cache_mb, **chunk)
    return Engine(backend, tokenizer, name, model=model)


def _options(cls: type, options: dict[str, Any], backend: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(options) - known
    if unknown:
        raise InputError(f"unknown {backend} option(s) {', '.join(sorted(unknown))}; use {', '.join(sorted(known))}")
    return cls(**options)


def _llamacpp(spec: ClassifierSpec) -> Engine:
    from guardprob import models
    from guardprob.backends.llamacpp import LlamaCppBackend, LlamaCppOptions

    if spec.model is None:
        gguf = models.default_gguf()
        tokenizer_source: str | None = spec.tokenizer or str(models.default_model_dir())
    else:
        gguf = Path(spec.model)
        if gguf.suffix != ".gguf":
            raise InputError(f"--backend llamacpp takes a .gguf file as --model, not {spec.model!r}")
        tokenizer_source = spec.tokenizer
    backend = LlamaCppBackend(gguf, _options(LlamaCppOptions, spec.options, "llamacpp"), prefill_chunk=spec.prefill_chunk)
    tokenizer = _tokenizer(tokenizer_source) if tokenizer_source else _gguf_tokenizer(gguf)
    # A tokenizer directory's generation config names the ids transformers stops at; a bare GGUF
    # has llama.cpp's end-of-generation set.
    eos = _eos_ids(tokenizer_source, tokenizer) if tokenizer_source else [i for i in backend.eos_ids if i < len(tokenizer)]
    return Engine(backend, tokenizer, spec.name, eos_ids=tuple(eos))


def _openai(spec: ClassifierSpec) -> Engine:
    from guardprob import models
    from guardprob.backends.openai import OpenAIBackend, OpenAIOptions

    if not spec.base_url:
        raise InputError("--backend openai needs --base-url, e.g. http://127.0.0.1:8000/v1")
    source = spec.tokenizer or spec.model or str(models.default_model_dir())
    tokenizer = _tokenizer(source)
    backend = OpenAIBackend(spec.base_url, spec.served_model, tokenizer, _options(OpenAIOptions, spec.options, "openai"))
    return Engine(backend, tokenizer, spec.name, eos_ids=tuple(_eos_ids(source, tokenizer)))


def _tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load a tokenizer from {source!r}: {exc}. Pass --tokenizer DIR_OR_HUB_ID") from None


def _gguf_tokenizer(gguf: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # the GGUF converter raises many kinds for unsupported vocabularies
        raise ModelLoadError(
            f"could not build a tokenizer from {gguf}'s vocabulary ({exc}); pass --tokenizer with the model's "
            "original tokenizer directory or hub id"
        ) from None


def _eos_ids(source: str, tokenizer: Any) -> list[int]:
    """The ids that end a verdict: the generation config's (as transformers would use), else the tokenizer's."""
    from transformers import GenerationConfig

    eos: set[int] = set()
    try:
        eos.update(token_ids(GenerationConfig.from_pretrained(source).eos_token_id))
    except (OSError, ValueError):
        pass
    if not eos and tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return sorted(eos)


_BUILDERS: dict[str, Callable[[ClassifierSpec], Engine]] = {"transformers": _transformers, "llamacpp": _llamacpp, "openai": _openai}
