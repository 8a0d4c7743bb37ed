#!/usr/bin/env bash
# Real tokenizers for the tests, offline: the vocabularies that ship in the llama.cpp source
# inside llama-cpp-python's source distribution on PyPI (Llama 3's BPE, Llama 2's
# SentencePiece, Qwen2's BPE, Phi-3's), converted once into tokenizer directories under
# $GUARDPROB_CACHE/vocabs/VERSION/ (default ~/.cache/guardprob). Prints that folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
version=$("$PY" -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))")
root=${GUARDPROB_CACHE:-$HOME/.cache/guardprob}/vocabs/$version
names="llama-bpe llama-spm qwen2 phi-3"
if [ ! -f "$root/done" ]; then
    mkdir -p "$root"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    echo "converting llama.cpp's vocabularies $version (log: $root/convert.log)" >&2
    {
        "$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
        patterns=""
        for n in $names; do patterns="$patterns */vendor/llama.cpp/models/ggml-vocab-$n.gguf"; done
        # shellcheck disable=SC2086
        tar xzf "$work"/llama_cpp_python-*.tar.gz -C "$work" --wildcards $patterns
        "$PY" - "$work" "$root" $names <<'PYCODE'
import glob, sys
from transformers import AutoTokenizer
work, root, names = sys.argv[1], sys.argv[2], sys.argv[3:]
for name in names:
    path = glob.glob(f"{work}/*/vendor/llama.cpp/models/ggml-vocab-{name}.gguf")[0]
    folder, file = path.rsplit("/", 1)
    AutoTokenizer.from_pretrained(folder, gguf_file=file).save_pretrained(f"{root}/{name}")
PYCODE
    } >"$root/convert.log" 2>&1 || { tail -30 "$root/convert.log" >&2; exit 1; }
    touch "$root/done"
fi
echo "$root"
