"""The literature baselines of DESIGN.md section 3.

prefill: write the unsafe verdict's text up to its list plus the labels' common prefix
  (Llama Guard: ``unsafe\\n`` and ``S``) as the model would, then read the distribution of
  the *first id*: P(first id = k | prefix). The prefix
  path is chosen by the model among the tokens the grammar allows (so tokenization is the
  model's own), and the first id is read from the grammar's parser states below it, never
  by matching decoded text. Multi-token ids (S1 vs S10) are followed until the parser
  closes the id (a comma or EOS), so the result is independent of how ids are split.
entropy / max_prob / logtoku: predict the top-1 id of that distribution, or the top-2 ids
  when an uncertainty measure exceeds a switch threshold fitted on the development split.
  Uncertainty: the entropy of the first-id distribution; 1 - its largest probability; and
  LogTokU's epistemic uncertainty K / (sum_k max(logit_k, 0) + K) over the top-K (K=2) raw
  logits of the tokens at the prefill node (Ma et al. 2025, "Estimating LLM uncertainty with
  logits"). They are label-set baselines: a category scores 1 if selected, else 0. As in the
  paper, the prefill presumes the row unsafe, so every row gets one or two ids; their
  safe/unsafe decision (binary metrics) is the first-token P(unsafe).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from guardprob.backends.base import Prompt, Query
from guardprob.errors import InputError
from guardprob.formats.language import UNSAFE, Labels, Language, ParserState
from guardprob.grammar import TokenGrammar

SELECTION = ("entropy", "max_prob", "logtoku")
BASELINES = ("prefill", *SELECTION)
LOGTOKU_K = 2


@dataclass(frozen=True)
class FirstId:
    """The first-id distribution of one prompt, and the uncertainty measures read from it."""

    probabilities: dict[str, float]  # id -> P(first id = id | prefix), normalised over ids
    entropy: float
    max_prob: float  # uncertainty 1 - max p
    logtoku: float  # epistemic uncertainty (NaN when the engine reports no logits)
    logtoku_aleatoric: float
    model_calls: int

    def as_dict(self) -> dict:
        return {
            "p": self.probabilities, "entropy": self.entropy, "max_prob": self.max_prob,
            "logtoku": self.logtoku, "logtoku_aleatoric": self.logtoku_aleatoric,
        }


def first_id_distributions(classifier, prompts: Sequence[Prompt], eps: float = 1e-4) -> list[FirstId]:
    """P(first id = k | model-written unsafe head + common id prefix) for each prompt, batched."""
    grammar: TokenGrammar = classifier.grammar_for("user")
    language = grammar.language
    words = _unsafe_list(language).words
    ids = list(classifier.taxonomy.ids)
    target = os.path.commonprefix(list(words))
    session = classifier.backend.open(list(prompts))
    try:
        nodes, calls = _prefill_paths(session, grammar, len(prompts), target)
        logits = [None] * len(prompts)
        probs = [dict.fromkeys(ids, 0.0) for _ in prompts]
        frontier = [(b, path, state, 1.0) for b, (path, state) in enumerate(nodes)]
        first = True
        while frontier:
            transitions = [grammar.transitions(state) for _, _, state, _ in frontier]
            answers = session.next_tokens([Query(b, path, t.candidates) for (b, path, _, _), t in zip(frontier, transitions)])
            calls += 1
            nxt = []
            for (b, path, state, mass), t, answer in zip(frontier, transitions, answers):
                if first:
                    logits[b] = None if answer.logits is None else np.asarray(answer.logits)[: t.n_tokens]
                q = _renormalise(answer.logprobs)
                for j, token in enumerate(t.candidates):
                    m = mass * q[j]
                    if j >= t.n_tokens:
                        _add(probs[b], language.verdict(state).labels[0], m)
                        continue
                    child = t.next_states[j]
                    closed = language.slot_facts(child, 0).closed
                    if closed is not None:
                        _add(probs[b], closed, m)
                    elif m >= eps:
                        nxt.append((b, path + (int(token),), child, m))
            frontier, first = nxt, False
    finally:
        session.close()
    return [_measures(p, lg, calls) for p, lg in zip(probs, logits)]


def _add(probs: dict[str, float], label: str, mass: float) -> None:
    if label in probs:  # a label that is not a category (a list's own "none" word) counts nowhere
        probs[label] += mass


def _unsafe_list(language: Language) -> Labels:
    """The list of the language's unsafe verdicts (what the first-id baselines read)."""
    lists = {b.labels for b in language.branches if UNSAFE in b.says and b.labels is not None}
    if len(lists) != 1:
        raise InputError("the prefill baselines read the first category of an unsafe verdict's list; this "
                         "format's unsafe verdicts have no single list of categories, so compare with the estimators only")
    return lists.pop()


