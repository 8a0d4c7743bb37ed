"""Every guard family's prompt and verdict language, one file each, and the registry.

A new format is one file here and one line in ``REGISTRY`` (docs/formats.md).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from guardprob.errors import TemplateError
from guardprob.formats.base import Format
from guardprob.formats.declarative import DeclarativeFormat
from guardprob.formats.granite_guardian import GraniteGuardianFormat
from guardprob.formats.granite_guardian33 import GraniteGuardian33Format
from guardprob.formats.instruction import InstructionFormat
from guardprob.formats.llama_guard import LlamaGuardFormat
from guardprob.formats.nemoguard import NemoGuardFormat
from guardprob.formats.polyguard import PolyGuardFormat
from guardprob.formats.prompt_file import PromptFileFormat
from guardprob.formats.qwen3guard import Qwen3GuardFormat
from guardprob.formats.shieldgemma import ShieldGemmaFormat
from guardprob.formats.wildguard import WildGuardFormat

REGISTRY: dict[str, Callable[[], Format]] = {
    "llama-guard-2": lambda: LlamaGuardFormat("llama-guard-2"),
    "llama-guard-3": lambda: LlamaGuardFormat("llama-guard-3"),
    "llama-guard-4": lambda: LlamaGuardFormat("llama-guard-4"),
    "instruction": InstructionFormat,
    "qwen3guard": Qwen3GuardFormat,
    "wildguard": WildGuardFormat,
    "shieldgemma": ShieldGemmaFormat,
    "granite-guardian-3.2": GraniteGuardianFormat,
    "granite-guardian-3.3": GraniteGuardian33Format,
    "granite-guardian-3.3-think": lambda: GraniteGuardian33Format("granite-guardian-3.3-think", think=True),
    "nemoguard": NemoGuardFormat,
    "polyguard": PolyGuardFormat,
}

# Model-name markers, most specific first: (marker, format).
_NAMES = (
    ("qwen3guard", "qwen3guard"), ("wildguard", "wildguard"), ("polyguard", "polyguard"), ("shieldgemma", "shieldgemma"),
    ("granite-guardian-3.2", "granite-guardian-3.2"), ("granite-guardian-3.3", "granite-guardian-3.3"),
    ("nemoguard", "nemoguard"), ("safety-guard", "nemoguard"),
    ("contentsafety", "nemoguard"), ("content-safety", "nemoguard"),
    ("guard-4", "llama-guard-4"), ("guard4", "llama-guard-4"),
    ("guard-3", "llama-guard-3"), ("guard3", "llama-guard-3"),
    ("guard-2", "llama-guard-2"), ("guard2", "llama-guard-2"),
)

# Chat-template markers of the families whose templates write their own prompt.
_TEMPLATES = (
    ("Safety: Controversial", "qwen3guard"), ("policy expert", "shieldgemma"),
    ("<start_of_risk_definition>", "granite-guardian-3.2"), ("judge_protocol", "granite-guardian-3.3"),
)

__all__ = ["REGISTRY", "Format", "detect", "load_format"]


def detect(model_name: str, tokenizer: Any = None) -> tuple[str, str]:
    """The format ``auto`` picks for a model, and why (for the message that says so)."""
    lowered = model_name.lower().replace("_", "-")
    for marker, name in _NAMES:
        if marker in lowered:
            return name, f"the model name {model_name!r}"
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(template, str):
        for marker, name in _TEMPLATES:
            if marker in template:
                return name, f"the tokenizer's chat template (it holds {marker!r})"
    if template:
        return "instruction", "the tokenizer's chat template: a chat model asked to answer as Llama Guard"
    return "llama-guard-3", "no better guess (no known model name, no chat template)"


def load_format(spec: str | Path | Format, model_name: str = "", tokenizer: Any = None) -> Format:
    """A registered name, ``auto`` (see ``detect``), a file (a declarative ``.yaml``/``.json``
    format, or a prompt text file in Llama Guard's language), or a Format."""
    if not isinstance(spec, (str, Path)):
        return spec
    spec = str(spec)
    if spec == "auto":
        spec = detect(model_name, tokenizer)[0]
    if spec in REGISTRY:
        return REGISTRY[spec]()

    suffix = Path(spec).suffix.lower()
    if suffix in (".yaml", ".yml", ".json"):
        return DeclarativeFormat.load(spec)
    if suffix:
        return PromptFileFormat.load(spec)
    raise TemplateError(f"unknown format {spec!r}; use auto, {', '.join(REGISTRY)} or a format file path")
