"""Milliseconds per prefill chunk: how long one model call of a stepped prefill takes, by chunk
size and by how many of the prompt's tokens are in the cache already (the context it reads).

A scheduler runs other requests' rounds between chunks, so one chunk is the longest a cheap
request waits behind a long prompt; the default ``prefill_chunk`` is the largest size whose
chunk stays well under 0.3 s here at every context (docs/performance.md). Example:

    .venv/bin/python benchmarks/prefill_chunk.py --chunks 128 256 512 --contexts 0 1024 2048 4096 7168
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


def chunk_ms(backend: TransformersBackend, context: int, chunk: int, repeats: int, rng: np.random.Generator) -> float:
    """The median time of the chunk that runs tokens [context, context + chunk) of a fresh prompt."""
    times = []
    for _ in range(repeats):
        ids = tuple(int(x) for x in rng.integers(100, backend.vocab_size, context + chunk))
        session = backend.begin([Prompt(ids)])
        for _ in range(context // chunk):  # the chunks before the one timed
            session.prefill_step()
        started = time.perf_counter()
        session.prefill_step()
        times.append(time.perf_counter() - started)
        assert not session.prefilling
        session.close()
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory or hub id (default: the default model)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--contexts", type=int, nargs="+", default=[0, 1024, 2048, 4096, 7168],
                        help="prompt tokens before the chunk timed (rounded down to a multiple of the chunk)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clf = Classifier.from_pretrained(args.model) if args.model else Classifier.from_pretrained()
    rng = np.random.default_rng(0)
    print(f"{'chunk':>6} " + " ".join(f"{'ctx ' + str(c):>10}" for c in args.contexts) + "   (ms per chunk, median)")
    for chunk in args.chunks:
        backend = TransformersBackend(clf.model, cache_mb=0, prefill_chunk=chunk)
        chunk_ms(backend, 0, chunk, 1, rng)  # warm-up
        row = [chunk_ms(backend, c // chunk * chunk, chunk, args.repeats, rng) for c in args.contexts]
        print(f"{chunk:>6} " + " ".join(f"{ms:>10.0f}" for ms in row), flush=True)


if __name__ == "__main__":
    main()
