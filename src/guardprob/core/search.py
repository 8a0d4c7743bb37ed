"""Best-first search over the tree of verdicts, with bounds (docs/design.md, section 4).

The only module that calls a backend. Each round pops up to ``batch`` frontier nodes per
prompt, asks the backend for all of them (every prompt of the run) in one call, and pushes
the children. Tokens the grammar forces are followed without a model call.

Speculation (``SearchConfig.speculate``): a node whose grammar allows few tokens (by
default one besides the end: a category id that may be followed by ``,``) has those children
evaluated in its own call. An answer is kept until the search pops its child and used then,
so a chain "id, then comma" costs one model call instead of two; an answer the search never
needs is dropped. Without a node limit the same nodes are expanded and every number of the
result is the same with or without it; only calls and tokens change. Under ``max_nodes`` or
``tolerance`` the search may stop at other nodes of about the same mass (children answered
ahead are expanded as soon as they are popped), and the bounds stay true.

Speculation from history (``SearchConfig.prior``, prior.py): with each node it evaluates, the
search also asks the descendants that the classifier's recent searches (same settings)
expanded and whose expected mass here reaches ``eps / prior``, and keeps their answers like the
children above; an unneeded guess costs its tokens only. Only engines that run a call as one
tree (``tree_calls``) get these guesses: elsewhere each would run its whole path on its own.

Certified decisions (decision.py): a search given a ``Goal`` (thresholds to decide) reads its
bounds before each round, expands only the nodes that can still move an undecided threshold
(heaviest first), and stops, off the greedy path, once every threshold is decided. Its flags
are those of the exhaustive search; its bounds stay true.

Engines whose sessions have ``release`` are told which keys the search no longer needs
(a node with no queued descendant, or a finished prompt), so they can free that memory.
The search itself is unchanged by this.
"""

from __future__ import annotations

import heapq
import itertools
import math
import warnings
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from guardprob.backends.base import Backend, NextToken, Prompt, Query, Session, begin, pending
from guardprob.core.decision import Goal
from guardprob.core.grammar import ParserState, TokenGrammar
from guardprob.core.measures import MeasureSet, greedy_targets
from guardprob.core.prefill import PrefillRule, Way, shares
from guardprob.core.prior import TreePrior
from guardprob.core.tree import GREEDY_PATH_METHODS, Node, SearchConfig, Tree  # noqa: F401 (imported from here before)
from guardprob.errors import GuardprobWarning, InputError

# heap order: the greedy path, then the first-id walk (both expanded whatever the limits say), then by mass
_GREEDY, _WALK, _OTHER = 0, 1, 2


