"""The public entry point: a guard model, a taxonomy and a template, scored per category."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from guardprob.backends.base import Backend, Prompt
from guardprob.conversation import ConversationLike, judged_role, to_messages
from guardprob.errors import ContextLengthError, InputError
from guardprob.estimators import METHODS, check_groups, check_method, estimate
from guardprob.grammar import TokenGrammar, VerdictGrammar, Vocabulary
from guardprob.prior import TreePrior
from guardprob.result import Scores
from guardprob.search import GREEDY_PATH_METHODS, SearchConfig, SearchRun, Tree, search
from guardprob.taxonomy import Taxonomy, load_taxonomy
from guardprob.templates import LlamaGuardTemplate, Template, load_template

# The estimators that read the greedy path need no wider search than the greedy path and
# the nodes that decide their own values (SearchConfig.exact_greedy).
_GREEDY_ONLY = SearchConfig(eps=1.0)
_PRIORS = 8  # search settings whose recent trees a classifier keeps
Groups = Mapping[str, Sequence[str]]


def token_ids(value: int | Sequence[int] | None) -> list[int]:
    """An eos_token_id setting (one id, a list, or None) as a list."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class Classifier:
    """Scores conversations with a generative guard model.

    >>> clf = Classifier.from_pretrained()            # the offline default model
    >>> clf.score("How do I make a pipe bomb?").p_unsafe
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        taxonomy: str | Path | Taxonomy | None = None,
        template: str | Path | Template = "auto",
        *,
        backend: Backend | None = None,
        eos_ids: Sequence[int] = (),
        name: str | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self._priors: dict[SearchConfig, TreePrior] = {}
        self._priors_lock = threading.Lock()
        self.name = name or getattr(getattr(model, "config", None), "name_or_path", "") or "model"
        self.template = load_template(template, self.name, tokenizer)
        if taxonomy is None:
            guard = isinstance(self.template, LlamaGuardTemplate) and self.template.name == "llama-guard-2"
            taxonomy = "llama-guard-2" if guard else "llama-guard-3"
        self.taxonomy = load_taxonomy(taxonomy)
        if backend is None:
            from guardprob.backends.transformers import TransformersBackend

            backend = TransformersBackend(model)
        self.backend = backend
        eos = set(eos_ids)
        generation = getattr(model, "generation_config", None)
        eos.update(token_ids(getattr(generation, "eos_token_id", None)))
        self.grammar = TokenGrammar(VerdictGrammar(self.taxonomy.ids), Vocabulary.from_tokenizer(tokenizer, sorted(eos)))
        # The longest verdict: "unsafe\n" and every id with its comma, one token per character at worst.
        self._verdict_budget = len("unsafe\n") + sum(len(i) + 1 for i in self.taxonomy.ids) + 1

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | None = None,
        taxonomy: str | Path | Taxonomy | None = None,
        template: str | Path | Template = "auto",
        *,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> Classifier:
        """Load a model directory or hub id with transformers (None: the offline default model)."""
        from guardprob import models

        model, tokenizer, name = models.load(name_or_path, device=device, dtype=dtype)
        return cls(model, tokenizer, taxonomy, template, name=name)

    # -- rendering --------------------------------------------------------------------
    def prompt(self, conversation: ConversationLike, role: str | None = None) -> Prompt:
        messages = to_messages(conversation)
        prompt = self.template.render(messages, judged_role(messages, role), self.taxonomy, self.tokenizer)
        return self._check_length(prompt)

    def render(self, conversation: ConversationLike, role: str | None = None) -> list[int]:
        """The prompt ids for a conversation; the verdict starts right after them."""
        return list(self.prompt(conversation, role).ids)

    def _check_length(self, prompt: Prompt) -> Prompt:
        limit = self.backend.max_context
        if limit is not None and len(prompt.ids) + self._verdict_budget > limit:
            raise ContextLengthError(
                f"the prompt has {len(prompt.ids)} tokens and the verdict may need {self._verdict_budget} more, "
                f"past the model's context of {limit}; shorten the conversation"
            )
        return prompt

    def _prompt_from_ids(self, prompt_ids: Iterable[int]) -> Prompt:
        ids = tuple(prompt_ids)
        size = len(self.grammar.vocabulary.texts)
        if not ids:
            raise InputError("prompt_ids is empty; pass the ids of a rendered prompt (see Classifier.render)")
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < size]
        if bad:
            raise InputError(f"prompt_ids holds {bad[:5]!r}, not token ids of this tokenizer (0..{size - 1})")
        shared = next((len(p) for p in self._shared_prefixes() if ids[: len(p)] == p and len(ids) > len(p)), 0)
        return self._check_length(Prompt(ids, shared))

    def _shared_prefixes(self) -> list[tuple[int, ...]]:
        """The template's shared prefix for each judged role, so rendered ids reuse its cache too."""
        if not hasattr(self, "_prefix_ids"):
            probes = ("x", [{"role": "user", "content": "x"}, {"role": "assistant", "content": "x"}])
            rendered = [self.template.render(to_messages(p), judged_role(to_messages(p), None), self.taxonomy, self.tokenizer) for p in probes]
            self._prefix_ids = [r.ids[: r.shared_prefix] for r in rendered if r.shared_prefix]
        return self._prefix_ids

    # -- scoring ----------------------------------------------------------------------
    def search_config(self, method: str | Sequence[str] = "marginal", **params: Any) -> SearchConfig:
        """The search one method (or several, from one search) needs, with any of SearchConfig's
        fields overridden; ``max_nodes=None`` and ``max_depth=None`` mean no limit."""
        methods = (method,) if isinstance(method, str) else tuple(method)
        for m in methods:
            check_method(m)
        base = SearchConfig() if "marginal" in methods else _GREEDY_ONLY
        base = replace(base, exact_greedy=tuple(m for m in GREEDY_PATH_METHODS if m in methods))
        unknown = set(params) - set(SearchConfig.__dataclass_fields__)
        if unknown:
            raise InputError(
                f"unknown search parameter(s) {', '.join(sorted(unknown))}; use "
                f"{', '.join(SearchConfig.__dataclass_fields__)}"
            )
        return replace(base, **params)

    def search(self, prompts: Sequence[Prompt], config: SearchConfig) -> list[Tree]:
        """Search the verdict trees of rendered prompts, all in one batched run."""
        return search(self.backend, prompts, self.grammar, config, self.prior(config))

    def start(
        self, prompts: Sequence[Prompt], methods: Sequence[str] = ("marginal",), *, groups: Groups | None = None,
        **params: Any,
    ) -> ScoringRun:
        """A batched scoring run that advances one model call per ``step()``: for a scheduler that
        interleaves runs and stops prompts whose time is up (the moderation service)."""
        methods = tuple(methods)
        groups = check_groups(groups, self.taxonomy)  # before the search, so a bad group costs nothing
        config = self.search_config(methods, **params)
        opened = time.perf_counter()
        run = SearchRun(self.backend, prompts, self.grammar, config, self.prior(config))  # the prefill
        return ScoringRun(self, run, methods, groups, time.perf_counter() - opened)

    def prior(self, config: SearchConfig) -> TreePrior:
        """What this classifier's recent searches at ``config``'s settings expanded, which the
        next search asks ahead (speculation settings aside: they do not change the tree)."""
        key = replace(config, speculate=0, prior=0.0)
        with self._priors_lock:
            prior = self._priors.pop(key) if key in self._priors else TreePrior()
            self._priors[key] = prior  # the most recently used last
            while len(self._priors) > _PRIORS:
                self._priors.pop(next(iter(self._priors)))
        return prior

    def score(
        self, conversation: ConversationLike, method: str = "marginal", *, role: str | None = None,
        groups: Groups | None = None, deadline: float | None = None, **params: Any,
    ) -> Scores:
        """Per-category probabilities for one conversation (a string is one user message).

        groups: named unions of categories, e.g. ``{"violence": ["S1", "S9"]}``, scored as
        P(the verdict names any of them) with bounds (``Scores.groups``).
        deadline: seconds; the search stops after the model call under way then and answers
        with the bounds reached (``Scores.complete`` False) instead of going on."""
        return self.score_batch([conversation], method, role=role, groups=groups, deadline=deadline, **params)[0]

    def score_ids(
        self, prompt_ids: Iterable[int], method: str = "marginal", *, groups: Groups | None = None, **params: Any,
    ) -> Scores:
        """Score a prompt that is already rendered (its ids end where the verdict starts)."""
        prompt = self._prompt_from_ids(prompt_ids)
        return self._score_prompts([prompt], (method,), params, groups)[0][method]

    def score_batch(
        self,
        conversations: Sequence[ConversationLike],
        method: str = "marginal",
        *,
        role: str | None = None,
        batch_size: int = 16,
        groups: Groups | None = None,
        deadline: float | None = None,
        **params: Any,
    ) -> list[Scores]:
        """Score many conversations; ``batch_size`` of them share each model call."""
        return [
            r[method]
            for r in self.score_methods(conversations, (method,), role=role, batch_size=batch_size, groups=groups,
                                        deadline=deadline, **params)
        ]

    def score_methods(
        self,
        conversations: Sequence[ConversationLike],
        methods: Sequence[str] = METHODS,
        *,
        role: str | None = None,
        batch_size: int = 16,
        groups: Groups | None = None,
        deadline: float | None = None,
        **params: Any,
    ) -> list[dict[str, Scores]]:
        """Every requested estimator from one search per conversation (``deadline``: seconds for
        all of them, see ``score``)."""
        if isinstance(conversations, str):
            raise InputError("score_methods/score_batch take a list of conversations; use score() for one string")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size={batch_size!r}: use a positive integer")
        if deadline is not None and not (isinstance(deadline, (int, float)) and deadline > 0 and math.isfinite(deadline)):
            raise InputError(f"deadline={deadline!r}: give a number of seconds > 0")
        until = None if deadline is None else time.monotonic() + deadline
        prompts = [self.prompt(c, role) for c in conversations]
        out: list[dict[str, Scores]] = []
        for start in range(0, len(prompts), batch_size):
            out.extend(self._score_prompts(prompts[start : start + batch_size], methods, params, groups, until))
        return out

    def score_prompts(
        self, prompts: Sequence[Prompt], methods: Sequence[str] = ("marginal",), *, groups: Groups | None = None,
        **params: Any,
    ) -> list[dict[str, Scores]]:
        """Score rendered prompts (see ``prompt``) in one batched search: a dict per prompt, by method."""
        return self._score_prompts(list(prompts), methods, params, groups)

    def _score_prompts(
        self, prompts: list[Prompt], methods: Sequence[str], params: dict, groups: Groups | None = None,
        deadline: float | None = None,
    ) -> list[dict[str, Scores]]:
        run = self.start(prompts, methods, groups=groups, **params)
        try:
            while run.step():
                if deadline is not None and time.monotonic() >= deadline:
                    run.stop_all()
        finally:
            run.close()
        return run.results()


class ScoringRun:
    """A classifier's batched search that a scheduler advances one model call at a time."""

    def __init__(self, classifier: Classifier, run: SearchRun, methods: tuple[str, ...], groups: dict, seconds: float):
        self._classifier, self._run, self.methods, self._groups = classifier, run, methods, groups
        self._seconds = seconds  # model time so far: the prefill, then each step

    def step(self) -> bool:
        """One model call for every unfinished prompt; False once all are done."""
        started = time.perf_counter()
        try:
            return self._run.step()
        finally:
            self._seconds += time.perf_counter() - started

    def stop(self, prompt: int) -> None:
        """End prompt ``prompt``'s search after this call, with the bounds reached (incomplete)."""
        self._run.stop(prompt)

    def stop_all(self) -> None:
        self._run.stop_all()

    def close(self) -> None:
        self._run.close()

    def results(self) -> list[dict[str, Scores]]:
        """A dict of Scores by method per prompt (the run must be done)."""
        trees = self._run.trees()
        seconds = self._seconds / max(len(trees), 1)
        return [{m: estimate(t, m, self._classifier.taxonomy, seconds, self._groups) for m in self.methods} for t in trees]
