"""``guardprob bench --stream``: an answer judged every few tokens while it is written, against
judging the whole answer once, with and without the engine's prefix cache, in one run.

The answer is made of the data's texts, joined until it has ``answer_tokens`` tokens, and cut
into chunks of ``every`` tokens. Contenders, on a classifier whose cache holds only the
format's header at the start (each on its own cache):

- ``once``: the conversation with the whole answer, scored once;
- ``stream``: the answer fed chunk by chunk (``Classifier.stream``), with the prefix cache;
- ``stream:uncached``: the same on an engine without a cache (every chunk pays the whole prompt).

The scores after each chunk are compared with the uncached ones (a fresh score of that
prefix): ``max_abs_diff``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from guardprob.errors import InputError


def answer_chunks(tokenizer: Any, texts: Sequence[str], answer_tokens: int, every: int) -> list[str]:
    """Texts joined into an answer of ``answer_tokens`` tokens, cut every ``every`` tokens."""
    if answer_tokens < 1 or every < 1:
        raise InputError(f"--stream-tokens {answer_tokens} and --every {every}: use positive numbers of tokens")
    ids: list[int] = []
    for text in _cycle(texts):
        ids += tokenizer.encode(" " + text, add_special_tokens=False)
        if len(ids) >= answer_tokens:
            break
    ids = ids[:answer_tokens]
    return [tokenizer.decode(ids[i : i + every]) for i in range(0, len(ids), every)]


def _cycle(texts: Sequence[str]):
    if not texts:
        raise InputError("the streaming measurement needs some texts to make an answer of")
    while True:
        yield from texts


def bench_streaming(
    build: Callable[[int | None], Any], question: str, chunks: Sequence[str], params: dict | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``build(cache_mb)`` makes a classifier (None: the default cache; 0: none)."""
    say = progress or (lambda _: None)
    params = dict(params or {})
    conversation = [{"role": "user", "content": question}]
    whole = [*conversation, {"role": "assistant", "content": "".join(chunks)}]
    out: dict[str, Any] = {"chunks": len(chunks), "answer_chars": len("".join(chunks))}
    cached, uncached = build(None), build(0)
    for clf in (cached, uncached):  # the header cached and first-call costs paid, as a running service has
        clf.score("warm up", "greedy")
    started = time.perf_counter()
    once = cached.score(whole, **params)
    out["once"] = {"seconds": time.perf_counter() - started, "model_calls": once.model_calls}
    say(f"once: {out['once']['seconds']:.2f} s")
    runs = {}
    for name, clf in (("stream", cached), ("stream:uncached", uncached)):
        started = time.perf_counter()
        runs[name] = [s for s in clf.stream(conversation, chunks, **params)]
        seconds = time.perf_counter() - started
        out[name] = {"seconds": seconds, "model_calls": sum(s.model_calls for s in runs[name] if s is not None)}
        say(f"{name}: {seconds:.2f} s")
    stats = getattr(cached.backend, "cache_stats", None)
    if callable(stats):
        out["cache"] = _fields(stats())
    diffs = [abs(a.categories[k].p - b.categories[k].p)
             for a, b in zip(runs["stream"], runs["stream:uncached"]) if a is not None and b is not None
             for k in a.categories]
    out["max_abs_diff"] = max(diffs, default=0.0)
    out["stream_over_once"] = out["stream"]["seconds"] / out["once"]["seconds"]
    out["uncached_over_once"] = out["stream:uncached"]["seconds"] / out["once"]["seconds"]
    return out


def _fields(value: Any) -> dict:
    from dataclasses import asdict, is_dataclass

    return asdict(value) if is_dataclass(value) else {"value": str(value)}


def print_streaming(report: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console()
    console.print(f"streaming: {report['chunks']} chunks, {report['answer_chars']} characters of answer")
    for name in ("once", "stream", "stream:uncached"):
        r = report[name]
        console.print(f"  {name}: {r['seconds']:.2f} s, {r['model_calls']} model calls")
    console.print(f"  stream/once = {report['stream_over_once']:.2f}x, without the cache "
                  f"{report['uncached_over_once']:.2f}x; max |diff| against fresh uncached scores "
                  f"{report['max_abs_diff']:.2e}")
