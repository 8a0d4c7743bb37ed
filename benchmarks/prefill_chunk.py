"""Milliseconds per prefill chunk: how long one model call of a stepped prefill takes, by chunk
size and by how many of the prompt's tokens are in the cache already (the context it reads).

A scheduler runs other requests' rounds between chunks, so one chunk is the longest a cheap
request waits behind a long prompt; the default ``prefill_chunk`` is the largest size whose
chunk stays well under 0.3 s here at every context (docs/performance.md). Example:

    .venv/bin/python benchmarks/prefill_chunk.py --chunks 128 256 512 --contexts 0 2048 6144
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from guardprob import Classifier
from guardprob.backends.base import Prompt
from guardprob.backends.transformers import TransformersBackend


def chunk_ms(backend: TransformersBackend, context: tuple[int, ...], chunk: int, repeats: int,
             rng: np.random.Generator) -> tuple[float, float]:
    """The median wall and CPU milliseconds of one chunk of ``chunk`` new tokens after ``context``
    (in the prefix cache already: the first step copies it in and runs a chunk, the second
    step, timed, runs the next chunk against all of it)."""
    wall, cpu = [], []
    for _ in range(repeats):
        fresh = tuple(int(x) for x in rng.integers(100, backend.vocab_size, 2 * chunk))
        session = backend.begin([Prompt(context + fresh)])
        session.prefill_step()
        started, used = time.perf_counter(), time.process_time()
        session.prefill_step()
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - used)
        assert not session.prefilling
        session.close()
    return 1000 * statistics.median(wall), 1000 * statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory or hub id (default: the default model)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--contexts", type=int, nargs="+", default=[0, 2048, 6144],
                        help="prompt tokens before the chunk timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clf = Classifier.from_pretrained(args.model) if args.model else Classifier.from_pretrained()
    rng = np.random.default_rng(0)
    longest = tuple(int(x) for x in rng.integers(100, clf.backend.vocab_size, max(args.contexts) + 1))
    backend = TransformersBackend(clf.model, cache_mb=4096, prefill_chunk=None)
    backend.open([Prompt(longest)]).close()  # every context below is a prefix of this one, cached
    print(f"{'chunk':>6} " + " ".join(f"{'ctx ' + str(c):>14}" for c in args.contexts)
          + "   (ms per chunk, median: wall / process CPU)")
    for chunk in args.chunks:
        backend.prefill_chunk = chunk
        chunk_ms(backend, (), chunk, 1, rng)  # warm-up
        row = [chunk_ms(backend, longest[:c], chunk, args.repeats, rng) for c in args.contexts]
        print(f"{chunk:>6} " + " ".join(f"{w:>7.0f} /{c:>5.0f}" for w, c in row), flush=True)

if __name__ == "__main__":
    main()