class TreeSearch:
    """The best-first walk for one prompt; a driver feeds it the engine's answers."""

    def __init__(
        self, grammar: TokenGrammar, config: SearchConfig, track_freed: bool = False,
        likely: dict[tuple[int, ...], list[tuple[tuple[int, ...], float]]] | None = None, goal: Goal | None = None,
    ):
        self.grammar = grammar
        self.goal = goal  # thresholds to decide: stop once every one is (decision.py)
        self._decided = False
        self.config = config
        self.likely = likely or {}  # parent path -> [(child path, mean step probability)] (TreePrior.likely)
        self._guess_above = config.eps / config.prior if config.prior > 0 else math.inf
        self.evaluated: list[tuple[tuple[int, ...], tuple[int, ...], float]] = []  # for a TreePrior
        self.root = Node((), 1.0, grammar.root, on_greedy=True)
        self._heap: list[tuple[int, float, int, Node]] = []
        self._counter = itertools.count()
        self.frontier_mass = 0.0
        self.expanded_nodes = 0
        self.model_calls = 0
        self.truncated = False
        # (path, keep) of subtrees no queued node needs, for engines that free keys; None: not tracked
        self.freed: list[tuple[tuple[int, ...], int]] | None = [] if track_freed else None
        self._ahead: dict[tuple[int, ...], list[tuple[int, ...]]] = {}  # node path -> children asked with it
        self._held: dict[tuple[int, ...], NextToken] = {}  # answers asked ahead, until their node is popped
        self._asked: set[tuple[int, ...]] = set()  # every path asked ahead (never asked twice)
        self._stopped = False  # a stop rule ended the expansion of nodes off the greedy path
        self._interrupted = False  # stopped from outside (a deadline) before the stop rules
        self._unanswered: set[int] = set()  # ids of the nodes of the round asked and not yet expanded
        # (node path, measures) the greedy-path estimators need decided; set once the greedy path is known
        self._focus: list[tuple[tuple[int, ...], MeasureSet]] | None = None if config.exact_greedy else []
        self._deferred: list[Node] = []  # retirements held back until the focus is known
        # the first-id walk (config.first_id): node -> its share of the arrival node, None on the
        # prefill path above it; the nodes the walk needs expanded
        self._rule = PrefillRule.of(grammar.language) if config.first_id is not None else None
        self._walk: dict[Node, float | None] = {}
        self.first_logits: np.ndarray | None = None
        if self._rule is not None:
            self._walk[self.root] = None
        self._settle(self.root)

    # -- frontier ---------------------------------------------------------------------
    def _fold(self, path: tuple[int, ...], state: ParserState) -> tuple[tuple[int, ...], ParserState, str]:
        """Follow the tokens the grammar forces: the path and state reached, and what that node
        is: "model" (it needs the model), "end" (it can only end) or "invalid" (a dead end)."""
        while True:
            step = self.grammar.transitions(state)
            if step.final:
                return path, state, "end"
            if not self.config.constrained:
                return path, state, "model"
            if step.n_tokens == 0 and step.n_eos == 0:
                return path, state, "invalid"
            if not step.forced:
                return path, state, "model"
            if step.n_tokens == 0:
                return path, state, "end"
            path, state = path + (int(step.candidates[0]),), step.next_states[0]

    def _settle(self, node: Node) -> bool:
        """Follow forced tokens, close nodes that can only end, queue nodes that need the model
        and are expandable or wanted by the greedy-path estimators (True when queued)."""
        node.path, node.state, kind = self._fold(node.path, node.state)
        if kind == "invalid":
            node.invalid, node.expanded = node.mass, True
            return False
        if kind == "end":
            node.end_mass, node.expanded = node.mass, True
            node.greedy = "end" if node.on_greedy else ""
            return False
        walk = self._walking(node)
        if node.on_greedy or walk or (not self._stopped and not self._decided and (self._expandable(node) or self._wanted(node))):
            kind = _GREEDY if node.on_greedy else _WALK if walk else _OTHER
            heapq.heappush(self._heap, (kind, -node.mass, next(self._counter), node))
            node.waiting = True
            self.frontier_mass += node.mass
            if node.parent is not None:
                node.parent.queued += 1
            return True
        return False

    def _walking(self, node: Node) -> bool:
        """True if the first-id walk needs ``node`` expanded: on the prefill path, or below the
        arrival node with its first label still open after its forced tokens."""
        if node not in self._walk:
            return False
        return self._walk[node] is None or self._rule.closed(node.state) is None

    def _expandable(self, node: Node) -> bool:
        return (node.mass > 0 and node.mass >= self.config.eps and self._within_depth(node.depth)
                and (self.goal is None or self.goal.moves(node.state)))

    def _wanted(self, node: Node) -> bool:
        """True if a greedy-path estimator still depends on what lies below ``node``."""
        if not self._focus or node.mass <= 0 or not self._within_depth(node.depth):
            return False
        return any(node.path[: len(start)] == start and measures.open(node.state) for start, measures in self._focus)

    def _refocus(self) -> None:
        """Once the greedy path is known: queue every open node below each greedy-path target
        that its measure leaves undecided, then retire what was held back."""
        last = self.root
        while last.greedy_child is not None:
            last = last.greedy_child
        if self._focus is not None or not last.expanded:
            return
        targets = greedy_targets(self.root, self.grammar, self.config.exact_greedy, self.config.constrained)
        self._focus = [(start.path, MeasureSet(self.grammar, [t], self.config.constrained)) for start, t in targets]
        for (start, _), (_, measures) in zip(targets, self._focus):
            stack = [start]
            while stack:
                node = stack.pop()
                if not measures.open(node.state):
                    continue
                if node.expanded:
                    stack.extend(node.children)
                elif not node.waiting:
                    self._settle(node)
        deferred, self._deferred = self._deferred, []
        for node in deferred:
            self._retire(node)

    def _within_depth(self, depth: int) -> bool:
        return self.config.max_depth is None or depth < self.config.max_depth

    @property
    def done(self) -> bool:
        if not self._heap and self._focus is None:
            self._refocus()
        return not self._heap

    def _stop(self) -> None:
        """A stop rule fired (only nodes off the greedy path are queued then): they stay open,
        as unexplored mass, and no node off the greedy path is queued again."""
        self._stopped = True
        for _, _, _, node in self._heap:
            node.waiting = False
        self._heap.clear()
        self.frontier_mass = 0.0

    def next_round(self, limit: int | None = None) -> list[Node]:
        """Pop the nodes to evaluate in the next model call ([] once the search is over): at most
        ``config.batch``, and at most ``limit`` (>= 1) where a shared call is rationed."""
        if self._focus is None:
            self._refocus()
        if self.goal is not None and not self._decided and not self._interrupted:
            self._decided = self.goal.update(self.root)
        size = self.config.batch if limit is None else max(1, min(limit, self.config.batch))
        nodes = self._pop_round(size)
        if not nodes and self._focus is None:  # the greedy path ended on an answer held from before
            self._refocus()
            nodes = self._pop_round(size)
        self._unanswered = {id(node) for node in nodes}
        return nodes

    def wants(self) -> int:
        """About how many nodes the next round would take (for rationing a shared call)."""
        return min(self.config.batch, max(len(self._heap), 1))

    def _pop_round(self, size: int) -> list[Node]:
        nodes: list[Node] = []
        limit = self.config.max_nodes
        while self._heap and len(nodes) < size:
            kind, _, _, node = self._heap[0]  # the greedy path and the first-id walk first, whatever the limits
            exhausted = limit is not None and self.expanded_nodes + len(nodes) >= limit
            # tolerance 0 never stops: a frontier mass rounded to 0 may still hold nodes
            settled = self.config.tolerance > 0 and self.frontier_mass <= self.config.tolerance
            if kind == _OTHER and (exhausted or settled or self._decided):
                self._stop()
                break
            heapq.heappop(self._heap)
            node.waiting = False
            self.frontier_mass -= node.mass
            if kind == _OTHER and self.goal is not None and not self.goal.moves(node.state):
                self._park(node)  # every threshold it could move is decided: it stays open
                continue
            held = self._held.pop(node.path, None)
            if held is not None:  # answered in the previous call, along with its parent
                self.expanded_nodes += 1
                self.expand(node, held)
                continue
            nodes.append(node)
        if nodes:
            self.model_calls += 1
            self.expanded_nodes += len(nodes)
        return nodes

    def _park(self, node: Node) -> None:
        """Leave a popped node unexpanded for good (its mass stays open in the bounds)."""
        parent = node.parent
        if parent is not None:
            parent.queued -= 1
            self._retire(parent)

    def ahead(self, nodes: Sequence[Node], limit: int | None = None) -> list[tuple[tuple[int, ...], ParserState]]:
        """The nodes to evaluate in the same call as ``nodes`` (speculation), as (path, state):
        every child of a node whose grammar allows at most ``config.speculate`` tokens, and the
        descendants that history expects to be expanded (``likely``); at most ``limit`` of them
        (a rationed call's room: a guess left out is asked when its node is popped, if ever)."""
        out: list[tuple[tuple[int, ...], ParserState]] = []
        full = limit if limit is not None else math.inf
        for node in nodes:
            if len(out) >= full:
                break
            step = self.grammar.transitions(node.state)
            # a node below eps (only the greedy path goes there) expands at most its greedy child
            if 1 <= step.n_tokens <= self.config.speculate and node.mass >= self.config.eps:
                for token, state in zip(step.candidates[: step.n_tokens], step.next_states):
                    path, state, kind = self._fold(node.path + (int(token),), state)
                    if kind == "model" and len(out) < full:
                        self._ask(node.path, path, state, out)
            self._ask_likely(node.path, node.state, node.mass, out, full)
        return out

    def _ask(self, parent: tuple[int, ...], path: tuple[int, ...], state: ParserState, out: list) -> None:
        """Ask ``path`` (a child of ``parent`` that needs the model) ahead, unless it lies past
        max_depth or is asked already."""
        if self._within_depth(len(path)) and path not in self._asked:
            self._asked.add(path)
            self._ahead.setdefault(parent, []).append(path)
            out.append((path, state))

    def _ask_likely(self, parent: tuple[int, ...], state: ParserState, mass: float, out: list,
                    full: float = math.inf) -> None:
        """Ask every descendant of ``parent`` (of mass ``mass``, known or expected) that earlier
        searches expanded and whose expected mass reaches ``eps / prior``."""
        children = self.likely.get(parent)
        if not children:
            return
        step = self.grammar.transitions(state)
        index = {int(t): i for i, t in enumerate(step.candidates[: step.n_tokens])}
        for child, q in children:
            if len(out) >= full:
                return
            expected = mass * q
            if expected < self._guess_above or expected <= 0:
                continue
            i = index.get(child[len(parent)]) if len(child) > len(parent) else None
            if i is None:
                continue  # not a child this grammar allows (a prior recorded elsewhere)
            path, child_state, kind = self._fold(child[: len(parent) + 1], step.next_states[i])
            if path == child and kind == "model" and self._within_depth(len(path)):
                self._ask(parent, path, child_state, out)
                self._ask_likely(path, child_state, expected, out, full)

    def hold(self, path: tuple[int, ...], answer: NextToken) -> None:
        """Keep the answer for a child asked ahead (see ``ahead``) until the search pops it."""
        self._held[path] = answer

    # -- expansion --------------------------------------------------------------------
    def expand(self, node: Node, answer: NextToken) -> None:
        self._unanswered.discard(id(node))
        step = self.grammar.transitions(node.state)
        if node.parent is not None:
            self.evaluated.append((node.parent.path, node.path, node.mass / node.parent.mass))
        logprobs = np.asarray(answer.logprobs, dtype=np.float64)
        known = ~np.isnan(logprobs)
        unreported = float(answer.unreported) if not known.all() else 0.0
        self.truncated |= unreported > 0
        node.expanded = True
        if self.config.constrained:
            q, share = _renormalise(logprobs, known, unreported)
            if share is None:
                warnings.warn(
                    f"the model gives every token the grammar allows after {node.path} probability 0; "
                    "they are taken as equally likely (the limit that gives a forced token probability 1)",
                    GuardprobWarning, stacklevel=2,
                )
                share = 0.0
            node.remainder = node.mass * share
        else:
            q = np.where(known, np.exp(np.where(known, logprobs, -np.inf)), 0.0)
            node.remainder = node.mass * unreported
            node.invalid = node.mass * max(0.0, 1.0 - float(q.sum()) - unreported)
        n = step.n_tokens
        node.end_mass = node.mass * float(q[n:].sum())
        greedy_index = self._greedy_index(node, q, logprobs, answer.top_logprob) if node.on_greedy else -1
        keep = self._nucleus(q[:n])
        created = []
        for i in range(n):
            if q[i] <= 0.0:
                continue
            child = Node(node.path + (int(step.candidates[i]),), node.mass * float(q[i]), step.next_states[i], i == greedy_index, node)
            node.children.append(child)
            created.append((i, child))
            if child.on_greedy:
                node.greedy_child = child
        if node in self._walk:
            self._extend_walk(node, answer, n)
        queued = set()
        for i, child in created:
            if (keep[i] or child.on_greedy or child in self._walk or self._wanted(child)) and self._settle(child):
                queued.add(child.path)
        self._drop_unused(node, queued)
        self._retire(node)

    def _extend_walk(self, node: Node, answer: NextToken, n: int) -> None:
        """Mark the children of an expanded node of the first-id walk that it needs expanded."""
        share = self._walk[node]
        if share is None:  # on the prefill path: arrived here (its own tokens reach the arrival state)?
            way = self._rule.way(self.grammar, node)
            if way is Way.ON:
                child = self._rule.next(node)
                if child is not None:
                    self._walk[child] = None
                return
            if way is Way.OFF:
                return
            share = self._walk[node] = 1.0
            self.first_logits = None if answer.logits is None else np.array(answer.logits, dtype=np.float64)[:n]
        children, _ = shares(node)
        for child, s in children:
            mass = share * s
            if mass >= self.config.first_id and self._rule.closed(child.entry) is None:
                self._walk[child] = mass

    def _drop_unused(self, node: Node, queued: set[tuple[int, ...]]) -> None:
        """Forget the answers asked ahead for children of ``node`` that the search does not
        queue, and for everything asked below them."""
        for path in self._ahead.pop(node.path, ()):
            if path not in queued:
                self._forget(path, len(node.path))

    def _forget(self, path: tuple[int, ...], keep: int) -> None:
        """Drop an answer asked ahead, and those asked below it; their keys past ``keep`` go."""
        self._held.pop(path, None)
        if self.freed is not None:
            self.freed.append((path, keep))
        for below in self._ahead.pop(path, ()):
            self._forget(below, len(path))

    def _retire(self, node: Node) -> None:
        """Record the keys of nodes no queued node descends from (their tokens after the parent's)."""
        if self.freed is None:
            return
        if self._focus is None:  # the greedy-path estimators may still want nodes below it
            self._deferred.append(node)
            return
        while node.expanded and node.queued == 0:
            parent = node.parent
            node.queued = -1
            self.freed.append((node.path, len(parent.path) if parent is not None else 0))
            if parent is None:
                return
            parent.queued -= 1
            node = parent

    def _greedy_index(self, node: Node, q: np.ndarray, logprobs: np.ndarray, top: float) -> int:
        best = int(np.argmax(q))
        if not self.config.constrained and not math.isnan(top) and top > logprobs[best] + 1e-9:
            node.greedy = "invalid"  # the model's own first choice leaves the grammar
            return -1
        n = self.grammar.transitions(node.state).n_tokens
        node.greedy = "end" if best >= n else "child"
        return best if best < n else -1

    def _nucleus(self, q: np.ndarray) -> np.ndarray:
        if self.config.top_p >= 1.0:
            return np.ones(len(q), dtype=bool)
        order = np.argsort(-q, kind="stable")
        before = np.cumsum(q[order]) - q[order]
        keep = np.zeros(len(q), dtype=bool)
        keep[order[before < self.config.top_p]] = True
        return keep

    def tree(self) -> Tree:
        return Tree(self.root, self.grammar, self.config, self.expanded_nodes, self.model_calls, self.truncated,
                    self.complete, self.first_logits)

    @property
    def decided(self) -> bool:
        """True once a goal's thresholds were all decided (the search stopped there)."""
        return self._decided

    @property
    def complete(self) -> bool:
        return not self._interrupted

    def interrupt(self) -> None:
        """Stop now, the greedy path too: what is queued, held or asked in a call that never
        answered (stopped in flight) stays open, as unexplored mass."""
        if self._interrupted or (self.done and not self._unanswered):
            return
        self._unanswered.clear()
        self._interrupted = True
        self._stop()  # the heap, greedy nodes too; the engine then frees the whole prompt
        self._held.clear()
        self._ahead.clear()
        if self._focus is None:
            self._focus = []


