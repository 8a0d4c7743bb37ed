"""The llama.cpp engine (llama-cpp-python's low-level API): GGUF models on CPU or GPU.

A session prefills each prompt once into its own sequence of a unified key/value cache.
A frontier node is a sequence that shares its nearest cached ancestor's cells
(``llama_memory_seq_cp`` adds a sequence id to cells, it copies no tensors), so each node
runs only its own new tokens, and all nodes of a round go through one ``llama_decode``
call that returns logits only at each node's last token. Node sequences are recycled
least-recently-used; a node whose ancestor was evicted re-runs the missing tokens.
Flash attention is off and the schedule is fixed, so equal inputs give equal outputs.
"""

from __future__ import annotations

import ctypes
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from guardprob.backends.base import NextToken, Prompt, Query, Usage, check_prompts, common_prefix
from guardprob.backends.settings import check_prefill_chunk
from guardprob.errors import BackendError, InputError, ModelLoadError
from guardprob.options.table import LLAMACPP, settings_class

_KEEP_LOGS = os.environ.get("GUARDPROB_LLAMA_LOG") == "1"
_log_callback = None  # keeps the ctypes callback alive


def _quiet(llama_cpp) -> None:
    """Silence llama.cpp's stderr chatter (set GUARDPROB_LLAMA_LOG=1 to keep it)."""
    global _log_callback
    if _KEEP_LOGS or _log_callback is not None:
        return
    _log_callback = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


# Fields, defaults and checks: guardprob.options.table (group llamacpp).
_LlamaCppSettings = settings_class("_LlamaCppSettings", (LLAMACPP,), __name__, "The llamacpp engine's options of the table.")


@dataclass(frozen=True)
class LlamaCppOptions(_LlamaCppSettings):
    """n_ctx: key/value cells per session (0: sized from the prompts). n_threads: CPU threads
    (0: all cores). n_gpu_layers: layers offloaded to a GPU build (0: CPU only; -1: all)."""


class LlamaCppBackend:
    name = "llamacpp"

    def __init__(self, path: str | Path, options: LlamaCppOptions = LlamaCppOptions(), prefill_chunk: int | None = None):
        """prefill_chunk: the most prompt tokens one decode of a stepped prefill runs (None, or
        more than n_batch: n_batch)."""
        try:
            import llama_cpp
        except ImportError:
            raise ModelLoadError("the llamacpp backend needs llama-cpp-python: pip install 'guardprob[llamacpp]'") from None
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist; pass --model FILE.gguf")
        self.lib = llama_cpp
        self.options = options
        self.prefill_chunk = min(max(options.n_batch, 1), check_prefill_chunk(prefill_chunk) or options.n_batch)
        _quiet(llama_cpp)
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = options.n_gpu_layers
        # Extra buffer types (AMX, weight repacking) can trap on CPUs that advertise AMX without
        # the OS enabling it, and change kernels between machines; the plain layout is portable.
        params.use_extra_bufts = options.extra_buffers
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise ModelLoadError(f"llama.cpp could not load {path}; is it a GGUF model file?")
        self.path = path
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.vocab = vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.max_context: int | None = llama_cpp.llama_model_n_ctx_train(self.model) or None
        self.eos_ids = tuple(i for i in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i))
        self._ctx = None
        self._ctx_cells = 0
        self._ctx_seqs = 0

    def open(self, prompts: Sequence[Prompt]) -> LlamaCppSession:
        """A session with every prompt prefilled."""
        session = self.begin(prompts)
        session.finish_prefill()
        return session

    def begin(self, prompts: Sequence[Prompt]) -> LlamaCppSession:
        """A session whose prompts are prefilled in steps of ``prefill_chunk`` tokens (one decode
        each, ``LlamaCppSession.prefill_step``)."""
        return LlamaCppSession(self, prompts)

    def context(self, cells: int, seqs: int):
        """A context with at least ``cells`` cache cells and ``seqs`` sequences, reused across sessions."""
        if self._ctx is not None and self._ctx_cells >= cells and self._ctx_seqs >= seqs:
            self.lib.llama_memory_clear(self.lib.llama_get_memory(self._ctx), True)
            return self._ctx
        self._free_context()
        lib, o = self.lib, self.options
        p = lib.llama_context_default_params()
        p.n_ctx = cells
        # llama.cpp reserves an output per sequence in one batch (GGML_ASSERT n_outputs_max, an
        # abort of the whole process below that): the context's batch holds at least one token
        # per sequence; the session's own batches keep to n_batch
        p.n_batch = p.n_ubatch = max(o.n_batch, seqs)
        p.n_seq_max = seqs
        p.kv_unified = True  # one cell pool, so sequences can share the prompt's cells
        p.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        p.n_threads = p.n_threads_batch = o.n_threads or _cores()
        p.no_perf = True
        ctx = lib.llama_init_from_model(self.model, p)
        if not ctx:
            raise BackendError(f"llama.cpp could not create a context of {cells} cells for {self.path}; lower the batch size")
        self._ctx, self._ctx_cells, self._ctx_seqs = ctx, cells, seqs
        return ctx

    def _free_context(self) -> None:
        if self._ctx is not None:
            self.lib.llama_free(self._ctx)
            self._ctx = None

    def close(self) -> None:
        self._free_context()
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass


