"""A verdict language: the texts a guard family may answer, and what each one says.

A language is a few *branches*, each a sequence of fixed texts and at most one list of
labels (distinct, non-empty, joined by a separator), with the *outcomes* choosing the branch
says (``unsafe``, ``safety=controversial``, ``refusal=yes``). A list's labels add their own
outcomes (the categories). Llama Guard's language is two branches, ``safe`` and
``unsafe\\n`` + a comma list of ids; Qwen3Guard's is one branch per severity, category
choice and refusal; ShieldGemma's is ``Yes`` and ``No``.

The parser runs the branches side by side: a state holds every *thread* (a branch and a
place in it) the text read so far is consistent with. Everything the search and the bounds
need is read from the threads: where a verdict may end, what it names, what every completion
says and what some completion may say (DESIGN.md sections 2 and 4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from guardprob.errors import GrammarError

UNSAFE = "unsafe"  # the outcome every language has: what P(unsafe) measures


@dataclass(frozen=True)
class Labels:
    """A non-empty list of distinct labels: ``words[i]`` is how label i is written and
    ``outcomes[i]`` the outcome it names; ``sep`` goes between two labels."""

    words: tuple[str, ...]
    outcomes: tuple[str, ...]
    sep: str = ","


Part = str | Labels


@dataclass(frozen=True)
class Branch:
    """One shape of verdict: its parts in order and the outcomes choosing it says.

    open_end: the verdict is whole once its parts are written, whatever the model writes
    next (ShieldGemma's ``Yes`` before its explanation); else it ends with end-of-sequence."""

    parts: tuple[Part, ...]
    says: frozenset[str] = frozenset()
    open_end: bool = False

    @property
    def labels(self) -> Labels | None:
        return next((p for p in self.parts if isinstance(p, Labels)), None)


@dataclass(frozen=True, slots=True)
class Thread:
    """A place in one branch: part ``part`` (``len(parts)``: the branch is done), ``offset``
    characters into a text part or into a list's separator, the list's closed labels
    ``done`` (by index) and the label being written ``buffer``."""

    branch: int
    part: int = 0
    offset: int = 0
    done: tuple[int, ...] = ()
    buffer: str = ""


@dataclass(frozen=True, slots=True)
class ParserState:
    """The threads still alive, and the verdict's first characters (for the first-word estimator)."""

    threads: tuple[Thread, ...]
    head: str = ""


@dataclass(frozen=True, slots=True)
class Verdict:
    """A whole verdict: its branch, the outcomes it names and its labels in order (outcome names)."""

    branch: int
    outcomes: frozenset[str]
    labels: tuple[str, ...] = ()

    @property
    def unsafe(self) -> bool:
        return UNSAFE in self.outcomes


@dataclass(frozen=True, slots=True)
class StateFacts:
    """Per state, over outcome indices (``Language.outcomes``).

    clauses: every completion names at least one outcome of each clause (an outcome is
    committed where ``{k}`` is a clause; a union where it contains a clause).
    reachable: the outcomes some completion may name (a superset only loosens bounds).
    """

    clauses: tuple[frozenset[int], ...]
    reachable: frozenset[int]


@dataclass(frozen=True, slots=True)
class SlotFacts:
    """What a state says of one list position: ``closed``, the label written there with its
    separator or the text after the list (a fact of the prefix); ``sure``, the label every
    completion writes there; ``possible``, the labels some completion may write there."""

    closed: str | None
    sure: str | None
    possible: frozenset[str]


class Language:
    """A verdict language's character-level parser.

    branches: the verdict shapes; their texts must be unambiguous (one reading per verdict).
    outcomes: every outcome name, in the order scores report them (categories first).
    first_words: the texts a verdict that the first-token recipe counts as unsafe begins with.
    """

    def __init__(self, branches: Sequence[Branch], outcomes: Sequence[str], first_words: Sequence[str]):
        # empty texts say nothing and would only hold a thread in place
        self.branches = tuple(Branch(tuple(p for p in b.parts if p != ""), b.says, b.open_end) for b in branches)
        self.outcomes = tuple(outcomes)
        self.index = {name: i for i, name in enumerate(self.outcomes)}
        if UNSAFE not in self.index:
            raise GrammarError(f"a verdict language needs the outcome {UNSAFE!r} (what P(unsafe) measures)")
        named = {o for b in self.branches for o in b.says} | {
            o for b in self.branches if b.labels for o in b.labels.outcomes
        }
        missing = sorted(named - set(self.index))
        if missing:
            raise GrammarError(f"verdict branches name outcomes {missing!r} the language does not list")
        for b in self.branches:
            lists = [p for p in b.parts if isinstance(p, Labels)]
            if len(lists) > 1:
                raise GrammarError("a verdict branch holds at most one list of labels")
            if lists and (not lists[0].words or len(set(lists[0].words)) != len(lists[0].words) or not lists[0].sep):
                raise GrammarError("a list of labels needs distinct words and a separator")
        listed = {o for b in self.branches if b.labels for o in b.labels.outcomes}
        # outcomes a branch chooses (a field's value), each scored where its choice is made
        self.choices = tuple(o for o in self.outcomes if o != UNSAFE and o in named and o not in listed)
        self.first_words = tuple(first_words)
        self._head_length = max((len(w) for w in self.first_words), default=0)
        chars = set()
        for b in self.branches:
            for p in b.parts:
                chars.update(p.sep + "".join(p.words) if isinstance(p, Labels) else p)
        self.alphabet = frozenset(chars)
        self._by_prefix: dict[tuple[int, str], tuple[int, ...]] = {}
        self._facts: dict[ParserState, StateFacts] = {}
        self.root = ParserState(tuple(_normal(self, Thread(i)) for i in range(len(self.branches))))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Language) and (self.branches, self.outcomes, self.first_words) == (
            other.branches, other.outcomes, other.first_words)

    def __hash__(self) -> int:
        return hash((self.branches, self.outcomes, self.first_words))

    @property
    def longest(self) -> int:
        """The characters of the longest verdict (every label of a list written)."""
        return max(sum(len(p.sep.join(p.words)) if isinstance(p, Labels) else len(p) for p in b.parts)
                   for b in self.branches)

    # -- reading text -------------------------------------------------------------------
    @property
    def unsafe(self) -> int:
        return self.index[UNSAFE]

    def words(self) -> list[str]:
        """Every text the tokenizer must be able to spell: fixed texts, labels, separators."""
        out: list[str] = []
        for b in self.branches:
            for p in b.parts:
                out += [*p.words, p.sep] if isinstance(p, Labels) else [p]
        return list(dict.fromkeys(w for w in out if w))

    def step(self, state: ParserState, char: str) -> ParserState | None:
        """The state after one more character, or None if it leaves the language."""
        threads = sorted({t for thread in state.threads for t in self._step(thread, char)}, key=_order)
        if not threads:
            return None
        head = state.head + char if len(state.head) < self._head_length else state.head
        return ParserState(tuple(threads), head)

    def walk(self, state: ParserState, text: str) -> ParserState | None:
        for char in text:
            state = self.step(state, char)
            if state is None:
                return None
        return state

    def _step(self, t: Thread, char: str) -> list[Thread]:
        parts = self.branches[t.branch].parts
        if t.part == len(parts):
            return []
        part = parts[t.part]
        if not isinstance(part, Labels):
            if t.offset >= len(part) or part[t.offset] != char:
                return []
            return [_normal(self, Thread(t.branch, t.part, t.offset + 1, t.done))]
        if t.offset:  # inside the separator
            if part.sep[t.offset] != char:
                return []
            return [_normal(self, Thread(t.branch, t.part, t.offset + 1, t.done))]
        out = []
        buffer = t.buffer + char
        if self._matches(t, part, buffer):
            out.append(Thread(t.branch, t.part, 0, t.done, buffer))
        closing = self._closing(t, part)
        if closing is not None:
            done = t.done + (closing,)
            if part.sep[0] == char and len(done) < len(part.words):
                out.append(_normal(self, Thread(t.branch, t.part, 1, done)))
            out += self._step(_normal(self, Thread(t.branch, t.part + 1, 0, done)), char)
        return out

    def _matches(self, t: Thread, part: Labels, buffer: str) -> tuple[int, ...]:
        """The labels not yet written that begin with ``buffer``."""
        key = (t.branch, buffer)
        if key not in self._by_prefix:
            self._by_prefix[key] = tuple(i for i, w in enumerate(part.words) if w.startswith(buffer))
        return tuple(i for i in self._by_prefix[key] if i not in t.done)

    def _closing(self, t: Thread, part: Labels) -> int | None:
        """The label ``t.buffer`` writes whole (and not yet written), if any."""
        if not t.buffer:
            return None
        found = next((i for i in self._matches(t, part, t.buffer) if part.words[i] == t.buffer), None)
        return found

    # -- where a verdict ends ---------------------------------------------------------------
    def _ending(self, t: Thread) -> tuple[int, ...] | None:
        """The labels of the verdict that ends on thread ``t`` now, or None if it cannot end."""
        parts = self.branches[t.branch].parts
        if t.part == len(parts):
            return t.done
        part = parts[t.part]
        if t.part == len(parts) - 1 and isinstance(part, Labels) and not t.offset:
            closing = self._closing(t, part)
            if closing is not None:
                return t.done + (closing,)
        return None

    def can_end(self, state: ParserState) -> bool:
        return any(self._ending(t) is not None for t in state.threads)

    def final(self, state: ParserState) -> bool:
        """True where an open-ended verdict is whole: the node ends there, with all its mass,
        whatever the model would write next (no model call, constrained or not)."""
        return any(self.branches[t.branch].open_end and self._ending(t) is not None for t in state.threads)

    def verdict(self, state: ParserState) -> Verdict:
        """The verdict that ending at ``state`` writes (``can_end(state)`` must hold)."""
        for t in state.threads:
            labels = self._ending(t)
            if labels is not None:
                branch = self.branches[t.branch]
                names = tuple(branch.labels.outcomes[i] for i in labels) if branch.labels else ()
                return Verdict(t.branch, branch.says | frozenset(names), names)
        raise GrammarError("no verdict ends at this state")

    def named(self, state: ParserState) -> frozenset[int]:
        """The outcome indices the verdict that ends at ``state`` names (``can_end(state)``)."""
        return frozenset(self.index[o] for o in self.verdict(state).outcomes)

    def write(self, verdict: Verdict) -> str:
        """The text of a verdict (as the model writes it)."""
        branch = self.branches[verdict.branch]
        out = []
        for p in branch.parts:
            if isinstance(p, Labels):
                out.append(p.sep.join(p.words[p.outcomes.index(o)] for o in verdict.labels))
            else:
                out.append(p)
        return "".join(out)

    # -- what a state already says (DESIGN.md section 4) --------------------------------------
    def facts(self, state: ParserState) -> StateFacts:
        """What every completion of ``state`` says and what some completion may say.

        One rule: a state's completions are those of its threads; a clause holds where every
        thread has a clause inside it, an outcome is reachable where it is on any thread."""
        cached = self._facts.get(state)
        if cached is not None:
            return cached
        if len(self._facts) >= _FACTS_LIMIT:
            self._facts.clear()
        per_thread = [self._thread_facts(t) for t in state.threads]
        candidates = dict.fromkeys(c for facts in per_thread for c in facts.clauses)
        clauses = [c for c in candidates if all(any(d <= c for d in f.clauses) for f in per_thread)]
        reachable = frozenset().union(*(f.reachable for f in per_thread))
        result = StateFacts(tuple(sorted(clauses, key=sorted)), reachable)
        self._facts[state] = result
        return result

    def _thread_facts(self, t: Thread) -> StateFacts:
        branch = self.branches[t.branch]
        said = {self.index[o] for o in branch.says}
        clauses = [frozenset({k}) for k in sorted(said)]
        reachable = set(said)
        labels = branch.labels
        if labels is not None:
            at = next(i for i, p in enumerate(branch.parts) if p is labels)
            word = [self.index[o] for o in labels.outcomes]
            written = [word[i] for i in t.done]
            clauses += [frozenset({k}) for k in written]
            reachable.update(written)
            remaining = [i for i in range(len(labels.words)) if i not in t.done]
            if t.part < at:  # the list is still ahead: some label will be written
                current, later = remaining, remaining
            elif t.part == at and t.offset:  # inside a separator: another label follows
                current, later = remaining, remaining
            elif t.part == at:
                current = list(self._matches(t, labels, t.buffer))
                # another label may follow the current one only while two or more remain
                later = remaining if len(remaining) >= 2 else current
            else:
                current = later = []
            if current:
                clauses.append(frozenset(word[i] for i in current))
            reachable.update(word[i] for i in (*current, *later))
        return StateFacts(tuple(dict.fromkeys(clauses)), frozenset(reachable))

    def slot_facts(self, state: ParserState, slot: int) -> SlotFacts:
        """What ``state`` says about the label in list position ``slot``."""
        facts = [self._thread_slot(t, slot) for t in state.threads]
        closed = {f.closed for f in facts}
        sure = {f.sure for f in facts}
        return SlotFacts(
            closed.pop() if len(closed) == 1 else None,
            sure.pop() if len(sure) == 1 else None,
            frozenset().union(*(f.possible for f in facts)),
        )

    def _thread_slot(self, t: Thread, slot: int) -> SlotFacts:
        branch = self.branches[t.branch]
        labels = branch.labels
        if labels is None:
            return SlotFacts(None, None, frozenset())
        at = next(i for i, p in enumerate(branch.parts) if p is labels)
        names = labels.outcomes
        if slot < len(t.done):
            return SlotFacts(names[t.done[slot]], names[t.done[slot]], frozenset({names[t.done[slot]]}))
        remaining = [i for i in range(len(names)) if i not in t.done]
        if t.part > at or len(remaining) < slot - len(t.done) + 1:
            return SlotFacts(None, None, frozenset())  # the list ended, or too few labels left
        if t.part < at or t.offset:
            return SlotFacts(None, None, frozenset(names[i] for i in remaining))
        current = self._matches(t, labels, t.buffer)
        if slot == len(t.done):
            return SlotFacts(None, names[current[0]] if len(current) == 1 else None,
                             frozenset(names[i] for i in current))
        # later positions hold labels that are left once the current one closes
        later = [i for i in remaining if len(current) > 1 or i not in current]
        enough = len(later) >= slot - len(t.done)
        return SlotFacts(None, None, frozenset(names[i] for i in later) if enough else frozenset())

    def slot_begun(self, state: ParserState, slot: int) -> bool:
        """Whether the label in list position ``slot`` has begun on some thread (the text
        the verdict has written reaches into it)."""
        return any(self._thread_begun(t, slot) for t in state.threads)

    def _thread_begun(self, t: Thread, slot: int) -> bool:
        branch = self.branches[t.branch]
        labels = branch.labels
        if labels is None:
            return False  # a branch without a list never begins one
        at = next(i for i, p in enumerate(branch.parts) if p is labels)
        if t.part != at:
            return t.part > at
        return len(t.done) > slot or (len(t.done) == slot and t.buffer != "")

    def first_word(self, state: ParserState) -> bool | None:
        """Whether the verdict's text begins with one of ``first_words``: True once written,
        False once it cannot, None while undecided."""
        head = state.head
        if any(head.startswith(w) for w in self.first_words):
            return True
        return None if any(w.startswith(head) for w in self.first_words) else False


_FACTS_LIMIT = 200_000


def _order(t: Thread) -> tuple:
    return (t.branch, t.part, t.offset, t.done, t.buffer)


def _normal(language: Language, t: Thread) -> Thread:
    """A thread at the end of a text part moves to the start of the next part."""
    parts = language.branches[t.branch].parts
    while t.part < len(parts):
        part = parts[t.part]
        if isinstance(part, Labels):
            if t.offset == len(part.sep):
                return Thread(t.branch, t.part, 0, t.done)
            return t
        if t.offset < len(part):
            return t
        t = Thread(t.branch, t.part + 1, 0, t.done)
    return t
