#!/usr/bin/env bash
# Real tokenizers for the tests, offline: the vocabularies that ship in the llama.cpp source
# (models/ggml-vocab-*.gguf) inside llama-cpp-python's source distribution on PyPI, converted
# once into tokenizer directories under $GUARDPROB_CACHE/vocabs/VERSION/NAME (default
# ~/.cache/guardprob). Prints that folder.
#
# Every vocabulary transformers can convert: Llama 3's BPE and Llama 2's SentencePiece, Phi-3,
# Qwen2 and Qwen3.5, DeepSeek LLM and Coder, Falcon, GPT-2, StarCoder and Aquila. Left out, as
# transformers cannot read them: baichuan, bert-bge, command-r, gemma-4, gpt-neox, mpt,
# nomic-bert-moe and refact. VOCABS="qwen2 phi-3" converts only those.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
version=$("$PY" -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))")
root=${GUARDPROB_CACHE:-$HOME/.cache/guardprob}/vocabs/$version
all="llama-bpe llama-spm phi-3 qwen2 qwen35 deepseek-llm deepseek-coder falcon gpt-2 starcoder aquila"
missing=""
for n in ${VOCABS:-$all}; do
    [ -f "$root/$n/tokenizer_config.json" ] || missing="$missing $n"
done
if [ -n "$missing" ]; then
    mkdir -p "$root"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    echo "converting llama.cpp's vocabularies$missing ($version; log: $root/convert.log)" >&2
    {
        "$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
        patterns=""
        for n in $missing; do patterns="$patterns */vendor/llama.cpp/models/ggml-vocab-$n.gguf"; done
        # shellcheck disable=SC2086
        tar xzf "$work"/llama_cpp_python-*.tar.gz -C "$work" --wildcards $patterns
        # shellcheck disable=SC2086
        "$PY" - "$work" "$root" $missing <<'PYCODE'
import glob, sys
from transformers import AutoTokenizer
work, root, names = sys.argv[1], sys.argv[2], sys.argv[3:]
for name in names:
    path = glob.glob(f"{work}/*/vendor/llama.cpp/models/ggml-vocab-{name}.gguf")[0]
    folder, file = path.rsplit("/", 1)
    AutoTokenizer.from_pretrained(folder, gguf_file=file).save_pretrained(f"{root}/{name}")
PYCODE
    } >"$root/convert.log" 2>&1 || { tail -30 "$root/convert.log" >&2; exit 1; }
fi
echo "$root"
