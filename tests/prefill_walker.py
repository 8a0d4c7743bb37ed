"""The first-id walk as the baselines ran it before they read the search's tree: a walker of
its own over a second engine session. Kept here as a reference for ``baselines.first_id``.

From the root it takes the most probable allowed token that keeps to the unsafe verdict's head
(asking the model at every step, forced tokens too) until the parser stands at the list's
common prefix; below that node it renormalises over the grammar's candidates at every node,
counts a first id once the parser closes it and drops open nodes below ``eps``. It always
renormalises, whatever the search's mode.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from guardprob.backends.base import Prompt, Query
from guardprob.core.grammar import TokenGrammar
from guardprob.core.prefill import unsafe_list
from guardprob.evaluation.baselines import FirstId, _measures
from guardprob.formats.language import UNSAFE, ParserState


def walk_first_ids(classifier, prompts: Sequence[Prompt], eps: float = 1e-4, role: str = "user") -> list[FirstId]:
    """P(first id = k | model-written unsafe head + common id prefix) for each prompt, batched."""
    grammar: TokenGrammar = classifier.grammar_for(role)
    language = grammar.language
    words = unsafe_list(language).words
    ids = list(classifier.taxonomy.ids)
    target = os.path.commonprefix(list(words))
    session = classifier.backend.open(list(prompts))
    try:
        nodes = _prefill_paths(session, grammar, len(prompts), target)
        logits = [None] * len(prompts)
        probs = [dict.fromkeys(ids, 0.0) for _ in prompts]
        frontier = [(b, path, state, 1.0) for b, (path, state) in enumerate(nodes)]
        first = True
        while frontier:
            transitions = [grammar.transitions(state) for _, _, state, _ in frontier]
            answers = session.next_tokens([Query(b, path, t.candidates) for (b, path, _, _), t in zip(frontier, transitions)])
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
    return [_measures(p, lg) for p, lg in zip(probs, logits)]


def _add(probs: dict[str, float], label: str, mass: float) -> None:
    if label in probs:
        probs[label] += mass


def _prefill_paths(session, grammar: TokenGrammar, n: int, target: str) -> list[tuple[tuple[int, ...], ParserState]]:
    language = grammar.language
    done = [((), grammar.root) for _ in range(n)]
    todo = list(range(n))
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
        left = []
        for b, (path, _), t, answer in zip(todo, states, transitions, answers):
            lp = np.nan_to_num(np.asarray(answer.logprobs[: t.n_tokens], dtype=float), nan=-np.inf)
            ok = [j for j in range(t.n_tokens) if allowed(t.next_states[j])]
            j = max(ok, key=lambda i: lp[i])
            done[b] = (path + (int(t.candidates[j]),), t.next_states[j])
            if not arrived(done[b][1]):
                left.append(b)
        todo = left
    return done


def _renormalise(logprobs: np.ndarray) -> np.ndarray:
    lp = np.nan_to_num(np.asarray(logprobs, dtype=float), nan=-np.inf)
    top = lp.max()
    if not np.isfinite(top):
        return np.zeros_like(lp)
    w = np.exp(lp - top)
    return w / w.sum()
