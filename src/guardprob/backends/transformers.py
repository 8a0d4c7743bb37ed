"""The transformers engine: one prefill per prompt, then tree attention over the frontier.

A session holds the prompts of one run as rows of a key/value cache. The taxonomy block
that prompts share is computed once per process and copied into every row. Each round
appends the new node tokens of every row and runs them in one forward pass whose 4-D mask
lets each token see its row's prompt and its own ancestors only (DESIGN.md section 5).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from guardprob.backends.base import NextToken, Prompt, Query, Usage

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [batch, kv_heads, tokens, head_dim]


class TransformersBackend:
    """Wraps a loaded causal LM (any device, fp32 or bf16, full or sliding-window layers)."""

    name = "transformers"

    def __init__(self, model: Any, prefix_cache_size: int = 4):
        from transformers import DynamicCache

        self._cache_class = DynamicCache
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        config = model.config.get_text_config()
        self.max_context: int | None = getattr(config, "max_position_embeddings", None)
        layer_types = getattr(config, "layer_types", None) or ()
        self.window: int | None = getattr(config, "sliding_window", None) if "sliding_attention" in layer_types else None
        self.softcap: float | None = getattr(config, "final_logit_softcapping", None)
        self.decoder = model.base_model
        self.head = model.get_output_embeddings()
        params = inspect.signature(self.decoder.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._prefixes: OrderedDict[tuple[int, ...], KV] = OrderedDict()
        self._prefix_cache_size = prefix_cache_size

    def open(self, prompts: Sequence[Prompt]) -> TransformersSession:
        return TransformersSession(self, prompts)

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

    def new_cache(self, kv: KV | None, rows: int) -> Any:
        if kv is None:
            return self._cache_class()
        return self._cache_class(ddp_cache_data=[(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in kv])

    def prefix_kv(self, ids: tuple[int, ...], usage: Usage) -> KV:
        """The key/value cache of a shared prefix, computed once and kept (LRU)."""
        if ids in self._prefixes:
            self._prefixes.move_to_end(ids)
            return self._prefixes[ids]
        n = len(ids)
        cache = self.new_cache(None, 1)
        allowed = np.tril(np.ones((n, n), dtype=bool))[None]
        positions = torch.arange(n)[None]
        self.forward(torch.tensor([ids]), positions, allowed, np.arange(n)[None], cache)
        usage.model_calls += 1
        usage.prompt_tokens += n
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        self._prefixes[ids] = kv
        while len(self._prefixes) > self._prefix_cache_size:
            self._prefixes.popitem(last=False)
        return kv


class TransformersSession:
    """The cache rows of one run: row b holds prompt b, then its tree tokens as they come."""

    def __init__(self, backend: TransformersBackend, prompts: Sequence[Prompt]):
        self.backend = backend
        self.usage = Usage()
        rows = len(prompts)
        shared = _shared_prefix(prompts)
        kv = backend.prefix_kv(prompts[0].ids[:shared], self.usage) if shared else None
        self.cache = backend.new_cache(kv, rows)
        self.prompt_len = [len(p.ids) for p in prompts]
        self.slots: list[dict[tuple[int, ...], int]] = [{} for _ in prompts]
        # key_pos[b, slot]: the position of the token in that slot, -1 for padding
        self.key_pos = np.tile(np.arange(shared), (rows, 1))
        self.root = self._prefill([p.ids[shared:] for p in prompts], shared)

    def _prefill(self, tails: list[tuple[int, ...]], start: int) -> torch.Tensor:
        """Run each prompt's own tokens after the shared prefix; the root distributions [rows, vocab]."""
        width = max(len(t) for t in tails)
        ids, pos = _pad(tails, width), np.full((len(tails), width), -1)
        for b, tail in enumerate(tails):
            pos[b, : len(tail)] = start + np.arange(len(tail))
        key_pos = np.concatenate([self.key_pos, pos], axis=1)
        allowed = (key_pos[:, None, :] >= 0) & (key_pos[:, None, :] <= pos[:, :, None])
        allowed[:, :, 0] |= pos < 0  # padding queries see one key, so no row of the mask is empty
        hidden = self.backend.forward(ids, torch.from_numpy(np.maximum(pos, 0)), allowed, key_pos, self.cache)
        self.key_pos = key_pos
        self.usage.model_calls += 1
        self.usage.prompt_tokens += sum(len(t) for t in tails)
        last = torch.tensor([len(t) - 1 for t in tails])
        return self.backend.logits(hidden[torch.arange(len(tails)), last.to(hidden.device)])

    def next_tokens(self, queries: Sequence[Query]) -> list[NextToken]:
        rows = len(self.slots)
        new: list[list[tuple[int, ...]]] = [[] for _ in range(rows)]
        pending: list[dict[tuple[int, ...], int]] = [{} for _ in range(rows)]
        for q in queries:
            for depth in range(1, len(q.path) + 1):
                prefix = q.path[:depth]
                if prefix not in self.slots[q.prompt] and prefix not in pending[q.prompt]:
                    pending[q.prompt][prefix] = len(new[q.prompt])
                    new[q.prompt].append(prefix)
        width = max(len(n) for n in new)
        hidden = self._tree_pass(new, pending, width) if width else None
        last_rows, last_cols, owners, answers = [], [], [], [None] * len(queries)
        for i, q in enumerate(queries):
            if not q.path:
                answers[i] = _answer(self.root[q.prompt], q.candidates)
            else:
                last_rows.append(q.prompt)
                last_cols.append(self.slots[q.prompt][q.path] - self.offset)
                owners.append(i)
        if owners:
            logits = self.backend.logits(hidden[torch.tensor(last_rows), torch.tensor(last_cols)])
            for j, i in enumerate(owners):
                answers[i] = _answer(logits[j], queries[i].candidates)
        return answers

    def _tree_pass(self, new: list[list[tuple[int, ...]]], pending: list[dict], width: int) -> torch.Tensor:
        rows = len(new)
        self.offset = self.key_pos.shape[1]
        ids = np.zeros((rows, width), dtype=np.int64)
        pos = np.full((rows, width), -1)
        for b, prefixes in enumerate(new):
            for j, prefix in enumerate(prefixes):
                ids[b, j] = prefix[-1]
                pos[b, j] = self.prompt_len[b] + len(prefix) - 1
                self.slots[b][prefix] = self.offset + j
        key_pos = np.concatenate([self.key_pos, pos], axis=1)
        allowed = np.zeros((rows, width, key_pos.shape[1]), dtype=bool)
        for b in range(rows):
            allowed[b, :, : self.offset] = (self.key_pos[b] >= 0) & (self.key_pos[b] < self.prompt_len[b])
        index_b, index_q, index_k = [], [], []
        for b, prefixes in enumerate(new):
            slots = self.slots[b]
            for j, prefix in enumerate(prefixes):
                for depth in range(1, len(prefix) + 1):
                    index_b.append(b)
                    index_q.append(j)
                    index_k.append(slots[prefix[:depth]])
            allowed[b, len(prefixes):, 0] = True  # padding queries
        allowed[index_b, index_q, index_k] = True
        hidden = self.backend.forward(torch.from_numpy(ids), torch.from_numpy(np.maximum(pos, 0)), allowed, key_pos, self.cache)
        self.key_pos = key_pos
        self.usage.model_calls += 1
        self.usage.tokens += sum(len(n) for n in new)
        return hidden

    def close(self) -> None:
        self.cache = None
        self.root = None


def _shared_prefix(prompts: Sequence[Prompt]) -> int:
    """Tokens every prompt declares shared and has in common (always leaving one of its own)."""
    first = prompts[0].ids
    n = min(min(p.shared_prefix, len(p.ids) - 1) for p in prompts)
    for p in prompts[1:]:
        same = 0
        while same < n and p.ids[same] == first[same]:
            same += 1
        n = same
    return max(n, 0)


def _pad(seqs: list[tuple[int, ...]], width: int) -> torch.Tensor:
    out = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        out[b, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def _answer(logits: torch.Tensor, candidates: np.ndarray) -> NextToken:
    """[vocab] float32 logits -> the candidates' log-probabilities (and logits)."""
    index = torch.from_numpy(candidates).to(logits.device)
    picked = logits[index].double()
    norm = torch.logsumexp(logits.double(), dim=-1)
    return NextToken((picked - norm).cpu().numpy(), float(logits.max().double() - norm), logits=picked.cpu().numpy())