def _prefill_paths(session, grammar: TokenGrammar, n: int, target: str) -> tuple[list[tuple[tuple[int, ...], ParserState]], int]:
    """Walk every prompt to the state where the unsafe verdict's list begins with ``target``,
    taking the most probable allowed token."""
    language = grammar.language
    done = [((), grammar.root) for _ in range(n)]
    todo = list(range(n))
    calls = 0
    unsafe = {i for i, b in enumerate(language.branches) if UNSAFE in b.says and b.labels is not None}
    at = {i: language.branches[i].parts.index(language.branches[i].labels) for i in unsafe}

    def on_the_way(t) -> bool:
        return t.branch in unsafe and (t.part < at[t.branch] or (
            t.part == at[t.branch] and not t.done and not t.offset and target.startswith(t.buffer)))

    def arrived(s: ParserState) -> bool:
        return all(on_the_way(t) and t.part == at[t.branch] and t.buffer == target for t in s.threads)

    def allowed(s: ParserState) -> bool:
        return any(on_the_way(t) for t in s.threads)

    while todo:
        states = [done[b] for b in todo]
        transitions = [grammar.transitions(s) for _, s in states]
        answers = session.next_tokens([Query(b, p, t.candidates) for b, (p, _), t in zip(todo, states, transitions)])
        calls += 1
        left = []
        for b, (path, _), t, answer in zip(todo, states, transitions, answers):
            lp = np.nan_to_num(np.asarray(answer.logprobs[: t.n_tokens], dtype=float), nan=-np.inf)
            ok = [j for j in range(t.n_tokens) if allowed(t.next_states[j])]
            if not ok:
                raise InputError("the verdict grammar cannot write the unsafe verdict's head with this tokenizer; "
                                 "the prefill baseline needs it")
            j = max(ok, key=lambda i: lp[i])
            done[b] = (path + (int(t.candidates[j]),), t.next_states[j])
            if not arrived(done[b][1]):
                left.append(b)
        todo = left
    return done, calls


def _renormalise(logprobs: np.ndarray) -> np.ndarray:
    lp = np.nan_to_num(np.asarray(logprobs, dtype=float), nan=-np.inf)
    top = lp.max()
    if not np.isfinite(top):
        return np.zeros_like(lp)
    w = np.exp(lp - top)
    return w / w.sum()


def _measures(probs: dict[str, float], logits: np.ndarray | None, calls: int) -> FirstId:
    total = sum(probs.values())
    p = {k: float(v / total) if total > 0 else 0.0 for k, v in probs.items()}
    values = np.array(list(p.values()))
    nz = values[values > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    eu, au = logtoku(logits) if logits is not None and len(logits) else (float("nan"), float("nan"))
    return FirstId(p, entropy, float(1.0 - values.max()), eu, au, calls)


def logtoku(logits: np.ndarray, k: int = LOGTOKU_K) -> tuple[float, float]:
    """(epistemic, aleatoric) uncertainty of LogTokU from raw logits [n] (top-k used).

    Evidence alpha_i = max(logit_i, 0) of the top-k logits, alpha_0 = sum alpha_i;
    EU = k / (alpha_0 + k); AU = -sum (alpha_i / alpha_0) (psi(alpha_i + 1) - psi(alpha_0 + 1)).
    """
    from scipy.special import digamma

    top = np.sort(np.asarray(logits, dtype=float))[::-1][:k]
    alpha = np.maximum(top, 0.0)
    a0 = float(alpha.sum())
    eu = len(top) / (a0 + len(top))
    au = 0.0 if a0 == 0 else float(-((alpha / a0) * (digamma(alpha + 1) - digamma(a0 + 1))).sum())
    return float(eu), au


# -- selection ----------------------------------------------------------------------------
def select(probabilities: dict[str, float], uncertainty: float, threshold: float) -> tuple[str, ...]:
    """Top-1 id, or top-2 when ``uncertainty > threshold``."""
    ranked = sorted(probabilities, key=lambda k: -probabilities[k])
    return tuple(ranked[: 2 if (math.isfinite(uncertainty) and uncertainty > threshold) else 1])


def selection_scores(
    probs: np.ndarray, uncertainty: np.ndarray, unsafe: np.ndarray | None, threshold: float
) -> np.ndarray:
    """[n, k] 0/1 scores of the selection rule for first-id distributions probs [n, k];
    rows where ``unsafe`` [n] is False (if given) select nothing."""
    order = np.argsort(-probs, axis=1, kind="stable")
    out = np.zeros_like(probs)
    rows = np.arange(len(probs))
    out[rows, order[:, 0]] = 1.0
    two = np.nan_to_num(uncertainty, nan=-np.inf) > threshold
    out[rows[two], order[two, 1]] = 1.0
    if unsafe is not None:
        out[~np.asarray(unsafe, dtype=bool)] = 0.0
    return out


def fit_switch_threshold(y: np.ndarray, probs: np.ndarray, uncertainty: np.ndarray, unsafe: np.ndarray | None = None) -> float:
    """The switch threshold that maximises micro F1 on the development split (y, probs [n, k]).

    Candidates are the observed uncertainties (and +inf: never switch, -inf: always); ties go to the
    largest threshold, i.e. the fewest top-2 predictions.
    """
    from sklearn.metrics import f1_score

    finite = np.unique(uncertainty[np.isfinite(uncertainty)])
    best, best_f1 = float("inf"), -1.0
    for t in [float("inf"), *finite[::-1].tolist(), float("-inf")]:
        f1 = f1_score(y, selection_scores(probs, uncertainty, unsafe, t).astype(int), average="micro", zero_division=0)
        if f1 > best_f1 + 1e-12:
            best, best_f1 = t, f1
    return best
