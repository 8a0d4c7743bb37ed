"""A verdict language: the texts a guard family may answer, and what each one says.

A language is a few *branches*, each a sequence of fixed texts and lists of labels
(distinct, non-empty, joined by a separator), with the *outcomes* choosing the branch says
(``unsafe``, ``safety=controversial``, ``refusal=yes``). A list's labels add their own
outcomes (the categories). Llama Guard's language is two branches, ``safe`` and
``unsafe\\n`` + a comma list of ids; Qwen3Guard's is one branch per severity, category
choice and refusal; ShieldGemma's is ``Yes`` and ``No``; PolyGuard's branches hold two lists
(the request's violations and the response's). A list that may be left out ("None") is
another branch. The slot estimators read one list per branch, its *slotted* list.

The parser runs the branches side by side: a state holds every *thread* (a branch and a
place in it) the text read so far is consistent with. Everything the search and the bounds
need is read from the threads: where a verdict may end, what it names, what every completion
says and what some completion may say (docs/design.md, sections 2 and 4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from guardprob.errors import GrammarError

UNSAFE = "unsafe"  # the outcome every language has: what P(unsafe) measures


@dataclass(frozen=True)
class Labels:
    """A non-empty list of distinct labels: ``words[i]`` is how label i is written and
    ``outcomes[i]`` the outcome it names; ``sep`` goes between two labels.

    slotted: the list whose positions the slot estimators read (``conditional``, ``joint``);
    a branch has at most one. The labels of a list that is not slotted are scored like a
    field's value, from the greedy node where their choice is made."""

    words: tuple[str, ...]
    outcomes: tuple[str, ...]
    sep: str = ","
    slotted: bool = True


Part = str | Labels


@dataclass(frozen=True)
class Branch:
    """One shape of verdict: its parts in order and the outcomes choosing it says.

    open_end: the verdict is whole once its parts are written, whatever the model writes
    next (ShieldGemma's ``Yes`` before its explanation); else it ends with end-of-sequence.
    first_word: for a branch whose unsafe word comes after a list (so no set of texts can
    spell it out), the fixed text that ends it: the first-token recipe counts the verdict
    once this text, inside one of the branch's fixed texts, is written ("" if none)."""

    parts: tuple[Part, ...]
    says: frozenset[str] = frozenset()
    open_end: bool = False
    first_word: str = ""

    @property
    def lists(self) -> tuple[Labels, ...]:
        """The branch's lists, in the order it writes them."""
        return tuple(p for p in self.parts if isinstance(p, Labels))

    @property
    def labels(self) -> Labels | None:
        """The slotted list (the one the slot estimators read), if any."""
        return next((p for p in self.lists if p.slotted), None)


@dataclass(frozen=True, slots=True)
class Thread:
    """A place in one branch: part ``part`` (``len(parts)``: the branch is done), ``offset``
    characters into a text part or into a list's separator, the current list's closed labels
    ``done`` (by index), the label being written ``buffer``, and the labels of the lists
    already passed, one tuple per list (``closed``)."""

    branch: int
    part: int = 0
    offset: int = 0
    done: tuple[int, ...] = ()
    buffer: str = ""
    closed: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True, slots=True)
class ParserState:
    """The threads still alive, and for the first-word estimator the verdict's first characters
    and whether the text has written a branch's ``first_word`` (a fact of the text: the
    thread that wrote it may end while another branch with the same characters goes on)."""

    threads: tuple[Thread, ...]
    head: str = ""
    worded: bool = False


