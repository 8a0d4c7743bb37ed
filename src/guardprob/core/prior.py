"""What recent searches expanded, so that the next search can ask it before it needs it.

Verdict trees of one classifier at one setting look alike: the ways to write ``unsafe``, the
ids that follow, the commas after them. A search must walk its tree one level per model call
(a child is known only once its parent is answered), but a node that earlier searches
expanded, and whose mass this search can expect to reach ``eps``, will likely be needed
again: asking it in the call of its nearest ancestor lets the search expand it later without
a call (``SearchConfig.prior``). A guess that turns out unneeded costs its tokens and nothing
else: answers are used only for nodes the search itself pops, so the result is the same
whatever the prior holds.

A node's expected mass is the mass known above it times, for each step down, the mean
probability that earlier searches gave that step (0 where they did not expand the child).
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Iterable

Path = tuple[int, ...]
Step = tuple[Path, Path, float]  # (parent node's path, node's path, the node's probability given its parent)


class TreePrior:
    """The nodes expanded by the last ``window`` searches recorded, with their step probabilities."""

    def __init__(self, window: int = 32):
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window={window!r}: use a positive number of searches")
        self.window = window
        self._searches: deque[tuple[Step, ...]] = deque()
        self._expanded: Counter[Path] = Counter()  # searches that expanded each node (the root: all)
        self._step_sum: Counter[tuple[Path, Path]] = Counter()  # summed probability of each step
        self._lock = threading.Lock()  # a server may search from several threads
        self._likely: dict[Path, list[tuple[Path, float]]] | None = None  # until the next record

    def __len__(self) -> int:
        return len(self._searches)

    def record(self, steps: Iterable[Step]) -> None:
        """Add one search's expanded nodes (the root excluded), forgetting the oldest search
        once ``window`` are held."""
        search = tuple(steps)
        with self._lock:
            self._add(search, 1)
            self._searches.append(search)
            if len(self._searches) > self.window:
                self._add(self._searches.popleft(), -1)
            self._likely = None

    def _add(self, search: tuple[Step, ...], sign: int) -> None:
        # the root: the empty path, or the tokens a format forces before its first choice
        paths = {path for _, path, _ in search}
        for root in {parent for parent, _, _ in search} - paths or {()}:
            self._expanded[root] += sign
            if not self._expanded[root]:
                del self._expanded[root]
        for parent, path, q in search:
            self._expanded[path] += sign
            self._step_sum[(parent, path)] += sign * q
            if not self._expanded[path]:  # no search in the window holds it any more
                del self._expanded[path], self._step_sum[(parent, path)]

    def likely(self) -> dict[Path, list[tuple[Path, float]]]:
        """parent path -> [(child path, mean probability of the step)] over the recorded
        searches that expanded the parent ({} before any search is recorded)."""
        with self._lock:
            if self._likely is None:
                tree: dict[Path, list[tuple[Path, float]]] = {}
                for (parent, path), total in self._step_sum.items():
                    tree.setdefault(parent, []).append((path, total / self._expanded[parent]))
                self._likely = tree
            return self._likely

    def copy(self) -> TreePrior:
        """An independent prior holding the same searches."""
        out = TreePrior(self.window)
        with self._lock:
            for search in self._searches:
                out.record(search)
        return out
