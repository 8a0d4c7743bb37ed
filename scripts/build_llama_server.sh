#!/usr/bin/env bash
# Build llama.cpp's own OpenAI-compatible server, `llama-server`, and print its path.
#
# It is built once per llama-cpp-python version, from the llama.cpp source that ships in that
# version's source distribution on PyPI, into $GUARDPROB_CACHE/llama-server/VERSION/ (default
# ~/.cache/guardprob). The tests use it as a real server that takes token-id prompts, as vLLM
# and SGLang do. About 20 minutes on 2 cores the first time; instant afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
version=$("$PY" -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))")
root=${GUARDPROB_CACHE:-$HOME/.cache/guardprob}/llama-server/$version
binary=$root/llama-server
if [ ! -x "$binary" ]; then
    mkdir -p "$root"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    log=$root/build.log
    echo "building llama-server $version (log: $log)" >&2
    {
        "$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
        tar xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
        # One static binary; no tests, examples, curl or TLS (the tests serve on loopback).
        cmake -S "$work"/llama_cpp_python-*/vendor/llama.cpp -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
            -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
            -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
        cmake --build "$work/build" --target llama-server -j "$(nproc)"
    } >"$log" 2>&1 || { tail -30 "$log" >&2; exit 1; }
    cp "$work/build/bin/llama-server" "$binary.partial"
    mv "$binary.partial" "$binary"
fi
echo "$binary"