@dataclass(frozen=True, slots=True)
class Verdict:
    """A whole verdict: its branch, the outcomes it names, the labels of its slotted list in
    order (outcome names), and every list's labels in the order the branch writes them
    (``lists``; may be left empty for a branch whose one list is ``labels``)."""

    branch: int
    outcomes: frozenset[str]
    labels: tuple[str, ...] = ()
    lists: tuple[tuple[str, ...], ...] = ()

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
    first_words: the texts a verdict that the first-token recipe counts as unsafe begins with
    (a branch's ``first_word`` adds the verdicts whose unsafe word comes after a list).
    """

    def __init__(self, branches: Sequence[Branch], outcomes: Sequence[str], first_words: Sequence[str]):
        # empty texts say nothing and would only hold a thread in place
        self.branches = tuple(Branch(tuple(p for p in b.parts if p != ""), b.says, b.open_end, b.first_word)
                              for b in branches)
        self.outcomes = tuple(outcomes)
        self.index = {name: i for i, name in enumerate(self.outcomes)}
        if UNSAFE not in self.index:
            raise GrammarError(f"a verdict language needs the outcome {UNSAFE!r} (what P(unsafe) measures)")
        named = {o for b in self.branches for o in b.says} | {o for b in self.branches for p in b.lists for o in p.outcomes}
        missing = sorted(named - set(self.index))
        if missing:
            raise GrammarError(f"verdict branches name outcomes {missing!r} the language does not list")
        for b in self.branches:
            if sum(p.slotted for p in b.lists) > 1:
                raise GrammarError("a verdict branch has at most one slotted list (the one the slot estimators read)")
            for p in b.lists:
                if not p.words or len(set(p.words)) != len(p.words) or not p.sep:
                    raise GrammarError("a list of labels needs distinct words and a separator")
        listed = {o for b in self.branches if b.labels for o in b.labels.outcomes}
        # outcomes a branch chooses (a field's value, or a label of a list that is not
        # slotted), each scored where its choice is made
        self.choices = tuple(o for o in self.outcomes if o != UNSAFE and o in named and o not in listed)
        self.first_words = tuple(first_words)
        self._head_length = max((len(w) for w in self.first_words), default=0)
        self._marks = tuple(_first_word_end(b) for b in self.branches)
        self._marked = any(m is not None for m in self._marks)
        chars = set()
        for b in self.branches:
            for p in b.parts:
                chars.update(p.sep + "".join(p.words) if isinstance(p, Labels) else p)
        self.alphabet = frozenset(chars)
        # per branch: (part index, outcome indices of its labels) of each list, and which list is slotted
        self._lists = tuple(
            tuple((i, tuple(self.index[o] for o in p.outcomes)) for i, p in enumerate(b.parts) if isinstance(p, Labels))
            for b in self.branches)
        self._slotted = tuple(
            next(((j, i) for j, (i, _) in enumerate(lists) if b.parts[i].slotted), None)
            for b, lists in zip(self.branches, self._lists))
        self._by_prefix: dict[tuple[int, int, str], tuple[int, ...]] = {}
        self._facts: dict[ParserState, StateFacts] = {}
        threads = tuple(_normal(self, Thread(i)) for i in range(len(self.branches)))
        self.root = ParserState(threads, "", self._worded(threads))

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
        return ParserState(tuple(threads), head, state.worded or self._worded(threads))

    def _worded(self, threads: Sequence[Thread]) -> bool:
        """Whether some thread is past its branch's first word."""
        return self._marked and any(self._past(t) is True for t in threads)

    def _past(self, t: Thread) -> bool | None:
        """Whether ``t`` is past its branch's first word (None: its branch has none)."""
        mark = self._marks[t.branch]
        return None if mark is None else (t.part, t.offset) >= mark

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
            return [_normal(self, Thread(t.branch, t.part, t.offset + 1, t.done, "", t.closed))]
        if t.offset:  # inside the separator
            if part.sep[t.offset] != char:
                return []
            return [_normal(self, Thread(t.branch, t.part, t.offset + 1, t.done, "", t.closed))]
        out = []
        buffer = t.buffer + char
        if self._matches(t, part, buffer):
            out.append(Thread(t.branch, t.part, 0, t.done, buffer, t.closed))
        closing = self._closing(t, part)
        if closing is not None:
            done = t.done + (closing,)
            if part.sep[0] == char and len(done) < len(part.words):
                out.append(_normal(self, Thread(t.branch, t.part, 1, done, "", t.closed)))
            # the list is over: its labels join the closed lists
            out += self._step(_normal(self, Thread(t.branch, t.part + 1, 0, (), "", t.closed + (done,))), char)
        return out

    def _matches(self, t: Thread, part: Labels, buffer: str) -> tuple[int, ...]:
        """The labels not yet written that begin with ``buffer``."""
        key = (t.branch, t.part, buffer)
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
    def _ending(self, t: Thread) -> tuple[tuple[int, ...], ...] | None:
        """The labels of each list of the verdict that ends on thread ``t`` now, or None if
        it cannot end."""
        parts = self.branches[t.branch].parts
        if t.part == len(parts):
            return t.closed
        part = parts[t.part]
        if t.part == len(parts) - 1 and isinstance(part, Labels) and not t.offset:
            closing = self._closing(t, part)
            if closing is not None:
                return t.closed + (t.done + (closing,),)
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
            lists = self._ending(t)
            if lists is not None:
                branch = self.branches[t.branch]
                names = tuple(tuple(p.outcomes[i] for i in labels) for p, labels in zip(branch.lists, lists))
                slotted = self._slotted[t.branch]
                labels = names[slotted[0]] if slotted is not None else ()
                return Verdict(t.branch, branch.says.union(*names), labels, names)
        raise GrammarError("no verdict ends at this state")

    def named(self, state: ParserState) -> frozenset[int]:
        """The outcome indices the verdict that ends at ``state`` names (``can_end(state)``)."""
        return frozenset(self.index[o] for o in self.verdict(state).outcomes)

    def write(self, verdict: Verdict) -> str:
        """The text of a verdict (as the model writes it)."""
        branch = self.branches[verdict.branch]
        lists = iter(verdict.lists or (verdict.labels,))
        out = []
        for p in branch.parts:
            if isinstance(p, Labels):
                out.append(p.sep.join(p.words[p.outcomes.index(o)] for o in next(lists)))
            else:
                out.append(p)
        return "".join(out)

    # -- what a state already says (docs/design.md, section 4) --------------------------------------
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
        """A thread's clauses and reachable outcomes, over every list of its branch: a closed
        label is a clause; a list still ahead (it writes at least one label, since a list that
        may be left out is another branch) and the label being written each give a clause of
        the labels they may still write."""
        branch = self.branches[t.branch]
        said = {self.index[o] for o in branch.says}
        clauses = [frozenset({k}) for k in sorted(said)]
        reachable = set(said)
        for j, (at, word) in enumerate(self._lists[t.branch]):
            labels: Labels = branch.parts[at]  # type: ignore[assignment]
            closed = t.closed[j] if at < t.part else t.done if at == t.part else ()
            written = [word[i] for i in closed]
            clauses += [frozenset({k}) for k in written]
            reachable.update(written)
            remaining = [i for i in range(len(labels.words)) if i not in closed]
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
        """What ``state`` says about the label in position ``slot`` of the slotted list."""
        facts = [self._thread_slot(t, slot) for t in state.threads]
        closed = {f.closed for f in facts}
        sure = {f.sure for f in facts}
        return SlotFacts(
            closed.pop() if len(closed) == 1 else None,
            sure.pop() if len(sure) == 1 else None,
            frozenset().union(*(f.possible for f in facts)),
        )

    def _thread_slot(self, t: Thread, slot: int) -> SlotFacts:
        slotted = self._slotted[t.branch]
        if slotted is None:
            return SlotFacts(None, None, frozenset())
        j, at = slotted
        labels: Labels = self.branches[t.branch].parts[at]  # type: ignore[assignment]
        names = labels.outcomes
        done = t.closed[j] if at < t.part else t.done if at == t.part else ()
        if slot < len(done):
            return SlotFacts(names[done[slot]], names[done[slot]], frozenset({names[done[slot]]}))
        remaining = [i for i in range(len(names)) if i not in done]
        if t.part > at or len(remaining) < slot - len(done) + 1:
            return SlotFacts(None, None, frozenset())  # the list ended, or too few labels left
        if t.part < at or t.offset:
            return SlotFacts(None, None, frozenset(names[i] for i in remaining))
        current = self._matches(t, labels, t.buffer)
        if slot == len(done):
            return SlotFacts(None, names[current[0]] if len(current) == 1 else None,
                             frozenset(names[i] for i in current))
        # later positions hold labels that are left once the current one closes
        later = [i for i in remaining if len(current) > 1 or i not in current]
        enough = len(later) >= slot - len(done)
        return SlotFacts(None, None, frozenset(names[i] for i in later) if enough else frozenset())

    def slot_begun(self, state: ParserState, slot: int) -> bool:
        """Whether the label in position ``slot`` of the slotted list has begun on some thread
        (the text the verdict has written reaches into it)."""
        return any(self._thread_begun(t, slot) for t in state.threads)

    def _thread_begun(self, t: Thread, slot: int) -> bool:
        slotted = self._slotted[t.branch]
        if slotted is None:
            return False  # a branch without a slotted list never begins one
        at = slotted[1]
        if t.part != at:
            return t.part > at
        return len(t.done) > slot or (len(t.done) == slot and t.buffer != "")

    def first_word(self, state: ParserState) -> bool | None:
        """Whether the verdict's text begins with its unsafe word (one of ``first_words``, or
        a branch's text up to its ``first_word``): True once written, False once it cannot,
        None while undecided."""
        head = state.head
        if state.worded or any(head.startswith(w) for w in self.first_words):
            return True
        if any(w.startswith(head) for w in self.first_words) or any(self._past(t) is False for t in state.threads):
            return None
        return False


_FACTS_LIMIT = 200_000


def _order(t: Thread) -> tuple:
    return (t.branch, t.part, t.offset, t.done, t.buffer, t.closed)


def _first_word_end(branch: Branch) -> tuple[int, int] | None:
    """(part, offset) just after ``branch.first_word`` in its fixed texts, or None if it has none."""
    if not branch.first_word:
        return None
    for i, p in enumerate(branch.parts):
        if isinstance(p, str) and branch.first_word in p:
            return (i, p.index(branch.first_word) + len(branch.first_word))
    raise GrammarError(f"a branch's first word {branch.first_word!r} is not in one of its fixed texts")


def _normal(language: Language, t: Thread) -> Thread:
    """A thread at the end of a text part moves to the start of the next part."""
    parts = language.branches[t.branch].parts
    while t.part < len(parts):
        part = parts[t.part]
        if isinstance(part, Labels):
            if t.offset == len(part.sep):
                return Thread(t.branch, t.part, 0, t.done, "", t.closed)
            return t
        if t.offset < len(part):
            return t
        t = Thread(t.branch, t.part + 1, 0, t.done, "", t.closed)
    return t
