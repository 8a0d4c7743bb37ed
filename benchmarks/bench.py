"""Benchmark the engine: naive per-node baseline vs guardprob vs the floor.

A thin wrapper over ``guardprob bench``; every option is the command's. Example (the
numbers in docs/performance.md):

    .venv/bin/python benchmarks/bench.py --template llama-guard-3 \
        --data /path/to/content_moderation_lm3.jsonl --limit 32 --eps 0.01 --top-p 0.99 \
        --threads 1 --naive-limit 2 --batch 32 --json bench.json
"""

from __future__ import annotations

import sys

from guardprob.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