def _renormalise(logprobs: np.ndarray, known: np.ndarray, unreported: float) -> tuple[np.ndarray, float | None]:
    """The constrained distribution over the allowed tokens: a softmax of their log-probabilities,
    taken in log space so that no underflow makes a dead end, and the share of the mass the
    engine left unreported. (q, None) when every allowed token has probability 0 and nothing is
    unreported: q is then uniform, the limit of equal log-probabilities."""
    top = float(np.max(logprobs[known])) if known.any() else -math.inf
    if unreported > 0:
        top = max(top, math.log(unreported))
    if top == -math.inf:
        pool = known if known.any() else np.ones(len(known), dtype=bool)
        return pool / float(pool.sum()), None
    weights = np.where(known, np.exp(np.where(known, logprobs, -np.inf) - top), 0.0)
    hidden = math.exp(math.log(unreported) - top) if unreported > 0 else 0.0
    z = float(weights.sum()) + hidden
    return weights / z, hidden / z


def search(
    backend: Backend, prompts: Sequence[Prompt], grammar: TokenGrammar | Sequence[TokenGrammar], config: SearchConfig,
    prior: TreePrior | None = None, roots: Sequence[tuple[int, tuple[int, ...]]] | None = None,
    goals: Sequence[Goal | None] | None = None,
) -> list[Tree]:
    """Search every prompt's tree, batching all prompts' frontiers into each model call.

    prior: what earlier searches of this grammar and config expanded; read for speculation
    (``config.prior``, on engines with ``tree_calls``) and given each finished search's nodes.
    """
    run = SearchRun(backend, prompts, grammar, config, prior, roots, goals=goals)
    try:
        while run.step():
            pass
    finally:
        run.close()
    return run.trees()


