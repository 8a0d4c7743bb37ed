"""Token-id prefixes and their key/value tensors, kept across requests under a byte budget.

A radix tree: each edge holds a run of token ids and the keys and values of those tokens,
one tensor ``[layers, 2, kv_heads, tokens, head_dim]`` (keys at index 0, values at 1).
The engine stores keys after the rotary position is applied, and a token's keys and values
depend only on the tokens before it, so the entry of a prefix is valid for any prompt that
starts with it, whatever follows. A chat that grows turn by turn, or an answer judged every
few tokens, finds its earlier prompt's tokens here up to where the template's tail
diverges; prompts of unrelated conversations share the format's fixed header.

Memory: every entry is its own tensor (an edge split at a divergence copies its two
halves, so no view keeps a larger buffer alive), and the tree never holds more than its
budget: before an insert, the least recently used leaves make room; what still does not
fit is left out (only the front of the new tokens is kept). Edges are not merged back after
an eviction: a merge would copy the long conversation above a short tail again and again.

Thread safety: one lock around every operation. Lookups hand out the tensors themselves;
the tree never writes into a tensor it has handed out, so a caller may use them after an
eviction.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

TOKEN_AXIS = 3  # of an entry: [layers, 2, kv_heads, tokens, head_dim]


@dataclass(frozen=True)
class CacheStats:
    """Counters since the cache was made, and what it holds now.

    lookups: prompts looked up; hits: those that found a cached prefix.
    lookup_tokens: their tokens; tokens_saved: those not prefilled thanks to the cache (net of
    any pass that computed a prefix several prompts of one batch share).
    """

    lookups: int
    hits: int
    lookup_tokens: int
    tokens_saved: int
    evictions: int
    tokens_held: int
    bytes_held: int
    budget_bytes: int | None  # None: no budget (a scratch tree for one batch)


@dataclass(frozen=True)
class Match:
    """The longest cached prefix of a prompt: its length and the entries covering it, in order
    (the last one may be longer than needed: use ``tokens`` of them in all)."""

    tokens: int
    segments: tuple[torch.Tensor, ...]

    def kv(self) -> torch.Tensor:
        """The matched keys and values as one tensor ``[layers, 2, kv_heads, tokens, head_dim]``."""
        parts = list(self.segments)
        used = sum(p.shape[TOKEN_AXIS] for p in parts[:-1])
        parts[-1] = parts[-1].narrow(TOKEN_AXIS, 0, self.tokens - used)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=TOKEN_AXIS)


class _Node:
    __slots__ = ("ids", "kv", "children", "parent", "used")

    def __init__(self, ids: tuple[int, ...], kv: torch.Tensor | None, parent: _Node | None):
        self.ids = ids
        self.kv = kv
        self.children: dict[int, _Node] = {}
        self.parent = parent
        self.used = 0  # tick of the last lookup or insert through this node


class PrefixCache:
    """Longest-prefix lookups and inserts of per-token key/value tensors.

    budget_bytes: the most the entries may hold (0: keep nothing; None: no limit).
    token_bytes: the size of one token's keys and values over all layers.
    """

    def __init__(self, budget_bytes: int | None, token_bytes: int):
        if token_bytes <= 0:
            raise ValueError("token_bytes must be positive")
        self.budget_bytes = budget_bytes
        self.token_bytes = token_bytes
        self._root = _Node((), None, None)
        self._leaves: set[_Node] = set()
        self._lock = threading.Lock()
        self._tick = 0
        self._tokens = 0
        self._lookups = self._hits = self._lookup_tokens = self._saved = self._evictions = 0

    # -- reading ----------------------------------------------------------------------------
    def match(self, ids: Sequence[int], limit: int | None = None) -> int:
        """How many leading ids (at most ``limit``) are cached; touches nothing."""
        with self._lock:
            return self._walk(ids, _limit(ids, limit))[1]

    def lookup(self, ids: Sequence[int], limit: int | None = None) -> Match:
        """The longest cached prefix of ``ids`` (at most ``limit`` tokens), marked as used."""
        with self._lock:
            path, tokens = self._walk(ids, _limit(ids, limit))
            self._touch(node for node, _ in path)
            return Match(tokens, tuple(node.kv for node, _ in path))

    # -- writing ----------------------------------------------------------------------------
    def insert(self, ids: Sequence[int], fetch: Callable[[int, int], torch.Tensor]) -> int:
        """Store ``ids``; ``fetch(start, end)`` gives the entry of ``ids[start:end]`` (called only
        for tokens the tree lacks). Returns how many tokens were added: fewer than missing
        where the budget cannot hold them all.

        One insert takes at most half the budget (a longer prompt keeps its first part): a
        conversation longer than the cache would otherwise evict everything, the template's
        prefix that every other request reads included, and each of them would then pay its
        whole prefill again (measured: a short request after an 8,000-token one waited 2.6 s
        instead of 0.6 s)."""
        ids = tuple(ids)
        with self._lock:
            if self.budget_bytes == 0:
                return 0
            path, at = self._walk(ids, len(ids))
            parent = self._boundary(path)
            self._touch(node for node, _ in path)
            missing = len(ids) - at
            if not missing:
                return 0
            if self.budget_bytes is not None:
                missing = min(missing, max(self.budget_bytes // (2 * self.token_bytes), 1))
            room = self._make_room(missing * self.token_bytes, keep=parent)
            take = missing if room is None else min(missing, room // self.token_bytes)
            if not take:
                return 0
            kv = fetch(at, at + take)
            if kv.shape[TOKEN_AXIS] != take:
                raise ValueError(f"fetch({at}, {at + take}) gave {kv.shape[TOKEN_AXIS]} tokens, not {take}")
            leaf = _Node(ids[at : at + take], kv.contiguous(), parent)
            leaf.used = self._tick
            parent.children[leaf.ids[0]] = leaf
            self._leaves.discard(parent)
            self._leaves.add(leaf)
            self._tokens += take
            return take

    def trim(self, keep: Iterable[Sequence[int]] = ()) -> None:
        """Forget everything but the given prefixes (none: empty the cache)."""
        with self._lock:
            kept: set[_Node] = {self._root}
            for ids in keep:
                path, _ = self._walk(ids, len(ids))
                self._boundary(path)
                kept.update(node for node, _ in path)
            self._leaves.clear()
            self._tokens = 0
            stack = [self._root]
            while stack:
                node = stack.pop()
                node.children = {first: child for first, child in node.children.items() if child in kept}
                if node is not self._root:
                    self._tokens += len(node.ids)
                    if not node.children:
                        self._leaves.add(node)
                stack.extend(node.children.values())

    def record(self, lookups: int, hits: int, lookup_tokens: int, tokens_saved: int) -> None:
        """Count what an engine's batch of prompts found here (see CacheStats)."""
        with self._lock:
            self._lookups += lookups
            self._hits += hits
            self._lookup_tokens += lookup_tokens
            self._saved += tokens_saved

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._lookups, self._hits, self._lookup_tokens, self._saved, self._evictions,
                              self._tokens, self._tokens * self.token_bytes, self.budget_bytes)

    def entries(self) -> list[torch.Tensor]:
        """Every tensor held (for checks of the memory they really take)."""
        with self._lock:
            out, stack = [], list(self._root.children.values())
            while stack:
                node = stack.pop()
                out.append(node.kv)
                stack.extend(node.children.values())
            return out

    # -- the tree ---------------------------------------------------------------------------
    def _walk(self, ids: Sequence[int], limit: int) -> tuple[list[tuple[_Node, int]], int]:
        """The nodes along ``ids[:limit]`` with how many of each one's ids match, and the total."""
        path: list[tuple[_Node, int]] = []
        node, at = self._root, 0
        while at < limit:
            child = node.children.get(ids[at])
            if child is None:
                break
            n, edge = 1, child.ids
            stop = min(len(edge), limit - at)
            while n < stop and edge[n] == ids[at + n]:
                n += 1
            path.append((child, n))
            at += n
            if n < len(edge):
                break
            node = child
        return path, at

    def _boundary(self, path: list[tuple[_Node, int]]) -> _Node:
        """The node that ends the matched path, splitting the last edge where the match stops inside it."""
        if not path:
            return self._root
        node, n = path[-1]
        if n == len(node.ids):
            return node
        head = _Node(node.ids[:n], node.kv.narrow(TOKEN_AXIS, 0, n).clone(), node.parent)
        head.used = node.used
        node.parent.children[head.ids[0]] = head
        node.ids, node.kv = node.ids[n:], node.kv.narrow(TOKEN_AXIS, n, len(node.ids) - n).clone()
        node.parent = head
        head.children[node.ids[0]] = node
        path[-1] = (head, n)
        return head

    def _touch(self, nodes: Iterable[_Node]) -> None:
        self._tick += 1
        for node in nodes:
            node.used = self._tick

    def _make_room(self, need: int, keep: _Node) -> int | None:
        """Evict least recently used leaves (never ``keep``) until ``need`` bytes fit or none is
        left to evict; the bytes free then (None: no budget)."""
        if self.budget_bytes is None:
            return None
        while self.budget_bytes - self._tokens * self.token_bytes < need:
            victims = [leaf for leaf in self._leaves if leaf is not keep]
            if not victims:
                break
            leaf = min(victims, key=lambda n: n.used)
            parent = leaf.parent
            del parent.children[leaf.ids[0]]
            self._leaves.discard(leaf)
            if parent is not self._root and not parent.children:
                self._leaves.add(parent)
            self._tokens -= len(leaf.ids)
            self._evictions += 1
        return self.budget_bytes - self._tokens * self.token_bytes


def _limit(ids: Sequence[int], limit: int | None) -> int:
    return len(ids) if limit is None else max(0, min(limit, len(ids)))
