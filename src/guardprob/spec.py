"""A picklable description of a classifier to build: what the CLI, the server and remote
workers (Ray) share, so each can rebuild the same classifier in its own process."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guardprob.backends.settings import ENGINES, check_cache_mb, check_prefill_chunk
from guardprob.errors import InputError

if TYPE_CHECKING:
    from guardprob.classifier import Classifier

BACKENDS = ENGINES  # the name of earlier releases

@dataclass(frozen=True)
class ClassifierSpec:
    """model: a local directory, hub id or (llamacpp) .gguf file; None for the default model.
    The tokenizer always comes from ``tokenizer`` if given, else from ``model``."""

    model: str | None = None
    taxonomy: str | None = None
    format: str = "auto"
    backend: str = "transformers"
    device: str = "cpu"
    dtype: str = "float32"
    tokenizer: str | None = None
    base_url: str | None = None
    served_model: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    cache_mb: float | None = None  # the transformers engine's prefix cache (None: its default)
    prefill_chunk: int | None = None  # prompt tokens per model call of a prefill (None: the engine's default)

    def __post_init__(self) -> None:
        if self.backend not in ENGINES:
            raise InputError(f"unknown backend {self.backend!r}; use one of {', '.join(ENGINES)}")
        if self.options and self.backend == "transformers":
            raise InputError(f"backend options {', '.join(sorted(self.options))} apply to the llamacpp and openai "
                             "backends; the transformers backend takes none")
        if check_prefill_chunk(self.prefill_chunk) is not None and self.backend == "openai":
            raise InputError("prefill_chunk sets how a local engine steps a prompt's prefill; the openai engine's "
                             "server prefills on its own, so leave prefill_chunk (--prefill-chunk) out")
        if self.cache_mb is not None:
            check_cache_mb(self.cache_mb)
            if self.backend != "transformers":
                raise InputError(f"cache_mb sets the transformers engine's prefix cache; the {self.backend} engine "
                                 "keeps none of its own (see docs/engines.md), so leave cache_mb (--cache-mb) out")

    @property
    def name(self) -> str:
        """The model's name in scores, results headers and reports: what ``build()`` names it,
        known without building (a Ray driver writes it before any worker has loaded a model)."""
        from guardprob.models import DEFAULT_MODEL

        if self.backend == "llamacpp":
            return Path(self.model).stem if self.model else DEFAULT_MODEL
        if self.backend == "openai":  # the server's name for it, else the tokenizer's source
            return self.served_model or self.tokenizer or self.model or DEFAULT_MODEL
        return self.model or DEFAULT_MODEL

    def build(self) -> Classifier:
        """Deprecated: ``Classifier.from_spec(spec)`` (building flows from the classifier down)."""
        import warnings

        from guardprob.classifier import Classifier  # the one import up: gone with this method

        warnings.warn("ClassifierSpec.build() is deprecated, use Classifier.from_spec(spec); build() will be "
                      "removed in a future release", DeprecationWarning, stacklevel=2)
        return Classifier.from_spec(self)