class Rider(Protocol):
    """Queries that share a run's calls without being a tree search (reasoning being written)."""

    @property
    def done(self) -> bool: ...

    def queries(self) -> list[Query]: ...

    def feed(self, answers: Sequence[NextToken]) -> None: ...


class SearchRun:
    """A batched search that advances one model call at a time (``step``), so that a scheduler
    can interleave runs, start new ones between calls and stop prompts whose time is up.

    Opening it runs the prompts through the engine (prefill); ``stop(i)`` ends search i
    after the call under way, with the bounds reached so far, and frees its keys.

    Continuous batching: on an engine whose sessions take prompts mid-run (``Session.add``),
    ``attach`` joins the searches of prompts added to the session between calls, each
    ``attach`` a group (a request), and every later call serves all of them. ``round_nodes`` rations a call: when the searches
    want more nodes than that, the groups share it equally (what one leaves goes to the
    others) and so do the searches of a group, each at least one node, so a large request
    cannot make a small one's calls slow. A ``joinable`` run stays open while idle.
    """

    def __init__(
        self, backend: Backend, prompts: Sequence[Prompt], grammar: TokenGrammar | Sequence[TokenGrammar],
        config: SearchConfig, prior: TreePrior | None = None,
        roots: Sequence[tuple[int, tuple[int, ...]]] | None = None, session: Session | None = None,
        goals: Sequence[Goal | None] | None = None, *, round_nodes: int | None = None, joinable: bool = False,
    ):
        """roots: for each search, its prompt and the tokens its tree starts after (a format that
        asks one question per category after a shared conversation: K trees over one prefill;
        the reasoning written before a verdict); by default one search per prompt, from the
        prompt's end. ``grammar``: one for every search, or one per search. ``session``: one
        already open on ``prompts`` (the run then owns it), else one is opened. ``goals``: per
        search, the thresholds to decide (None: search to the config's stop rules)."""
        if round_nodes is not None and (not isinstance(round_nodes, int) or round_nodes < 1):
            raise InputError(f"round_nodes={round_nodes!r}: use a positive number of nodes per model call, or None")
        self.backend = backend
        self.session = begin(backend, prompts) if session is None else session
        self._prefill_step = getattr(self.session, "prefill_step", None)
        self._release = getattr(self.session, "release", None)
        self.round_nodes = round_nodes
        self.joinable = joinable
        self.searches: dict[int, TreeSearch] = {}  # by search id, in the order they joined
        self.roots: dict[int, tuple[int, tuple[int, ...]]] = {}  # search id -> (session prompt, tokens after it)
        self._priors: dict[int, TreePrior | None] = {}
        self._groups: list[list[int]] = []  # the search ids of each attach, while any is unfinished
        self._unfinished: dict[int, int] = {}  # session prompt -> its searches not yet done
        self._ids = itertools.count()
        self._riders: list[Rider] = []
        self._closed = False
        self.attach(0, len(prompts), grammar, config, prior, roots, goals)

    def ride(self, rider: Rider) -> None:
        """Put ``rider``'s queries into every call until it is done (reasoning written while
        other prompts' verdicts are searched)."""
        self._riders.append(rider)

    def attach(
        self, base: int, count: int, grammar: TokenGrammar | Sequence[TokenGrammar], config: SearchConfig,
        prior: TreePrior | None = None, roots: Sequence[tuple[int, tuple[int, ...]]] | None = None,
        goals: Sequence[Goal | None] | None = None,
    ) -> list[int]:
        """Searches over the session's prompts ``base .. base + count - 1`` (already in it:
        opened with it, or ``Session.add``); ``roots`` count prompts from ``base``. Their ids."""
        roots = [(i, ()) for i in range(count)] if roots is None else [(i, tuple(p)) for i, p in roots]
        grammars = [grammar] * len(roots) if isinstance(grammar, TokenGrammar) else list(grammar)
        if len(grammars) != len(roots):
            raise InputError(f"{len(grammars)} grammars for {len(roots)} searches; give one, or one per search")
        goals = [None] * len(grammars) if goals is None else list(goals)
        if len(goals) != len(grammars):
            raise InputError(f"{len(goals)} goals for {len(grammars)} searches; give one per search, or none")
        # engines that run each query on its own would pay a guess's whole path: no prior there
        guess = prior is not None and config.prior > 0 and getattr(self.backend, "tree_calls", False)
        likely = prior.likely() if guess else {}
        ids = []
        for (prompt, offset), g, goal in zip(roots, grammars, goals):
            i = next(self._ids)
            self.searches[i] = TreeSearch(g, config, track_freed=self._release is not None, likely=likely, goal=goal)
            self.roots[i] = (base + prompt, offset)
            self._priors[i] = prior
            self._unfinished[base + prompt] = self._unfinished.get(base + prompt, 0) + 1
            ids.append(i)
        self._groups.append(ids)
        return ids

    def stop(self, search: int) -> None:
        """End search ``search`` now, keeping what it reached (marked incomplete)."""
        self.searches[search].interrupt()

    def stop_all(self) -> None:
        for i in self.searches:
            self.stop(i)

    def done(self, ids: Sequence[int]) -> bool:
        """True once every search in ``ids`` is over."""
        return all(self.searches[i].done for i in ids)

    def step(self) -> bool:
        """Run one model call for every unfinished search whose prompt is prefilled, after one
        chunk of the prefill under way if any (engines that prefill in steps); False once there
        is nothing to ask (a run that is not joinable then closes)."""
        if self._closed:
            return False
        searches = self.searches
        self._free()  # prompts stopped since the last call leave first: no chunk runs for them
        waiting = pending(self.session)
        if waiting and self._prefill_step is not None:
            self._prefill_step()
            waiting = pending(self.session)
        live = [i for i, s in searches.items() if not s.done and self.roots[i][0] not in waiting]
        limits = self._ration(live)
        rounds = [(i, searches[i].next_round(limits.get(i))) for i in live]
        batch = [(i, node) for i, nodes in rounds for node in nodes]
        # a rider asks once all its prompts are prefilled
        riders = [r for r in self._riders if not r.done]
        asked = [r.queries() for r in riders]
        ready = [not any(q.prompt in waiting for q in qs) for qs in asked]
        riders = [r for r, ok in zip(riders, ready) if ok]
        asked = [qs for qs, ok in zip(asked, ready) if ok]
        if not batch and not any(asked):
            self._free()
            if waiting:
                return True
            if not self.joinable:
                self.close()
            return False
        # guesses ride along within the round's budget: a rationed call stays within round_nodes
        room = None if self.round_nodes is None else max(0, self.round_nodes - len(batch))
        ahead = []
        for i, nodes in rounds:
            if room == 0:
                break
            guesses = searches[i].ahead(nodes, room)
            ahead += [(i, path, state) for path, state in guesses]
            room = None if room is None else room - len(guesses)
        roots = self.roots
        queries = [Query(roots[i][0], roots[i][1] + node.path, searches[i].grammar.transitions(node.state).candidates)
                   for i, node in batch]
        queries += [Query(roots[i][0], roots[i][1] + path, searches[i].grammar.transitions(state).candidates)
                    for i, path, state in ahead]
        at = len(queries)
        queries += [q for qs in asked for q in qs]
        answers = self.session.next_tokens(queries)
        for (i, path, _), answer in zip(ahead, answers[len(batch):]):
            searches[i].hold(path, answer)
        for (i, node), answer in zip(batch, answers):
            searches[i].expand(node, answer)
        for rider, qs in zip(riders, asked):
            rider.feed(answers[at : at + len(qs)])
            at += len(qs)
        self._riders = [r for r in self._riders if not r.done]
        self._free()
        return True

    def _ration(self, live: Sequence[int]) -> dict[int, int]:
        """Nodes per search for the next call when the searches could take more than
        ``round_nodes`` (else none: each takes its ``config.batch``)."""
        if self.round_nodes is None:
            return {}
        most = {i: self.searches[i].config.batch for i in live}
        if sum(most.values()) <= self.round_nodes:
            return {}
        wants = {i: self.searches[i].wants() for i in live}
        if sum(wants.values()) <= self.round_nodes:
            # within the budget by their frontiers now, but answers held from guesses grow a round
            # as it is popped: share the budget by what each could take instead
            wants = most
        groups = [[i for i in g if i in wants] for g in self._groups]
        groups = [g for g in groups if g]
        limits: dict[int, int] = {}
        for g, share in zip(groups, _water_fill([sum(wants[i] for i in g) for g in groups], self.round_nodes)):
            for i, n in zip(g, _water_fill([wants[i] for i in g], share)):
                limits[i] = max(n, 1)
        return limits

    def forget(self, ids: Sequence[int]) -> list[Tree]:
        """Take searches out of the run (a joinable run's finished request): unfinished ones stop
        there, complete ones teach the prior, their prompts' keys go. Their trees."""
        trees = []
        for i in ids:
            s = self.searches[i]
            s.interrupt()
            trees.append(s.tree())
        self._free()
        for i in ids:
            s, prior = self.searches.pop(i), self._priors.pop(i)
            self.roots.pop(i)
            if prior is not None and s.complete:
                prior.record(s.evaluated)
        gone = set(ids)
        self._groups = [g for g in ([i for i in g if i not in gone] for g in self._groups) if g]
        return trees

    def _free(self) -> None:
        """Hand the engine what the searches no longer need: freed node keys, and a prompt once
        every search on it is done."""
        release = self._release
        if release is None:
            return
        for i, s in self.searches.items():
            if s.freed is None:  # its prompt was handed back already
                continue
            prompt, offset = self.roots[i]
            if s.done:
                s.freed = None
                self._unfinished[prompt] -= 1
                if not self._unfinished[prompt]:
                    del self._unfinished[prompt]
                    release(prompt)  # the whole prompt
                continue
            for path, keep in s.freed:
                if path:
                    release(prompt, offset + path, len(offset) + keep)
            s.freed.clear()

    def close(self) -> None:
        """Free the engine's session (idempotent); finished searches teach the prior."""
        if self._closed:
            return
        self._closed = True
        self.session.close()
        for i, s in self.searches.items():
            prior = self._priors[i]
            if prior is not None and s.complete:
                prior.record(s.evaluated)

    def trees(self, ids: Sequence[int] | None = None) -> list[Tree]:
        return [self.searches[i].tree() for i in (self.searches if ids is None else ids)]


def _water_fill(demands: Sequence[int], budget: int) -> list[int]:
    """Split ``budget`` equally over ``demands``, none getting more than it asks; what the
    smaller ones leave goes to the larger."""
    out = [0] * len(demands)
    left = budget
    order = sorted(range(len(demands)), key=lambda k: demands[k])
    for j, k in enumerate(order):
        out[k] = min(demands[k], left // (len(order) - j))
        left -= out[k]
    return out
