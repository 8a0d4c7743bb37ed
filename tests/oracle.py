"""An independent brute force for the bounds: every verdict token path, one forward pass per prefix.

Nothing here uses guardprob's grammar: the verdict language is written on strings from its
definition (``safe`` | ``unsafe\\n`` id (``,`` id)*, ids distinct, then EOS), and the model's
next-token distribution at every prefix is read from a plain full forward pass over
prompt + path. The quantities the estimators promise are summed over that tree.

``Setup`` draws a random taxonomy, a random tokenizer (every character plus multi-character
tokens that cross grammar boundaries, sometimes without some single characters, so that a
path can reach a state no token continues) and a random tiny Llama (sometimes trained for a
few steps on verdicts, so that unconstrained mass sits in the grammar).
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from guardprob import Category, Classifier, Taxonomy
from guardprob.core.estimators import METHODS
from helpers import budget, tiny_llama

HEAD = "unsafe\n"
PROMPT_CHARS = "ghijklmopqrtvwz ?"
_SPECIALS = ("<unk>", "<eos>", "<bos>")
CROSSING = ["un", "safe", "unsafe", "unsafe\n", ",S", "1,", "e\n", "\nS", "sa", "fe", "afe", "\na", ",a"]


# -- the verdict language on strings ---------------------------------------------------------
def parts_of(s: str) -> list[str] | None:
    """The comma-separated id list after the head, or None before it."""
    return s[len(HEAD):].split(",") if s.startswith(HEAD) else None


def is_prefix(s: str, ids: tuple[str, ...]) -> bool:
    """Whether some verdict string starts with ``s``."""
    if SAFE_WORD.startswith(s) or HEAD.startswith(s):
        return True
    parts = parts_of(s)
    if parts is None:
        return False
    *done, last = parts
    if len(set(done)) != len(done) or any(p not in ids for p in done):
        return False
    left = [i for i in ids if i not in done]
    return any(i.startswith(last) for i in left)


def complete(s: str, ids: tuple[str, ...]) -> tuple[bool, tuple[str, ...]] | None:
    """(unsafe, ids) if ``s`` is a whole verdict, else None."""
    if s == SAFE_WORD:
        return False, ()
    parts = parts_of(s)
    if parts is None or len(set(parts)) != len(parts) or any(p not in ids for p in parts):
        return None
    return True, tuple(parts)


SAFE_WORD = "safe"


# -- random set-ups ----------------------------------------------------------------------------
@dataclass
class Setup:
    seed: int
    ids: tuple[str, ...]
    vocab: dict[str, int]
    tokenizer: PreTrainedTokenizerFast
    model: torch.nn.Module
    prompt: list[int]
    trained: bool
    certified: bool  # too many ids to enumerate: the brute force stops below a mass floor
    groups: dict[str, list[str]] = field(default_factory=dict)

    @property
    def texts(self) -> dict[int, str]:
        return {i: t for t, i in self.vocab.items() if i > 2}

    @functools.cached_property
    def classifier(self) -> Classifier:
        taxonomy = Taxonomy("oracle", tuple(Category(i, f"category {i}") for i in self.ids))
        return Classifier(self.model, self.tokenizer, taxonomy=taxonomy, format="llama-guard-3", name="oracle")

    def describe(self) -> str:
        multi = sorted(t for t in self.vocab if len(t) > 1 and not t.startswith("<"))
        missing = sorted(set(verdict_alphabet(self.ids)) - set(self.vocab))
        return (f"seed={self.seed} ids={self.ids} trained={self.trained} multi-char tokens={multi!r} "
                f"single characters missing={missing!r}")


def verdict_alphabet(ids: tuple[str, ...]) -> str:
    return "".join(sorted(set(SAFE_WORD + HEAD + "," + "".join(ids))))


def random_ids(rng: random.Random, style: str) -> tuple[str, ...]:
    if style == "one":
        return (rng.choice(["S1", "a", "x12"]),)
    if style == "big":
        return tuple(f"S{i}" for i in range(1, 31))
    if style == "lg":
        pool = [f"S{i}" for i in range(1, 15)]
        ids = set(rng.sample(pool, rng.randint(1, 3)))
        if rng.random() < 0.7:
            ids |= {"S1", rng.choice(["S10", "S11", "S12"])}  # a prefix pair
        return tuple(sorted(ids))[:4]
    letters = "abxy" if style == "letters" else "ab12"
    ids: set[str] = set()
    while len(ids) < rng.randint(2, 3):
        word = "".join(rng.choice(letters) for _ in range(rng.randint(1, 3)))
        if style == "mixed" and word[0].isdigit():
            word = "c" + word
        ids.add(word)
        if rng.random() < 0.5 and len(word) < 3:
            ids.add(word + rng.choice(letters))  # an id that extends another
    return tuple(sorted(ids))[:4]


def segmentable(word: str, pieces: set[str]) -> bool:
    ok = [True] + [False] * len(word)
    for end in range(1, len(word) + 1):
        ok[end] = any(ok[start] and word[start:end] in pieces for start in range(end))
    return ok[-1]


def random_vocab(rng: random.Random, ids: tuple[str, ...]) -> dict[str, int]:
    chars = set(verdict_alphabet(ids)) | set(PROMPT_CHARS) | {"a"}
    pieces = set(chars)
    for _ in range(rng.randint(0, 8)):
        text = random_verdict(rng, ids)
        start = rng.randrange(len(text))
        pieces.add(text[start:start + rng.randint(2, 5)])
    pieces |= {t for t in rng.sample(CROSSING, rng.randint(0, 6)) if set(t) <= chars}
    pieces |= {i for i in ids if rng.random() < 0.5}
    if rng.random() < 0.3:  # drop single characters where every word stays spellable: dead ends
        droppable = sorted(set(verdict_alphabet(ids)) - {"a"})
        for char in rng.sample(droppable, min(3, len(droppable))):
            trial = pieces - {char}
            words = [SAFE_WORD, HEAD, ",", *ids]
            if all(segmentable(w, trial) for w in words):
                pieces = trial
    pieces = {p for p in pieces if p}
    vocab = {"<unk>": 0, "<eos>": 1, "<bos>": 2}
    for piece in sorted(pieces, key=lambda p: (len(p), p)):
        vocab.setdefault(piece, len(vocab))
    return vocab


def random_verdict(rng: random.Random, ids: tuple[str, ...]) -> str:
    if rng.random() < 0.3:
        return SAFE_WORD
    return HEAD + ",".join(rng.sample(ids, rng.randint(1, min(3, len(ids)))))


def tokenizer_for(vocab: dict[str, int]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", bos_token="<bos>",
                                   model_max_length=4096)


def random_segmentation(rng: random.Random, text: str, vocab: dict[str, int]) -> list[int]:
    out, at = [], 0
    while at < len(text):
        options = [p for p in vocab if len(p) <= len(text) - at and text.startswith(p, at) and p not in _SPECIALS]
        options = [p for p in options if segmentable(text[at + len(p):], set(vocab))] or options
        piece = rng.choice(options)
        out.append(vocab[piece])
        at += len(piece)
    return out


def train(model: torch.nn.Module, rng: random.Random, prompt: list[int], ids: tuple[str, ...], vocab: dict[str, int],
          steps: int = 25, favour: str | None = None) -> None:
    """A few Adam steps on prompt -> verdict, so that the model writes verdicts itself."""
    torch.manual_seed(rng.randrange(2**31))
    texts = [favour or random_verdict(rng, ids) for _ in range(12)]
    rows = [random_segmentation(rng, t, vocab) + [vocab["<eos>"]] for t in texts]
    width = max(map(len, rows))
    x = torch.tensor([prompt + r + [0] * (width - len(r)) for r in rows])
    target = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-2)
    model.train()
    for _ in range(steps):
        logits = model(input_ids=x).logits[:, len(prompt) - 1:-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()


STYLES = ("lg", "letters", "mixed", "one", "lg", "letters", "big")


@functools.cache
def setup(seed: int) -> Setup:
    rng = random.Random(seed)
    style = STYLES[seed % len(STYLES)]
    ids = random_ids(rng, style)
    vocab = random_vocab(rng, ids)
    model = tiny_llama(len(vocab), seed=seed)
    prompt = [vocab[c] for c in rng.choices(PROMPT_CHARS, k=rng.randint(4, 10))]
    trained = style == "big" or rng.random() < 0.5
    if trained:
        train(model, rng, prompt, ids, vocab)
    groups = {}
    if len(ids) >= 2:
        groups = {"g1": rng.sample(ids, 2), "all": list(ids)}
    return Setup(seed, ids, vocab, tokenizer_for(vocab), model, prompt, trained, style == "big", groups)


# -- the brute force ---------------------------------------------------------------------------
@dataclass
class BruteNode:
    path: tuple[int, ...]
    text: str
    mass: float
    end: float = 0.0
    children: list[BruteNode] = field(default_factory=list)
    expanded: bool = False
    greedy_child: BruteNode | None = None
    greedy: str = ""  # on the greedy path: "child", "end" or "invalid"


class TooLarge(Exception):
    pass


class BruteForce:
    """The whole verdict tree below a prompt (or every node above ``floor`` and the greedy path)."""

    def __init__(self, s: Setup, constrained: bool, floor: float = 0.0, limit: int | None = None):
        self.s, self.constrained, self.floor = s, constrained, floor
        self.eos = s.vocab["<eos>"]
        self.texts = s.texts
        self.root = BruteNode((), "", 1.0)
        self._allowed: dict[str, list[int]] = {}
        level, on_greedy = [self.root], {self.root.path}
        self.size = 0
        while level:
            self.size += len(level)
            if limit is not None and self.size > limit:
                raise TooLarge
            want = [n for n in level if n.path in on_greedy or n.mass > floor]
            following = []
            for node, logprobs in zip(want, self._forward(want)):
                following += self._expand(node, logprobs, node.path in on_greedy)
                if node.greedy_child is not None:
                    on_greedy.add(node.greedy_child.path)
            level = following

    def allowed(self, text: str) -> list[int]:
        if text not in self._allowed:
            ids = self.s.ids
            tokens = sorted(t for t, piece in self.texts.items() if is_prefix(text + piece, ids))
            self._allowed[text] = tokens + ([self.eos] if complete(text, ids) else [])
        return self._allowed[text]

    def _forward(self, nodes: list[BruteNode]) -> list[torch.Tensor]:
        if not nodes:
            return []
        rows = torch.tensor([self.s.prompt + list(n.path) for n in nodes])
        out = []
        with torch.no_grad():
            for chunk in rows.split(256):
                logits = self.s.model(input_ids=chunk).logits[:, -1].double()
                out += list(torch.log_softmax(logits, -1))
        return out

    def _expand(self, node: BruteNode, logprobs: torch.Tensor, greedy: bool) -> list[BruteNode]:
        node.expanded = True
        allowed = self.allowed(node.text)
        if not allowed:
            node.greedy = "invalid"
            return []  # a dead end: the mass goes nowhere
        lp = logprobs[allowed]
        q = torch.softmax(lp, -1) if self.constrained else lp.exp()
        best = int(torch.argmax(q))
        if greedy:
            if not self.constrained and float(logprobs.max()) > float(lp[best]) + 1e-9:
                node.greedy = "invalid"
            else:
                node.greedy = "end" if allowed[best] == self.eos else "child"
        out = []
        for i, token in enumerate(allowed):
            p = float(q[i]) * node.mass
            if token == self.eos:
                node.end = p
            elif p > 0:
                child = BruteNode(node.path + (token,), node.text + self.texts[token], p)
                node.children.append(child)
                out.append(child)
                if greedy and node.greedy == "child" and i == best:
                    node.greedy_child = child
        return out

    # -- the quantities ------------------------------------------------------------------------
    def interval(self, start: BruteNode, counts) -> tuple[float, float]:
        """[low, high] of a measure below ``start``. counts(text, ended) -> True (all of this node
        counts), False (none), None (look below); ``ended`` asks about a verdict ending at ``text``.
        Unexpanded mass (above the floor's cut) may count: it widens ``high``."""
        low = high = 0.0
        stack = [start]
        while stack:
            n = stack.pop()
            verdict = counts(n.text, False)
            if verdict is True:
                low += n.mass
                high += n.mass
                continue
            if verdict is False:
                continue
            if not n.expanded:
                high += n.mass
                continue
            if n.end and counts(n.text, True):
                low += n.end
                high += n.end
            stack.extend(n.children)
        return low, high

    def outcome(self, members: set[str] | None) -> tuple[float, float]:
        """P(verdict names any of ``members``); None: P(unsafe)."""
        ids = self.s.ids

        def counts(text: str, ended: bool):
            if not ended:
                return None
            verdict = complete(text, ids)
            return verdict[0] if members is None else bool(set(verdict[1]) & members)

        return self.interval(self.root, counts)

    def first_word(self) -> tuple[float, float]:
        def counts(text: str, ended: bool):
            if text.startswith("unsafe"):
                return True
            return None if "unsafe".startswith(text) else False

        return self.interval(self.root, counts)

    def greedy_path(self) -> list[BruteNode]:
        path = [self.root]
        while path[-1].greedy_child is not None:
            path.append(path[-1].greedy_child)
        return path

    def greedy_verdict(self) -> tuple[bool, tuple[str, ...]] | None:
        last = self.greedy_path()[-1]
        return complete(last.text, self.s.ids) if last.greedy == "end" else None

    def slot(self, position: int, category: str) -> tuple[float, float, float]:
        """(start mass, low, high) of P(the id in ``position`` is ``category``, with its terminator)
        below the deepest greedy prefix at which that id has not begun."""

        def begun(text: str) -> bool:
            parts = parts_of(text)
            return parts is not None and (len(parts) > position + 1 or (len(parts) == position + 1 and parts[-1] != ""))

        start = [n for n in self.greedy_path() if not begun(n.text)][-1]

        def counts(text: str, ended: bool):
            parts = parts_of(text)
            if ended:
                verdict = complete(text, self.s.ids)
                return len(verdict[1]) > position and verdict[1][position] == category
            if parts is not None and len(parts) > position + 1:
                return parts[position] == category
            return None

        low, high = self.interval(start, counts)
        return start.mass, low, high


EXACT_LIMIT = 6000  # nodes; a larger tree is cut at a mass floor and its quantities become intervals


@functools.cache
def brute(seed: int, constrained: bool) -> BruteForce:
    s = setup(seed)
    if not s.certified:
        try:
            return BruteForce(s, constrained, limit=EXACT_LIMIT)
        except TooLarge:
            s.certified = True
    return BruteForce(s, constrained, floor=2e-4)


def close(a: float, b: float, tol: float = 1e-6) -> bool:
    return math.isclose(a, b, abs_tol=tol)


# -- every estimator's bounds against the brute force (test_bounds_oracle, test_first_id) ------------
POOL = budget(28, 70)  # random set-ups (cached; settings vary freely)
SLACK = 2e-6  # float32 tree attention against float32 full forwards, summed over a tree

METHOD_SETS = [METHODS, ("marginal",), ("conditional",), ("first_token", "joint"), ("greedy", "marginal")]

configurations = st.fixed_dictionaries({
    "eps": st.sampled_from([0.0, 1e-4, 1e-3, 0.01, 0.05, 0.2, 1.0]),
    "top_p": st.sampled_from([1.0, 1.0, 0.99, 0.9, 0.5]),
    "max_nodes": st.sampled_from([None, None, 1, 3, 10, 50]),
    "max_depth": st.sampled_from([None, None, 2, 4, 8]),
    "tolerance": st.sampled_from([0.0, 0.0, 0.01, 0.3]),
    "batch": st.sampled_from([1, 2, 64]),
    "speculate": st.sampled_from([0, 1, 3]),
    "prior": st.sampled_from([0.0, 2.0, 8.0]),
    "constrained": st.booleans(),
    "stop_after": st.sampled_from([None, None, None, 1, 2, 4]),  # model calls before a deadline stops the run
})


def within(name: str, value: float, low: float, high: float) -> None:
    assert low - SLACK <= value <= high + SLACK, f"{name}: {value} outside [{low}, {high}]"


def check_interval(name: str, score, exact: tuple[float, float]) -> None:
    """The reported interval must contain the exact value (an interval itself for cut brute forces)."""
    assert score.lower <= score.p <= score.upper, f"{name}: p={score.p} outside its own bounds [{score.lower}, {score.upper}]"
    assert score.lower <= exact[1] + SLACK and score.upper >= exact[0] - SLACK, (
        f"{name}: bounds [{score.lower}, {score.upper}] miss the exact value {exact}"
    )


def check_against_brute_force(seed: int, config: dict, methods: tuple[str, ...]) -> None:
    """Every estimator in ``methods`` on set-up ``seed`` under ``config``, against the brute force."""
    s = setup(seed)
    bf = brute(seed, config["constrained"])
    if s.certified:  # keep the search finite where the tree is astronomically large
        config = {**config, "eps": max(config["eps"], 1e-3), "max_nodes": min(config["max_nodes"] or 300, 300)}
    clf = s.classifier
    prompt = clf._prompt_from_ids(s.prompt)
    stop_after = config.pop("stop_after", None)
    results = _scored(clf, prompt, methods, s.groups or None, config, stop_after)
    stopped = not next(iter(results.values())).complete
    uncut = config["max_nodes"] is None and config["max_depth"] is None and config["tolerance"] == 0 and not stopped
    exhaustive = uncut and config["eps"] == 0 and config["top_p"] == 1.0
    exact = not s.certified
    ids = s.ids
    unsafe = bf.outcome(None)
    for method, scores in results.items():
        where = f"{method} ({s.describe()}; {config})"
        within(f"p_unsafe {where}", scores.p_unsafe, scores.p_unsafe_lower, scores.p_unsafe_upper)
        check_interval(f"P(unsafe) {where}", _Bound(scores.p_unsafe, scores.p_unsafe_lower, scores.p_unsafe_upper), unsafe)
        assert scores.p_unsafe_upper - scores.p_unsafe_lower <= scores.unexplored_mass + SLACK
        for c in scores.categories.values():
            assert 0 - SLACK <= c.lower <= c.upper <= 1 + SLACK, (where, c)
        if method == "marginal":
            for k in ids:
                c = scores.categories[k]
                check_interval(f"marginal {k} {where}", c, bf.outcome({k}))
                assert c.upper - c.lower <= scores.unexplored_mass + SLACK, (where, c, scores.unexplored_mass)
                if exhaustive and exact:
                    assert abs(c.p - bf.outcome({k})[0]) <= 1e-6 and c.upper - c.lower <= 1e-9, (where, c)
            for name, members in s.groups.items():
                check_interval(f"group {name} {where}", scores.groups[name], bf.outcome(set(members)))
                if exhaustive and exact:
                    assert abs(scores.groups[name].p - bf.outcome(set(members))[0]) <= 1e-6
            if exhaustive and exact:
                assert abs(scores.p_unsafe - unsafe[0]) <= 1e-6 and scores.unexplored_mass <= 1e-9
        elif method == "greedy":
            verdict = bf.greedy_verdict()
            named = set(verdict[1]) if verdict else set()
            if stopped:  # the greedy path may be unfinished: each category's bounds must hold the truth
                for k in ids:
                    truth = float(k in named)
                    check_interval(f"greedy {k} {where}", scores.categories[k], (truth, truth))
            else:
                assert {k for k, c in scores.categories.items() if c.p == 1.0} == named, where
        elif method == "first_token":
            first = bf.first_word()
            for k in ids:
                check_interval(f"first_token {where}", scores.categories[k], first)
                if uncut and exact:
                    assert abs(scores.categories[k].p - first[0]) <= 1e-6 and scores.categories[k].upper - scores.categories[k].lower <= 1e-9, where
        else:
            verdict = bf.greedy_verdict()
            slots = dict((k, j) for j, k in enumerate(verdict[1])) if verdict else {}
            for k in ids:
                c = scores.categories[k]
                if k not in slots:
                    if stopped:  # an unfinished greedy path leaves the verdict, so this 0, unknown
                        check_interval(f"{method} {k} {where}", c, (0.0, 0.0))
                    else:
                        assert c.p == c.lower == c.upper == 0.0, (where, k)
                    continue
                mass, low, high = bf.slot(slots[k], k)
                truth = (low / mass, high / mass) if method == "conditional" else (low, high)
                check_interval(f"{method} {k} {where}", c, truth)
                if uncut and exact:
                    assert abs(c.p - truth[0]) <= 1e-6 and c.upper - c.lower <= 1e-6, (where, c, truth)


def _scored(clf, prompt, methods, groups, config, stop_after):
    """Every method's Scores, the run stopped after ``stop_after`` model calls (a deadline) if given."""
    if stop_after is None:
        return clf.score_prompts([prompt], methods, groups=groups, **config)[0]
    run = clf.start([prompt], methods, groups=groups, **config)
    calls = 0
    while run.step():
        calls += 1
        if calls == stop_after:
            run.stop_all()
    run.close()
    return run.results()[0]


class _Bound:
    def __init__(self, p: float, lower: float, upper: float):
        self.p, self.lower, self.upper = p, lower, upper

