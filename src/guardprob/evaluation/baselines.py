"""The literature baselines of docs/design.md, section 3.

prefill: write the unsafe verdict's text up to its list plus the labels' common prefix
  (Llama Guard: ``unsafe\\n`` and ``S``) as the model would, then read the distribution of
  the *first id*: P(first id = k | prefix). The prefix path is chosen by the model among the
  tokens the grammar allows (so tokenization is the model's own), and the first id is read
  from the grammar's parser states below it, never by matching decoded text. Multi-token ids
  (S1 vs S10) are followed until the parser closes the id (a comma or EOS), so the result is
  independent of how ids are split. Mass below ``FIRST_ID_EPS`` of the prefix node's is left
  out and the rest renormalised.
entropy / max_prob / logtoku: predict the top-1 id of that distribution, or the top-2 ids
  when an uncertainty measure exceeds a switch threshold fitted on the development split.
  Uncertainty: the entropy of the first-id distribution; 1 - its largest probability; and
  LogTokU's epistemic uncertainty K / (sum_k max(logit_k, 0) + K) over the top-K (K=2) raw
  logits of the tokens at the prefill node (Ma et al. 2025, "Estimating LLM uncertainty with
  logits"). They are label-set baselines: a category scores 1 if selected, else 0. As in the
  paper, the prefill presumes the row unsafe, so every row gets one or two ids; their
  safe/unsafe decision (binary metrics) is the first-token P(unsafe).

The walk costs no search of its own: the estimators' search expands the prefill path and the
nodes below it (``SearchConfig.first_id``, prefill.py), and ``first_id`` reads them from the tree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from guardprob.core.prefill import PrefillRule, Way, shares, unsafe_list
from guardprob.core.tree import Node, Tree
from guardprob.errors import InputError
from guardprob.formats.language import Language, ParserState

SELECTION = ("entropy", "max_prob", "logtoku")
BASELINES = ("prefill", *SELECTION)
LOGTOKU_K = 2
FIRST_ID_EPS = 1e-4  # the first-id walk's eps, relative to the prefill node
_NO_LIST = ("the prefill baselines read the first category of an unsafe verdict's list; this "
            "format's unsafe verdicts have no single list of categories, so compare with the estimators only")
_NO_PREFIX = ("the prefill baselines read the first category after a prefix that leads to the unsafe verdict's "
              "list alone; in this format another verdict may follow every such prefix, so compare with the estimators only")


@dataclass(frozen=True)
class FirstId:
    """The first-id distribution of one prompt, and the uncertainty measures read from it."""

    probabilities: dict[str, float]  # id -> P(first id = id | prefix), normalised over ids
    entropy: float
    max_prob: float  # uncertainty 1 - max p
    logtoku: float  # epistemic uncertainty (NaN when the engine reports no logits)
    logtoku_aleatoric: float

    def as_dict(self) -> dict:
        return {
            "p": self.probabilities, "entropy": self.entropy, "max_prob": self.max_prob,
            "logtoku": self.logtoku, "logtoku_aleatoric": self.logtoku_aleatoric,
        }


def check_baselines(classifier: Any, roles: Sequence[str] = ("user",)) -> None:
    """Refuse, before any search, a format whose verdicts for ``roles`` have no single unsafe
    list (among them the formats that ask one question per category)."""
    if classifier.per_category:
        raise InputError(_NO_LIST)
    for role in sorted(set(roles)):
        _rule(classifier.grammar_for(role).language)


def _rule(language: Language) -> PrefillRule:
    rule = PrefillRule.of(language)
    if rule is None:
        raise InputError(_NO_LIST if unsafe_list(language) is None else _NO_PREFIX)
    return rule


def first_id(tree: Tree, ids: Sequence[str]) -> FirstId:
    """P(first id = k | model-written unsafe head + common id prefix) over ``ids``, read from a
    tree searched with ``SearchConfig.first_id`` (its eps)."""
    rule = _rule(tree.grammar.language)
    if tree.config.first_id is None:
        raise InputError("this tree was searched without the first-id walk; search with first_id set "
                         f"(the baselines use {FIRST_ID_EPS})")
    probs = dict.fromkeys(ids, 0.0)
    arrival = _arrival(tree, rule)
    if arrival is not None:
        _read_below(arrival, rule, tree.config.first_id, probs)
    return _measures(probs, tree.first_logits)


def _arrival(tree: Tree, rule: PrefillRule) -> Node | None:
    """The node where the prefill path arrives (None: a search stopped before it did)."""
    node = tree.root
    while True:
        way = rule.way(tree.grammar, node)
        if way is Way.ARRIVED:
            return node
        child = rule.next(node) if way is Way.ON else None
        if child is None:
            if not node.expanded:
                return None
            raise InputError("the verdict grammar cannot write the unsafe verdict's head with this tokenizer; "
                             "the prefill baseline needs it")
        node = child


def _read_below(arrival: Node, rule: PrefillRule, eps: float, probs: dict[str, float]) -> None:
    """Add to ``probs`` each first id's share of the arrival node, as the walk follows it (the
    same rule the search expanded by: closed ids count, open nodes below eps are left out)."""
    language = rule.language
    stack = [(arrival, 1.0)]
    while stack:
        node, share = stack.pop()
        closed = rule.closed(node.state)
        if closed is not None:  # closed by tokens the grammar forced
            _add(probs, closed, share)
            continue
        children, end = shares(node)  # none where the node was not expanded (a search stopped early)
        if end:
            _add(probs, _first_label(language, node.state), share * end)
        for child, s in children:
            mass = share * s
            closed = rule.closed(child.entry)
            if closed is not None:
                _add(probs, closed, mass)
            elif mass >= eps:
                stack.append((child, mass))


def _first_label(language: Language, state: ParserState) -> str | None:
    labels = language.verdict(state).labels
    return labels[0] if labels else None


def _add(probs: dict[str, float], label: str | None, mass: float) -> None:
    if label in probs:  # a label that is not a category (a list's own "none" word) counts nowhere
        probs[label] += mass


def _measures(probs: dict[str, float], logits: np.ndarray | None) -> FirstId:
    total = sum(probs.values())
    p = {k: float(v / total) if total > 0 else 0.0 for k, v in probs.items()}
    values = np.array(list(p.values()))
    nz = values[values > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    eu, au = logtoku(logits) if logits is not None and len(logits) else (float("nan"), float("nan"))
    return FirstId(p, entropy, float(1.0 - values.max()), eu, au)


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
