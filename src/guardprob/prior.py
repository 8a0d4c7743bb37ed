"""What recent searches expanded, so that the next search can ask it in its first call.

Verdict trees of one classifier at one setting look alike: the ways to write ``unsafe``, the
ids that follow, the commas after them. A search must walk its tree one level per model call
(a child is known only once its parent is answered), but the nodes that many recent searches
expanded are likely to be needed again, and asking them all in the first call, along with the
root, lets the search expand them later without a call (``SearchConfig.prior``). A guess
that turns out unneeded costs its tokens and nothing else: answers are used only for nodes the
search itself pops, so the result is the same whatever the prior holds.

A node is counted once per search that expanded it; since a node is expanded only after its
parent, a parent's count is never below its children's, and the nodes at or above any share
form a tree that hangs from the root.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Iterable

Path = tuple[int, ...]
Edge = tuple[Path, Path]  # (parent node's path, node's path)


class TreePrior:
    """The nodes expanded by the last ``window`` searches recorded, with how many expanded each."""

    def __init__(self, window: int = 32):
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window={window!r}: use a positive number of searches")
        self.window = window
        self._searches: deque[frozenset[Edge]] = deque()
        self._counts: Counter[Edge] = Counter()
        self._lock = threading.Lock()  # a server may search from several threads
        self._likely: dict[float, dict[Path, list[Path]]] = {}  # by share, until the next record

    def __len__(self) -> int:
        return len(self._searches)

    def record(self, edges: Iterable[Edge]) -> None:
        """Add one search's expanded nodes (the root excluded), forgetting the oldest search
        once ``window`` are held."""
        seen = frozenset(edges)
        with self._lock:
            self._searches.append(seen)
            self._counts.update(seen)
            if len(self._searches) > self.window:
                self._counts.subtract(self._searches.popleft())
                self._counts += Counter()  # drop counts that reached zero
            self._likely.clear()

    def copy(self) -> TreePrior:
        """An independent prior holding the same searches."""
        out = TreePrior(self.window)
        with self._lock:
            for seen in self._searches:
                out.record(seen)
        return out

    def likely(self, share: float) -> dict[Path, list[Path]]:
        """The nodes that at least ``share`` of the recorded searches expanded, as
        parent path -> child paths ({} before any search is recorded)."""
        with self._lock:
            if not self._searches or share <= 0:
                return {}
            if share not in self._likely:
                need = share * len(self._searches)
                tree: dict[Path, list[Path]] = {}
                for (parent, path), count in self._counts.items():
                    if count >= need:
                        tree.setdefault(parent, []).append(path)
                self._likely[share] = tree
            return self._likely[share]