class _Batch:
    """A reusable llama_batch: one sequence per token."""

    def __init__(self, lib, size: int):
        self.lib, self.size = lib, size
        self.raw = lib.llama_batch_init(size, 0, 1)

    def fill(self, tokens: list[int], positions: list[int], seqs: list[int], outputs: list[bool]) -> None:
        b = self.raw
        for i, (t, p, s, o) in enumerate(zip(tokens, positions, seqs, outputs)):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, p, 1, o
            b.seq_id[i][0] = s
        b.n_tokens = len(tokens)

    def free(self) -> None:
        if self.raw is not None:
            self.lib.llama_batch_free(self.raw)
            self.raw = None


class LlamaCppSession:
    """Prompt b lives in sequence b; nodes get the sequences above, recycled LRU.

    Prompts are prefilled in order, one decode of at most ``prefill_chunk`` tokens per
    ``prefill_step``; ``prefilling`` names those not done. A query for one of them finishes the
    prefill first. ``release(prompt)`` drops a prompt (its cells, its nodes' sequences, what
    is left of its prefill).
    """

    def __init__(self, backend: LlamaCppBackend, prompts: Sequence[Prompt]):
        check_prompts(prompts, backend.n_vocab, backend.max_context)
        self.backend = backend
        self.lib = backend.lib
        self.usage = Usage()
        self.prompts = [p.ids for p in prompts]
        limit = self.lib.llama_max_parallel_sequences()
        if len(prompts) >= limit:
            raise InputError(f"{len(prompts)} prompts in one session; llama.cpp holds at most {limit - 1}, lower the batch size")
        n_seqs = min(limit, len(prompts) + backend.options.max_sequences)
        cells = backend.options.n_ctx or _round_up(sum(len(p) for p in self.prompts) + 32 * n_seqs + 256, 256)
        self.ctx = backend.context(cells, n_seqs)
        self.mem = self.lib.llama_get_memory(self.ctx)
        self.batch = _Batch(self.lib, max(backend.options.n_batch, 1))
        self.free = list(range(n_seqs - 1, len(prompts) - 1, -1))  # node sequence ids, popped from the end
        self.cached: OrderedDict[tuple[int, tuple[int, ...]], int] = OrderedDict()  # (prompt, path) -> seq, LRU
        self.root: list[np.ndarray | None] = [None] * len(prompts)
        self._shared = [p.shared_prefix for p in prompts]
        self._next: dict[int, int] = {}  # prompt -> its next token to run, while its prefill runs
        self._order = list(range(len(prompts)))  # prompts whose prefill has not finished, in order
        self._gone: set[int] = set()  # prompts released

    # -- prompts ----------------------------------------------------------------------
    @property
    def prefilling(self) -> frozenset[int]:
        """The prompts whose prefill has not finished (they take no queries yet)."""
        return frozenset(self._order)

    def prefill_step(self) -> None:
        """One decode of the first unfinished prompt's prefill (at most ``prefill_chunk`` tokens)."""
        if not self._order:
            return
        b = self._order[0]
        ids = self.prompts[b]
        if b not in self._next:
            self._next[b] = self._start(b, ids)
        at = self._next[b]
        chunk = ids[at : at + min(self.batch.size, self.backend.prefill_chunk)]
        last = at + len(chunk) == len(ids)
        self.batch.fill(list(chunk), list(range(at, at + len(chunk))), [b] * len(chunk), [False] * (len(chunk) - 1) + [last])
        self._decode()
        self.usage.prompt_tokens += len(chunk)
        self._next[b] = at + len(chunk)
        if last:
            self.root[b] = self._logits(len(chunk) - 1)
            del self._next[b]
            self._order.pop(0)

    def finish_prefill(self) -> None:
        while self._order:
            self.prefill_step()

    def _start(self, b: int, ids: tuple[int, ...]) -> int:
        """Copy into sequence b the longest common prefix of an earlier prompt still held (up to
        the shared prefix); the first token left to run."""
        start, source = 0, None
        for a in range(b):
            if a in self._gone:
                continue
            same = common_prefix(self.prompts[a], ids, min(self._shared[b], len(ids) - 1))
            if same > start:
                start, source = same, a
        if source is not None:
            self.lib.llama_memory_seq_cp(self.mem, source, b, 0, start)
        return start

    def release(self, prompt: int, path: tuple[int, ...] = (), keep: int = 0) -> None:
        """The search needs no more of prompt ``prompt`` (with ``path`` empty; node paths are
        left to the LRU): its cells, its nodes' sequences and any prefill left go."""
        if path or prompt in self._gone or not 0 <= prompt < len(self.prompts):
            return
        self._gone.add(prompt)
        if prompt in self._order:
            self._order.remove(prompt)
        self._next.pop(prompt, None)
        self.root[prompt] = None
        self.lib.llama_memory_seq_rm(self.mem, prompt, -1, -1)
        for key in [k for k in self.cached if k[0] == prompt]:
            seq = self.cached.pop(key)
            self.lib.llama_memory_seq_rm(self.mem, seq, -1, -1)
            self.free.append(seq)

    # -- rounds -----------------------------------------------------------------------
    def next_tokens(self, queries: Sequence[Query]) -> list[NextToken]:
        answers: list[NextToken | None] = [None] * len(queries)
        pending = []
        if not self.prefilling.isdisjoint(q.prompt for q in queries):
            self.finish_prefill()  # a caller that does not step the prefill: all of it now
        for i, q in enumerate(queries):
            if not 0 <= q.prompt < len(self.prompts):
                raise InputError(f"query for prompt {q.prompt}, but the session holds {len(self.prompts)}")
            if q.prompt in self._gone:
                raise InputError(f"prompt {q.prompt} was released; it takes no more queries")
            if self.backend.max_context and len(self.prompts[q.prompt]) + len(q.path) > self.backend.max_context:
                raise InputError(f"prompt + path of {len(self.prompts[q.prompt]) + len(q.path)} tokens is past the model's context")
            if q.path:
                pending.append(i)
            else:
                answers[i] = _answer(self.root[q.prompt], q.candidates)
        while pending:
            pending = self._round(queries, pending, answers)
        return answers  # type: ignore[return-value]

    def _round(self, queries: Sequence[Query], pending: list[int], answers: list) -> list[int]:
        """One llama_decode for as many pending queries as sequences and the batch allow; the rest."""
        tokens: list[int] = []
        positions: list[int] = []
        seqs: list[int] = []
        outputs: list[bool] = []
        owners: list[tuple[int, int]] = []  # (query, batch index of its last token)
        # paths written by this decode: cached only once it has run, so that no query of the
        # same batch copies a sequence whose last tokens are still in the batch
        written: dict[tuple[int, tuple[int, ...]], int] = {}
        in_use: set[int] = set()
        done = 0
        for i in pending:
            q = queries[i]
            depth, source = self._nearest(q.prompt, q.path)
            if len(tokens) + len(q.path) - depth > self.batch.size and tokens:
                break
            seq = self._allocate(in_use | {source})
            if seq is None and not tokens and source != q.prompt:
                # the cached ancestor holds the only free sequence: run the path from the prompt in it
                depth, source = 0, q.prompt
                seq = self._allocate(in_use | {source})
            new = q.path[depth:]
            if seq is None:
                if not tokens:
                    raise BackendError("llama.cpp has no free sequence for a node; raise max_sequences")
                break
            in_use.add(seq)
            self.lib.llama_memory_seq_cp(self.mem, source, seq, -1, -1)
            base = len(self.prompts[q.prompt]) + depth
            tokens += new
            positions += range(base, base + len(new))
            seqs += [seq] * len(new)
            outputs += [False] * (len(new) - 1) + [True]
            owners.append((i, len(tokens) - 1))
            written[(q.prompt, q.path)] = seq
            done += 1
        if len(tokens) > self.batch.size:
            raise InputError(f"a path of {len(tokens)} new tokens is longer than the batch ({self.batch.size}); raise n_batch")
        self.batch.fill(tokens, positions, seqs, outputs)
        self._decode()
        self.cached.update(written)
        self.usage.tokens += len(tokens)
        for i, index in owners:
            answers[i] = _answer(self._logits(index), queries[i].candidates)
        return pending[done:]

    def _nearest(self, prompt: int, path: tuple[int, ...]) -> tuple[int, int]:
        """The longest proper prefix of ``path`` still cached: (its length, its sequence)."""
        for depth in range(len(path) - 1, 0, -1):
            seq = self.cached.get((prompt, path[:depth]))
            if seq is not None:
                self.cached.move_to_end((prompt, path[:depth]))
                return depth, seq
        return 0, prompt

    def _allocate(self, keep: set[int]) -> int | None:
        if self.free:
            return self.free.pop()
        for key, seq in self.cached.items():  # least recently used first
            if seq not in keep:
                del self.cached[key]
                self.lib.llama_memory_seq_rm(self.mem, seq, -1, -1)
                return seq
        return None

    def _decode(self) -> None:
        rc = self.lib.llama_decode(self.ctx, self.batch.raw)
        self.usage.model_calls += 1
        if rc == 1:
            raise BackendError("llama.cpp's key/value cache is full; pass a larger n_ctx option or a smaller batch")
        if rc != 0:
            raise BackendError(f"llama_decode failed with code {rc} for {self.backend.path}")

    def _logits(self, index: int) -> np.ndarray:
        ptr = self.lib.llama_get_logits_ith(self.ctx, index)
        if not ptr:
            raise BackendError(f"llama.cpp returned no logits for batch index {index}")
        return np.ctypeslib.as_array(ptr, shape=(self.backend.n_vocab,)).astype(np.float64)

    def close(self) -> None:
        if self.batch is not None:
            self.batch.free()
            self.batch = None
        self.root = []
        self._order = []
        self._next = {}
        self.cached.clear()


def _answer(logits: np.ndarray, candidates: np.ndarray) -> NextToken:
    """[vocab] float64 logits -> the candidates' log-probabilities (log-softmax in float64)."""
    top = float(logits.max())
    norm = top + float(np.log(np.exp(logits - top).sum()))
    picked = logits[candidates]
    return NextToken(picked - norm, top - norm, logits=picked.copy())


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step
