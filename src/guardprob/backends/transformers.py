"""The transformers engine: one prefill per prompt, then tree attention over the frontier.

A session holds the prompts of one run as rows of a key/value cache. Each prompt's longest
prefix that earlier prompts left in the engine's prefix cache (backends/prefix_cache.py:
the format's fixed header, the earlier turns of a conversation) is copied into its row and
only the tokens after it run; what two prompts of one batch share beyond it runs once; and
each prompt's keys and values go back into the cache for the prompts that follow. Each round
writes the new node tokens of every row into free slots of that row and runs them in one
forward pass whose 4-D mask lets each token see its row's prompt and its own ancestors
only (docs/design.md, section 5). Slots are plain indices: the rotary position is applied before
a key is stored, so a slot freed by the search (``release``) is reused by the next node,
and a finished prompt's row is dropped from the cache (the last row takes its place).
Prompts may join a session between rounds (``add``, continuous batching): they are
prefilled together at the next call and their rows appended to buffers that keep room for
more; buffers shrink again once they hold far more rows or slots than are in use.

Performance notes (docs/performance.md): keys and values live in preallocated per-layer
buffers written in place (no ``torch.cat`` per round); on CPU, grouped-query attention
runs through SDPA's ``enable_gqa`` instead of copying keys per head; denormal floats are
flushed (they made some CPU calls 10x slower); log-softmax runs once over all queried rows.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import os
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from guardprob.backends.base import NextToken, Prompt, Query, Usage, check_prompts, common_prefix
from guardprob.backends.prefix_cache import CacheStats, Match, PrefixCache
from guardprob.backends.settings import check_cache_mb, check_prefill_chunk

# The prefix cache's budget when none is given: a few thousand tokens of a small model on a
# CPU, and tens of thousands of an 8B model's on an accelerator (docs/engines.md).
DEFAULT_CACHE_MB_CPU = 256
DEFAULT_CACHE_MB_ACCELERATOR = 2048
_SHARE_MIN = 16  # tokens that prompts of one batch must share beyond the cache for a pass of their own
# Prompt tokens per model call of a stepped prefill: other requests' rounds wait at most one
# chunk. Measured with benchmarks/prefill_chunk.py on the default model, 2-core CPU: a chunk of
# 64 takes 0.17 s after no context, 0.24 s after 2,048 tokens and 0.42 s after 6,144, at about
# 10% more prefill time than 128 (docs/performance.md).
DEFAULT_PREFILL_CHUNK = 64
_ROWS_PER_HEAD = 256  # queried rows per lm-head + log-softmax chunk
_KEYS_PER_QUERY = 400  # key/value slots whose copy costs about one query's compute (see _lane_width)


def flush_denormals(device: torch.device) -> None:
    """Denormal activations make some CPU matmuls 5-10x slower; they carry no probability mass."""
    if device.type == "cpu":
        torch.set_flush_denormal(True)


@contextlib.contextmanager
def _gqa_in_sdpa(device: torch.device) -> Iterator[None]:
    """Let transformers' SDPA read grouped keys directly (enable_gqa) on CPU, where that kernel
    takes a mask; on CUDA a mask with enable_gqa falls back to the slow math kernel."""
    if device.type != "cpu":
        yield
        return
    key = "TRANSFORMERS_SDPA_FORCE_GQA"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


class TransformersBackend:
    """Wraps a loaded causal LM (any device, fp32 or bf16, full or sliding-window layers)."""

    name = "transformers"
    tree_calls = True  # a call is one tree-attention pass (see Backend)
    joinable = True  # sessions take prompts between rounds (Session.add)

    def __init__(self, model: Any, cache_mb: float | None = None, share_batch: bool = True,
                 prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK):
        """cache_mb: the prefix cache's budget in megabytes (MiB); 0 turns it off; None: 256 on
        a CPU, 2048 on an accelerator. share_batch: run once what prompts of one batch share
        beyond the cache (False: each runs all its uncached tokens, for measuring that saving).
        prefill_chunk: the most prompt tokens one model call of a stepped prefill runs (None:
        a batch's whole prefill in one step; see ``begin``)."""
        from transformers import DynamicCache

        self._cache_class = DynamicCache
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        flush_denormals(self.device)
        config = model.config.get_text_config()
        self.max_context: int | None = getattr(config, "max_position_embeddings", None)
        layer_types = getattr(config, "layer_types", None) or ()
        self.window: int | None = getattr(config, "sliding_window", None) if "sliding_attention" in layer_types else None
        self.softcap: float | None = getattr(config, "final_logit_softcapping", None)
        self.decoder = model.base_model
        self.head = model.get_output_embeddings()
        self.vocab_size = int(self.head.weight.shape[0])
        params = inspect.signature(self.decoder.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.kv_shape = (config.num_hidden_layers, heads, dim)  # layers, key/value heads, head size
        self.token_bytes = 2 * config.num_hidden_layers * heads * dim * self.dtype.itemsize
        default = DEFAULT_CACHE_MB_CPU if self.device.type == "cpu" else DEFAULT_CACHE_MB_ACCELERATOR
        self.cache_mb = default if cache_mb is None else check_cache_mb(cache_mb)
        self.cache = PrefixCache(int(self.cache_mb * 2**20), self.token_bytes) if self.cache_mb > 0 else None
        self.share_batch = share_batch
        self.prefill_chunk = check_prefill_chunk(prefill_chunk)

    def cache_stats(self) -> CacheStats | None:
        """The prefix cache's counters and size (None: the cache is off)."""
        return None if self.cache is None else self.cache.stats()

    def open(self, prompts: Sequence[Prompt]) -> TransformersSession:
        """A session with every prompt prefilled, in one pass: a caller that never steps has
        nothing to yield to, so the prefill is not cut into chunks (fewer, larger calls)."""
        check_prompts(prompts, self.vocab_size, self.max_context)
        session = TransformersSession(self, prompts, chunk=None)
        session.finish_prefill()
        return session

    def begin(self, prompts: Sequence[Prompt]) -> TransformersSession:
        """A session whose prompts are prefilled in steps (``TransformersSession.prefill_step``),
        at most ``prefill_chunk`` tokens per model call."""
        check_prompts(prompts, self.vocab_size, self.max_context)
        return TransformersSession(self, prompts, chunk=self.prefill_chunk)

    # -- model calls ------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, allowed: np.ndarray, key_pos: np.ndarray, cache: Any) -> torch.Tensor:
        """Hidden states [batch, q, hidden] for ``ids`` [batch, q] appended to ``cache``.

        allowed: [batch, q, k] bool, which cached-or-new key each query may see.
        key_pos: [batch, k] int positions of the keys (for sliding-window layers).
        """
        mask = self._additive(allowed)
        if self.window is not None:
            q_pos = positions.cpu().numpy()[:, :, None]
            near = (q_pos - key_pos[:, None, :]) < self.window
            mask = {"full_attention": mask, "sliding_attention": self._additive(allowed & near)}
        with _gqa_in_sdpa(self.device):
            out = self.decoder(
                input_ids=ids.to(self.device),
                position_ids=positions.to(self.device),
                attention_mask=mask,
                use_cache=True,
                **{self._cache_kwarg: cache},
            )
        return out.last_hidden_state

    def _additive(self, allowed: np.ndarray) -> torch.Tensor:
        allowed_t = torch.from_numpy(allowed).to(self.device)[:, None]
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        return torch.where(allowed_t, zero, torch.finfo(self.dtype).min)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, vocab] float32 logits."""
        logits = self.head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def wrap(self, layers: Sequence[Any]) -> Any:
        """A transformers cache object over our own per-layer buffers."""
        cache = self._cache_class()
        cache.layers = list(layers)
        cache.layer_class_to_replicate = None
        return cache

class _Plan:
    """Where this call's new keys go: input (row, column) -> cache (row, slot); the key width to
    read; and which cache rows the call's inputs are (None: all of them, in order)."""

    def __init__(self, writes: Sequence[tuple[int, int, int, int]], width: int, select: Sequence[int] | None, device: torch.device):
        src, cols, dst, slots = (torch.tensor(x, dtype=torch.long, device=device) for x in zip(*writes))
        self.src, self.cols, self.dst, self.slots, self.width = src, cols, dst, slots, width
        self.select = None if select is None else torch.tensor(select, dtype=torch.long, device=device)


class _SlotLayer:
    """One layer's keys and values in a preallocated [rows, kv_heads, capacity, head_dim] buffer.

    Duck-types transformers' cache layer: ``update`` writes the new keys into their slots in
    place and returns views of the first ``plan.width`` slots (no copy of the whole cache).
    """

    is_sliding = False
    is_compileable = False
    is_initialized = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, plan: list[_Plan]):
        self.keys, self.values, self._plan = keys, values, plan
        self.rows = keys.shape[0]  # rows in use; the buffer may hold more (room for prompts joining)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        p = self._plan[0]
        # advanced indices around a slice: [m, kv_heads, head_dim] on both sides
        self.keys[p.dst, :, p.slots] = key_states[p.src, :, p.cols].to(self.keys.dtype)
        self.values[p.dst, :, p.slots] = value_states[p.src, :, p.cols].to(self.values.dtype)
        keys, values = self.keys[: self.rows, :, : p.width], self.values[: self.rows, :, : p.width]
        if p.select is not None:
            keys, values = keys.index_select(0, p.select), values.index_select(0, p.select)
        return keys, values

    def get_seq_length(self) -> int:
        return self._plan[0].width if self._plan else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length(), 0

    def resize(self, capacity: int, rows: int = 0) -> None:
        """Make room for ``capacity`` slots and ``rows`` rows (growing only: the rows in use are
        copied once into a larger buffer)."""
        have_rows, _, have, _ = self.keys.shape
        if capacity <= have and rows <= have_rows:
            return
        shape = (max(rows, have_rows), self.keys.shape[1], max(capacity, have), self.keys.shape[3])
        keys, values = self.keys.new_zeros(shape), self.values.new_zeros(shape)
        keys[: self.rows, :, :have] = self.keys[: self.rows]
        values[: self.rows, :, :have] = self.values[: self.rows]
        self.keys, self.values = keys, values

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Rows of another buffer after the rows in use (prompts joining the run): only they are
        copied, unless the buffer must grow (then to twice the rows, so that joins stay cheap)."""
        n, k = self.rows, keys.shape[0]
        self.resize(keys.shape[2], n + k if n + k <= self.keys.shape[0] else max(n + k, 2 * self.keys.shape[0]))
        self.keys[n : n + k, :, : keys.shape[2]] = keys
        self.values[n : n + k, :, : values.shape[2]] = values
        self.rows += k

    def remove(self, row: int) -> None:
        """Drop a row in use: the last row moves into its place (one row copied, not all)."""
        last = self.rows - 1
        if row != last:
            self.keys[row] = self.keys[last]
            self.values[row] = self.values[last]
        self.rows -= 1

    def shrink(self, slots: int) -> None:
        """Give memory back when the buffer holds over four times the rows in use or twice the
        slots they fill: a session that runs for long keeps only about what it holds now."""
        have_rows, _, have, _ = self.keys.shape
        if self.rows * 4 > have_rows and slots * 2 > have:
            return
        width = min(have, slots + slots // 4 + 64)
        keys, values = (t.new_zeros((2 * self.rows, t.shape[1], width, t.shape[3])) for t in (self.keys, self.values))
        keys[: self.rows] = self.keys[: self.rows, :, :width]
        values[: self.rows] = self.values[: self.rows, :, :width]
        self.keys, self.values = keys, values


class _Row:
    """One prompt's slots: the prompt fills [0, prompt_len); node tokens take free slots after it."""

    def __init__(self, prompt_len: int):
        self.prompt_len = prompt_len
        self.fill = prompt_len  # slots in use or freed are all below fill
        self.free: list[int] = []
        # path -> (slot of its last token, slots of the whole path from its first token)
        self.nodes: dict[tuple[int, ...], tuple[int, tuple[int, ...]]] = {}

    def take(self) -> int:
        if self.free:
            return self.free.pop()
        self.fill += 1
        return self.fill - 1


class TransformersSession:
    """The cache rows of one run: row b holds prompt b, then its tree tokens as they come.

    Prompts are prefilled in steps (``prefill_step``: at most the engine's ``prefill_chunk``
    tokens per model call), each batch of prompts taken together in rows of its own
    (``_Prefill``) until its last chunk has run; then their rows join the cache and they take
    queries. ``prefilling`` names the prompts not there yet. A query for one of them finishes
    the prefill first, so a caller that never steps sees a session prefilled at once.
    """

    def __init__(self, backend: TransformersBackend, prompts: Sequence[Prompt], chunk: int | None = None):
        self.backend = backend
        self.chunk = chunk  # prompt tokens per prefill call (None: a batch's prefill in one call)
        self.usage = Usage()
        self.rows: dict[int, _Row] = {}  # prompt -> its slots, from its prefill's end until released
        self.prompts = 0  # prompts ever taken (the next one's index)
        self._waiting: list[tuple[int, Prompt]] = []  # added, not yet in a prefill batch
        self._batches: deque[_Prefill] = deque()  # prefills under way, advanced in turn
        self.active: list[int] = []  # cache row i holds prompt active[i]
        self._plan: list[_Plan] = []
        self.layers: list[_SlotLayer] = []
        # prompt -> the distribution after it [vocab], until the prompt is released
        self.root: dict[int, torch.Tensor] = {}
        self._called = False  # a prefill batch's session: its first model call has run
        if prompts:
            self.prompts = len(prompts)
            self._waiting = list(enumerate(prompts))

    def add(self, prompts: Sequence[Prompt]) -> int:
        """Take more prompts between rounds (continuous batching); the index of the first
        (prompts count on). They are prefilled in steps, in one batch with every prompt added
        since the last step, and their rows join the cache after the others'."""
        check_prompts(prompts, self.backend.vocab_size, self.backend.max_context)
        base = self.prompts
        self.prompts += len(prompts)
        self._waiting.extend(enumerate(prompts, base))
        return base

    # -- prefill in steps -------------------------------------------------------------------
    @property
    def prefilling(self) -> frozenset[int]:
        """The prompts whose prefill has not finished (they take no queries yet)."""
        staged = (i for b in self._batches for k, i in enumerate(b.index) if k not in b.dropped)
        return frozenset(itertools.chain((i for i, _ in self._waiting), staged))

    def prefill_step(self) -> None:
        """One chunk of the prefill under way: one model call of at most ``prefill_chunk`` prompt
        tokens (the whole batch where that is None). Batches take turns, one call each, so a
        short prompt that joins is not held behind a long one's every chunk."""
        self._stage()
        if not self._batches:
            return
        batch = self._batches[0]
        self._batches.rotate(-1)
        self._advance(batch, whole=self.chunk is None)

    def finish_prefill(self) -> None:
        """Run every prefill under way to its end."""
        self._stage()
        while self._batches:
            self._advance(self._batches[0], whole=True)

    def _stage(self) -> None:
        """The prompts added since the last step become a prefill batch of their own."""
        waiting, self._waiting = self._waiting, []
        if waiting:
            self._batches.append(_Prefill(self.backend, waiting, self.chunk))

    @torch.inference_mode()
    def _advance(self, batch: _Prefill, whole: bool) -> None:
        calls, tokens = batch.session.usage.model_calls, batch.session.usage.prompt_tokens
        root = batch.run(whole)
        self.usage.model_calls += batch.session.usage.model_calls - calls
        self.usage.prompt_tokens += batch.session.usage.prompt_tokens - tokens
        if root is not None:
            self._batches.remove(batch)
            self._join(batch, root)

    def _join(self, batch: _Prefill, root: torch.Tensor) -> None:
        """A finished prefill's rows after the cache's (its dropped prompts' left out)."""
        keep = [k for k in range(len(batch.index)) if k not in batch.dropped]
        if not keep:
            return
        new = batch.session.layers
        if len(keep) == len(batch.index):
            parts = [(layer.keys[: layer.rows], layer.values[: layer.rows]) for layer in new]
        else:
            index = torch.tensor(keep, device=self.backend.device)
            parts = [(layer.keys.index_select(0, index), layer.values.index_select(0, index)) for layer in new]
        if self.layers:
            for layer, (keys, values) in zip(self.layers, parts):
                layer.append(keys, values)
        else:
            self.layers = [_SlotLayer(keys, values, self._plan) for keys, values in parts]
        for k in keep:
            prompt = batch.index[k]
            self.rows[prompt] = _Row(len(batch.seqs[k]))
            self.root[prompt] = root[k]
            self.active.append(prompt)

    # -- storage --------------------------------------------------------------------------
    def _allocate(self, rows: int, capacity: int) -> None:
        layers, heads, dim = self.backend.kv_shape
        shape = (rows, heads, capacity, dim)
        self.layers = [
            _SlotLayer(torch.zeros(shape, dtype=self.backend.dtype, device=self.backend.device),
                       torch.zeros(shape, dtype=self.backend.dtype, device=self.backend.device), self._plan)
            for _ in range(layers)
        ]

    def _ensure(self, capacity: int) -> None:
        have = self.layers[0].keys.shape[2]
        if capacity > have:
            for layer in self.layers:
                layer.resize(max(capacity, have + have // 2))

    def _run(
        self, ids: np.ndarray, pos: np.ndarray, allowed: np.ndarray, key_pos: np.ndarray,
        writes: list[tuple[int, int, int, int]], select: Sequence[int] | None = None,
    ) -> torch.Tensor:
        self._plan[:] = [_Plan(writes, allowed.shape[2], select, self.backend.device)]
        try:
            cache = self.backend.wrap(self.layers)
            return self.backend.forward(torch.from_numpy(ids), torch.from_numpy(np.maximum(pos, 0)), allowed, key_pos, cache)
        finally:
            self._plan.clear()

    def _key_pos(self, width: int) -> np.ndarray:
        """[rows, width] the position of the token in each slot (-1: free or unused)."""
        out = np.full((len(self.active), width), -1)
        for i, p in enumerate(self.active):
            row = self.rows[p]
            out[i, : row.prompt_len] = np.arange(row.prompt_len)
            for path, (slot, _) in row.nodes.items():
                out[i, slot] = row.prompt_len + len(path) - 1
        return out

    def _entry(self, row: int, start: int, end: int) -> torch.Tensor:
        """Row ``row``'s keys and values of slots [start, end) as a prefix-cache entry (a copy)."""
        return torch.stack([torch.stack((layer.keys[row, :, start:end], layer.values[row, :, start:end]))
                            for layer in self.layers])

    # -- prefill --------------------------------------------------------------------------
    def _prefill(self, seqs: list[tuple[int, ...]], dropped: set[int]) -> Iterator[None]:
        """Every prompt's row filled, cached prefixes copied and the rest run; returns the root
        distributions [rows, vocab]. The prompts' keys and values then go into the cache (but
        those of ``dropped``: positions whose prompts were released meanwhile). A generator that
        pauses before each model call but the first (a chunk per step).

        What prompts of this batch share beyond the cache runs once into a scratch tree of the
        batch's own, which the budget does not count (a prefix the cache could not hold would
        otherwise run once for nothing), and which works with the cache off too."""
        cache = self.backend.cache
        trees = (cache, PrefixCache(None, self.backend.token_bytes))
        limits = [len(s) - 1 for s in seqs]  # the last token always runs: its hidden state gives the root
        found = [cache.match(s, n) if cache is not None else 0 for s, n in zip(seqs, limits)]
        before = self.usage.prompt_tokens
        if self.backend.share_batch:
            yield from self._share(trees, seqs)
        root = yield from self._fill(seqs, [_longest(trees, s, n) for s, n in zip(seqs, limits)], logits=True)
        if cache is not None:
            for b, ids in enumerate(seqs):
                if b not in dropped:
                    cache.insert(ids, functools.partial(self._entry, b))
            total = sum(len(s) for s in seqs)
            cache.record(len(seqs), sum(n > 0 for n in found), total, max(total - (self.usage.prompt_tokens - before), 0))
        return root

    def _share(self, trees: tuple[PrefixCache | None, PrefixCache], seqs: Sequence[tuple[int, ...]]) -> Iterator[None]:
        """Run once each prefix that prompts of this batch share beyond what ``trees`` hold (the
        prefixes' own shared parts first), into the scratch tree ``trees[1]``."""
        shared = _shared_prefixes(seqs, trees)
        if not shared:
            return
        yield from self._share(trees, shared)
        yield from self._fill(shared, [_longest(trees, s, len(s) - 1) for s in shared], logits=False)
        for b, ids in enumerate(shared):
            trees[1].insert(ids, functools.partial(self._entry, b))
        self.layers = []

    def _fill(self, seqs: Sequence[tuple[int, ...]], matches: Sequence[Match], logits: bool) -> Iterator[None]:
        """Fresh rows for ``seqs``: each match's keys copied in, the tokens after it run, at most
        ``prefill_chunk`` of them per call. Returns the distribution after each sequence
        [rows, vocab] if ``logits``.

        Rows whose new tokens are of similar length run together: a batch padded to its
        longest tail wasted about a quarter of the prefill on the content-moderation prompts.
        """
        self._allocate(len(seqs), max(len(s) for s in seqs) + (64 if logits else 0))
        self._copy_cached(seqs, matches)
        starts = [m.tokens for m in matches]
        lasts: list[torch.Tensor | None] = [None] * len(seqs)
        everyone = list(range(len(seqs)))
        for group in _chunks([len(s) - a for s, a in zip(seqs, starts)]):
            for call in _pieces(group, starts, [len(s) for s in seqs], self.chunk):
                rows = [b for b, _, _ in call]
                hidden = yield from self._prefill_rows([seqs[b][:end] for b, _, end in call], [a for _, a, _ in call],
                                                       rows, None if rows == everyone else rows)
                for (b, _, end), h in zip(call, hidden):
                    if end == len(seqs[b]):
                        lasts[b] = h
        return self.backend.logits(torch.stack(lasts)) if logits else None  # type: ignore[arg-type]

    def _copy_cached(self, seqs: Sequence[tuple[int, ...]], matches: Sequence[Match]) -> None:
        """Each match's keys and values into its row's first slots, once per distinct prefix."""
        rows: dict[tuple[int, ...], list[int]] = {}
        for b, (ids, m) in enumerate(zip(seqs, matches)):
            if m.tokens:
                rows.setdefault(tuple(ids[: m.tokens]), []).append(b)
        for prefix, group in rows.items():
            kv = matches[group[0]].kv()
            index = torch.tensor(group, device=self.backend.device)
            for i, layer in enumerate(self.layers):
                layer.keys[index, :, : len(prefix)] = kv[i, 0]
                layer.values[index, :, : len(prefix)] = kv[i, 1]

    def _prefill_rows(self, seqs: list[tuple[int, ...]], starts: list[int], rows: list[int], select: list[int] | None) -> Iterator[None]:
        """One call over ``seqs[b][starts[b]:]`` into cache rows ``rows`` (the keys before
        ``starts[b]`` are there already); returns the hidden state of each sequence's last token
        [len(seqs), hidden]. Pauses first unless it is the prefill's first call."""
        if self._called:
            yield
        self._called = True
        tails = [s[a:] for s, a in zip(seqs, starts)]
        width = max(len(t) for t in tails)
        ids, pos = _pad(tails, width), np.full((len(tails), width), -1)
        key_pos = np.full((len(seqs), max(len(s) for s in seqs)), -1)
        writes = []
        for b, (seq, start) in enumerate(zip(seqs, starts)):
            pos[b, : len(seq) - start] = np.arange(start, len(seq))
            key_pos[b, : len(seq)] = np.arange(len(seq))
            writes += [(b, j, rows[b], start + j) for j in range(len(seq) - start)]
        allowed = (key_pos[:, None, :] >= 0) & (key_pos[:, None, :] <= pos[:, :, None])
        allowed[:, :, 0] |= pos < 0  # padding queries see one key, so no row of the mask is empty
        hidden = self._run(ids.numpy(), pos, allowed, key_pos, writes, select)
        self.usage.model_calls += 1
        self.usage.prompt_tokens += len(writes)
        last = torch.tensor([len(t) - 1 for t in tails], device=hidden.device)
        return hidden[torch.arange(len(tails), device=hidden.device), last]

    # -- rounds ---------------------------------------------------------------------------
    @torch.inference_mode()
    def next_tokens(self, queries: Sequence[Query]) -> list[NextToken]:
        if (self._waiting or self._batches) and not self.prefilling.isdisjoint(q.prompt for q in queries):
            self.finish_prefill()  # a caller that does not step the prefill: all of it now
        where = {p: i for i, p in enumerate(self.active)}
        new: list[list[tuple[int, ...]]] = [[] for _ in self.active]
        seen: set[tuple[int, tuple[int, ...]]] = set()
        for q in queries:
            if q.prompt not in where:
                raise ValueError(f"prompt {q.prompt} was released; it takes no more queries")
            nodes = self.rows[q.prompt].nodes
            for depth in range(1, len(q.path) + 1):
                prefix = q.path[:depth]
                # the queried token itself is always run (its hidden state is not kept between calls)
                if (q.prompt, prefix) not in seen and (prefix not in nodes or depth == len(q.path)):
                    seen.add((q.prompt, prefix))
                    new[where[q.prompt]].append(prefix)
        hidden, column = self._tree_pass(new) if any(new) else (None, {})
        answers: list[NextToken] = []
        # in chunks of rows: a batch round can query thousands of nodes, and full-vocabulary
        # float64 logits for all of them at once took gigabytes
        for start in range(0, len(queries), _ROWS_PER_HEAD):
            chunk = queries[start : start + _ROWS_PER_HEAD]
            roots = [i for i, q in enumerate(chunk) if not q.path]
            nodes = [i for i, q in enumerate(chunk) if q.path]
            logits = torch.empty((len(chunk), self.backend.vocab_size), device=self.backend.device)  # a row per query
            if roots:
                logits[roots] = torch.stack([self.root[chunk[i].prompt] for i in roots])
            if nodes:
                lanes, cols = zip(*(column[(chunk[i].prompt, chunk[i].path)] for i in nodes))
                logits[nodes] = self.backend.logits(hidden[list(lanes), list(cols)])
            answers += _answers(logits, [q.candidates for q in chunk])
        return answers

    def _tree_pass(self, new: list[list[tuple[int, ...]]]) -> tuple[torch.Tensor, dict]:
        """One forward over the round's new tokens. Each cache row's tokens are laid out in
        lanes of ``width`` (see ``_lane_width``); a lane reads its cache row's keys."""
        counts = [len(n) for n in new]
        keys = max(self.rows[p].fill for p in self.active) + max(counts)  # about the slots in use after this round
        width = _lane_width(counts, keys)
        whole = width == max(counts)  # one lane per cache row, in order: the lanes read the cache as it is
        lanes: list[int] = []  # the cache row of each lane; else busy rows only, each lane reading a copy
        first: list[int] = []  # each row's first lane
        for i, n in enumerate(counts):
            first.append(len(lanes))
            lanes += [i] * (1 if whole else -(-n // width))
        ids = np.zeros((len(lanes), width), dtype=np.int64)
        pos = np.full((len(lanes), width), -1)
        writes: list[tuple[int, int, int, int]] = []
        chains: list[list[tuple[int, ...]]] = [[] for _ in lanes]
        column: dict[tuple[int, tuple[int, ...]], tuple[int, int]] = {}
        for i, prefixes in enumerate(new):
            prompt = self.active[i]
            row = self.rows[prompt]
            for n, prefix in enumerate(prefixes):
                v, j = first[i] + n // width, n % width
                slot = row.take()
                parent = row.nodes[prefix[:-1]][1] if len(prefix) > 1 else ()
                chain = parent + (slot,)
                row.nodes[prefix] = (slot, chain)
                ids[v, j] = prefix[-1]
                pos[v, j] = row.prompt_len + len(prefix) - 1
                writes.append((v, j, i, slot))
                chains[v].append(chain)
                column[(prompt, prefix)] = (v, j)
        k = max(self.rows[p].fill for p in self.active)
        self._ensure(k)
        allowed = np.zeros((len(lanes), width, k), dtype=bool)
        index_b, index_q, index_k = [], [], []
        for v, lane_chains in enumerate(chains):
            allowed[v, :, : self.rows[self.active[lanes[v]]].prompt_len] = True
            for j, chain in enumerate(lane_chains):
                index_b += [v] * len(chain)
                index_q += [j] * len(chain)
                index_k += chain
            allowed[v, len(lane_chains):, 1:] = False  # padding queries see slot 0 only
        allowed[index_b, index_q, index_k] = True
        key_pos = self._key_pos(k)[lanes] if self.backend.window is not None else np.zeros((len(lanes), k), dtype=np.int64)
        select = None if lanes == list(range(len(self.active))) else lanes
        hidden = self._run(ids, pos, allowed, key_pos, writes, select)
        self.usage.model_calls += 1
        self.usage.tokens += len(writes)
        return hidden, column

    # -- memory ---------------------------------------------------------------------------
    @torch.inference_mode()  # the buffers are inference tensors, updated in place
    def release(self, prompt: int, path: tuple[int, ...] = (), keep: int = 0) -> None:
        """The search needs no more of these keys: with ``path`` empty the whole prompt is done
        (its row leaves the cache); else the slots of ``path[:d]`` for d > keep are freed."""
        if not path:
            self._drop(prompt)
        row = self.rows.get(prompt)
        if row is None:  # released already, or never prefilled
            return
        if path:
            for depth in range(len(path), keep, -1):
                entry = row.nodes.pop(path[:depth], None)
                if entry is not None:
                    row.free.append(entry[0])
            return
        if prompt not in self.active:
            return
        row = self.active.index(prompt)
        self.active[row] = self.active[-1]  # the last row moves into its place (_SlotLayer.remove)
        self.active.pop()
        del self.rows[prompt]
        self.root.pop(prompt, None)
        if self.active:
            fill = max(self.rows[p].fill for p in self.active)
            for layer in self.layers:
                layer.remove(row)
                layer.shrink(fill)
        else:
            self.layers = []

    def _drop(self, prompt: int) -> None:
        """A prompt released before its prefill finished: out of the waiting list, or marked in
        its batch (which stops at once when none of its prompts is left)."""
        self._waiting = [(i, p) for i, p in self._waiting if i != prompt]
        for batch in list(self._batches):
            if prompt in batch.index:
                batch.dropped.add(batch.index.index(prompt))
                if len(batch.dropped) == len(batch.index):
                    self._batches.remove(batch)
                    batch.close()

    def close(self) -> None:
        self.layers = []
        self.active = []
        self.root = {}
        self._waiting = []
        for batch in self._batches:
            batch.close()
        self._batches.clear()


class _Prefill:
    """Prompts prefilled together, in rows of a session of their own, a model call per ``run``.
    ``dropped``: positions whose prompts were released meanwhile (their keys are kept neither
    in the prefix cache nor in the session they were added to)."""

    def __init__(self, backend: TransformersBackend, waiting: Sequence[tuple[int, Prompt]], chunk: int | None):
        self.index = [i for i, _ in waiting]
        self.seqs = [p.ids for _, p in waiting]
        self.dropped: set[int] = set()
        self.session = TransformersSession(backend, (), chunk)
        self._steps = self.session._prefill(self.seqs, self.dropped)

    def run(self, whole: bool) -> torch.Tensor | None:
        """The next model call (every one left if ``whole``); the root distributions [rows, vocab]
        once the last has run, else None."""
        try:
            next(self._steps)
            while whole:
                next(self._steps)
        except StopIteration as end:
            return end.value
        return None

    def close(self) -> None:
        self._steps.close()
        self.session.layers = []


def _longest(trees: Sequence[PrefixCache | None], ids: tuple[int, ...], limit: int) -> Match:
    """The longest match of ``ids`` (at most ``limit`` tokens) in any of the trees."""
    return max((t.lookup(ids, limit) for t in trees if t is not None), key=lambda m: m.tokens)


def _shared_prefixes(seqs: Sequence[tuple[int, ...]], trees: Sequence[PrefixCache | None]) -> list[tuple[int, ...]]:
    """Prefixes that two or more of ``seqs`` share, at least ``_SHARE_MIN`` tokens past what
    the trees hold, none a prefix of another (each leaves its sequences a token of their own).
    Neighbours in sorted order share the most, so only they are compared."""
    order = sorted(seqs)
    found: set[tuple[int, ...]] = set()
    for a, b in zip(order, order[1:]):
        n = common_prefix(a, b, min(len(a), len(b)) - 1)
        if n >= _SHARE_MIN and n - max(t.match(a, n) for t in trees if t is not None) >= _SHARE_MIN:
            found.add(tuple(a[:n]))
    return sorted(s for s in found if not any(len(t) > len(s) and t[: len(s)] == s for t in found))


def _chunks(lengths: Sequence[int], waste: float = 0.1) -> list[list[int]]:
    """Rows grouped by length so that padding to each group's longest wastes at most ``waste``
    of its tokens (one group when that already holds: every call streams all the weights)."""
    if 1 - sum(lengths) / (max(lengths) * len(lengths)) <= waste:
        return [list(range(len(lengths)))]
    order = sorted(range(len(lengths)), key=lambda b: lengths[b])
    groups: list[list[int]] = []
    for b in order:
        group = groups[-1] if groups else None
        if group is not None:
            total = sum(lengths[g] for g in group) + lengths[b]
            if 1 - total / (lengths[b] * (len(group) + 1)) <= waste:
                group.append(b)
                continue
        groups.append([b])
    return groups


def _pieces(group: Sequence[int], starts: Sequence[int], ends: Sequence[int], chunk: int | None) -> Iterator[list[tuple[int, int, int]]]:
    """The calls that run rows ``group`` from ``starts[b]`` to ``ends[b]``: each a list of
    (row, start, end) with at most ``chunk`` tokens in all (None: one call for everything).
    Up to ``chunk`` rows share a call, each taking an equal part of it."""
    at = {b: starts[b] for b in group}
    while left := [b for b in group if at[b] < ends[b]]:
        part = left if chunk is None else left[:chunk]
        width = None if chunk is None else chunk // len(part)
        call = [(b, at[b], ends[b] if width is None else min(ends[b], at[b] + width)) for b in part]
        for b, _, end in call:
            at[b] = end
        yield call


def _lane_width(counts: Sequence[int], keys: int) -> int:
    """Queries per lane for a round where cache row i has ``counts[i]`` new tokens.

    One lane per row, as wide as the busiest row, pads every other row to that width: in
    a batch the rows' frontiers differ widely (a third of the computed tokens were padding
    at 16 rows, eps 1e-3). Narrower lanes split a busy row over several lanes, skip rows
    with nothing new, and cost a copy of ``keys`` key/value slots per lane (46 KB per slot
    on the default model; ``_KEYS_PER_QUERY`` slots are taken to cost about one query's
    compute). Picks the cheapest width in padded queries.
    """
    widest = max(counts)

    def cost(width: int) -> float:
        if width == widest:
            return len(counts) * widest
        lanes = sum(-(-n // width) for n in counts)
        return lanes * (width + keys / _KEYS_PER_QUERY)

    return min(sorted({n for n in counts if n}), key=cost)


def _pad(seqs: Sequence[tuple[int, ...]], width: int) -> torch.Tensor:
    out = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        out[b, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def _answers(logits: torch.Tensor, candidates: Sequence[np.ndarray]) -> list[NextToken]:
    """[m, vocab] float32 logits -> one NextToken per row, for that row's candidates.

    One log-softmax over all rows (in float64, like the per-node baseline), one gather for
    every query's candidates, one copy to the host.
    """
    if not candidates:
        return []
    vocab = logits.shape[1]
    wide = logits.double()
    norm = torch.logsumexp(wide, dim=-1)
    top = (wide.max(dim=-1).values - norm).cpu().numpy()
    lengths = [len(c) for c in candidates]
    flat = np.concatenate([np.asarray(c, dtype=np.int64) + r * vocab for r, c in enumerate(candidates)])
    picked = wide.reshape(-1)[torch.from_numpy(flat).to(logits.device)]
    rows = torch.repeat_interleave(torch.arange(len(candidates), device=logits.device), torch.tensor(lengths, device=logits.device))
    lp, raw = (picked - norm[rows]).cpu().numpy(), picked.cpu().numpy()
    out, at = [], 0
    for r, n in enumerate(lengths):
        out.append(NextToken(lp[at : at + n], float(top[r]), logits=raw[at : at + n]))
        at += n
    return out


def _answer(logits: torch.Tensor, candidates: np.ndarray) -> NextToken:
    """[vocab] float32 logits -> the candidates' log-probabilities (and logits)."""
    return _answers(logits[None], [candidates])[0]
