"""The public entry point: a guard model, a taxonomy and a format, scored per category."""

from __future__ import annotations

import functools
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from guardprob.backends.base import Backend, Prompt, begin
from guardprob.backends.registry import build_engine
from guardprob.backends.settings import token_ids
from guardprob.core.decision import DecisionRule
from guardprob.core.estimators import METHODS, check_groups, check_method
from guardprob.core.grammar import TokenGrammar, Vocabulary
from guardprob.core.prior import TreePrior
from guardprob.core.reasoning import (
    GREEDY_TRACE,
    Reasoning,
    TraceConfig,
    TraceWriter,
)
from guardprob.core.runs import ScoringPool, ScoringRun, SearchPlan
from guardprob.core.search import SearchRun, search
from guardprob.core.tree import GREEDY_PATH_METHODS, SearchConfig, Tree
from guardprob.deprecations import renamed_keyword
from guardprob.errors import Cancelled, ContextLengthError, InputError, RoundCancelled
from guardprob.formats import Format, detect, load_format, load_taxonomy
from guardprob.formats.base import encode_parts
from guardprob.formats.length import check_characters, context_tokens, longest_token
from guardprob.inputs.conversation import ConversationLike, judged_role, to_messages
from guardprob.options import deadline as deadlines
from guardprob.options.score import ScoreOptions
from guardprob.options.table import RUN, option
from guardprob.result import Scores
from guardprob.spec import ClassifierSpec
from guardprob.taxonomy import Taxonomy

# The estimators that read the greedy path need no wider search than the greedy path and
# the nodes that decide their own values (SearchConfig.exact_greedy).
_GREEDY_ONLY = SearchConfig(eps=1.0)
_PRIORS = 8  # search settings whose recent trees a classifier keeps
# A certified decision searches until it is decided, not to a mass: no eps, top_p or tolerance unless
# asked; and no guesses from history, whose every remembered node (eps 0) would cost tokens past the decision.
_DECIDING = {"eps": 0.0, "top_p": 1.0, "tolerance": 0.0, "prior": 0.0}
Groups = Mapping[str, Sequence[str]]
Thresholds = float | Mapping[str, float] | None


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
        format: str | Path | Format = "auto",
        *,
        backend: Backend | None = None,
        eos_ids: Sequence[int] = (),
        name: str | None = None,
        template: str | Path | Format | None = None,
    ):
        """``format``: a registered name (``guardprob formats`` lists them), ``auto`` (from the
        model's name and tokenizer; ``format_reason`` says why), a format file or a Format.
        ``template``: the older name of ``format`` (deprecated)."""
        format = renamed_keyword("Classifier", "template", template, "format", format, "auto")
        self.model = model
        self.tokenizer = tokenizer
        self._priors: dict[SearchConfig, TreePrior] = {}
        self._priors_lock = threading.Lock()
        self.name = name or getattr(getattr(model, "config", None), "name_or_path", "") or "model"
        spec = format
        self.format_reason = "asked for"
        if spec == "auto":
            spec, self.format_reason = detect(self.name, tokenizer)
        self.format = load_format(spec, self.name, tokenizer)
        self.taxonomy = load_taxonomy(self.format.taxonomy if taxonomy is None else taxonomy)
        if backend is None:
            from guardprob.backends.transformers import TransformersBackend

            backend = TransformersBackend(model)
        self.backend = backend
        eos = set(eos_ids)
        generation = getattr(model, "generation_config", None)
        eos.update(token_ids(getattr(generation, "eos_token_id", None)))
        self.vocabulary = Vocabulary.from_tokenizer(tokenizer, sorted(eos), self.format.verdict_tokens(self.taxonomy))
        # a format that asks one question per category (ShieldGemma, Granite Guardian)
        self.per_category = self.format.per_category
        self._grammars: dict[tuple[str, str | None], TokenGrammar] = {}
        first = self.taxonomy.ids[0] if self.per_category else None
        self.grammar = self.grammar_for("user", first)  # compiled now, so a tokenizer that cannot spell it fails here
        self.grammar_for("assistant", first)
        # The longest verdict, one token per character at worst.
        self._verdict_budget = max(g.language.longest for g in self._grammars.values()) + 1

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | None = None,
        taxonomy: str | Path | Taxonomy | None = None,
        format: str | Path | Format = "auto",
        *,
        device: str = "cpu",
        dtype: str = "float32",
        template: str | Path | Format | None = None,
    ) -> Classifier:
        """Load a model directory or hub id with transformers (None: the offline default model).
        ``template``: the older name of ``format`` (deprecated)."""
        format = renamed_keyword("Classifier.from_pretrained", "template", template, "format", format, "auto")
        return cls.from_spec(ClassifierSpec(name_or_path, taxonomy, format, device=device, dtype=dtype))

    @classmethod
    def from_spec(cls, spec: ClassifierSpec) -> Classifier:
        """Build what a ``ClassifierSpec`` describes (the CLI, the server and Ray workers build this way)."""
        engine = build_engine(spec)
        return cls(engine.model, engine.tokenizer, spec.taxonomy, spec.format, backend=engine.backend,
                   eos_ids=engine.eos_ids, name=engine.name)

    @property
    def template(self) -> Format:
        """The older name of ``format`` (deprecated)."""
        warnings.warn("Classifier.template is deprecated, use Classifier.format (the same object); "
                      "template will be removed in a future release", DeprecationWarning, stacklevel=2)
        return self.format

    def grammar_for(self, role: str, category: str | None = None) -> TokenGrammar:
        """The compiled verdict language for prompts that judge ``role``'s message (and, for a
        format that asks per category, for the question about ``category``)."""
        key = (role, category)
        if key not in self._grammars:
            language = self.format.language(self.asked(category), role)
            same = next((g for g in self._grammars.values() if g.language == language), None)
            self._grammars[key] = same or TokenGrammar(language, self.vocabulary)
        return self._grammars[key]

    def asked(self, category: str | None) -> Taxonomy:
        """The taxonomy a question is about: the whole one, or one category of it."""
        return self.taxonomy if category is None else Taxonomy(self.taxonomy.name, (self.taxonomy[category],))

    def _plan(self, prompts: Sequence[Prompt]) -> tuple[list, list[TokenGrammar], list[tuple[int, str | None]]]:
        """The searches of a batch: (prompt, tokens the tree starts after), grammar, and whose
        they are (prompt, category asked about; None for the whole verdict)."""
        roots, grammars, owners = [], [], []
        for i, p in enumerate(prompts):
            for category, suffix in p.questions or ((None, ()),):
                roots.append((i, suffix))
                grammars.append(self.grammar_for(p.role, category))
                owners.append((i, category))
        return roots, grammars, owners

    # -- rendering --------------------------------------------------------------------
    def prompt(self, conversation: ConversationLike, role: str | None = None) -> Prompt:
        messages = to_messages(conversation)
        check_characters(messages, *self._character_bound)  # before the tokenizer reads a byte (formats/length.py)
        prompt = self.format.render(messages, judged_role(messages, role), self.taxonomy, self.tokenizer)
        return self._check_length(prompt)

    def render(self, conversation: ConversationLike, role: str | None = None) -> list[int]:
        """The prompt ids for a conversation; the verdict starts right after them."""
        return list(self.prompt(conversation, role).ids)

    @functools.cached_property
    def _character_bound(self) -> tuple[int, int, str]:
        """(context tokens, longest token's characters, where the context comes from)."""
        context, source = context_tokens(self.backend.max_context, self.tokenizer)
        return context, longest_token(self.vocabulary.texts), source

    def _check_length(self, prompt: Prompt) -> Prompt:
        limit = self.backend.max_context
        size = len(prompt.ids) + max((len(q) for _, q in prompt.questions), default=0)
        if limit is not None and size + self._verdict_budget > limit:
            raise ContextLengthError(
                f"the prompt has {size} tokens and the verdict may need {self._verdict_budget} more, "
                f"past the model's context of {limit}; shorten the conversation"
            )
        return prompt

    def _prompt_from_ids(self, prompt_ids: Iterable[int], role: str = "user") -> Prompt:
        ids = tuple(prompt_ids)
        size = len(self.grammar.vocabulary.texts)
        if not ids:
            raise InputError("prompt_ids is empty; pass the ids of a rendered prompt (see Classifier.render)")
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < size]
        if bad:
            raise InputError(f"prompt_ids holds {bad[:5]!r}, not token ids of this tokenizer (0..{size - 1})")
        shared = next((len(p) for p in self._shared_prefixes() if ids[: len(p)] == p and len(ids) > len(p)), 0)
        if role not in ("user", "assistant"):
            raise InputError(f"role={role!r}: use 'user' or 'assistant' (whose message the prompt judges)")
        return self._check_length(Prompt(ids, shared, role))

    def _shared_prefixes(self) -> list[tuple[int, ...]]:
        """The format's shared prefix for each judged role, so rendered ids reuse its cache too."""
        if not hasattr(self, "_prefix_ids"):
            probes = ("x", [{"role": "user", "content": "x"}, {"role": "assistant", "content": "x"}])
            rendered = [self.format.render(to_messages(p), judged_role(to_messages(p), None), self.taxonomy, self.tokenizer) for p in probes]
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
        """Search the verdict trees of rendered prompts, all in one batched run (a tree per
        question for a format that asks per category)."""
        roots, grammars, _ = self._plan(prompts)
        return search(self.backend, prompts, grammars, config, self.prior(config), roots)

    def start(
        self, prompts: Sequence[Prompt], methods: Sequence[str] = ("marginal",), *, groups: Groups | None = None,
        decide: bool | DecisionRule = False, thresholds: Thresholds = None, calibration: Any = None,
        pool: ScoringPool | None = None, round_nodes: int | None = None, options: ScoreOptions | None = None,
        **params: Any,
    ) -> ScoringRun:
        """A batched scoring run that advances one model call per ``step()``: for a scheduler that
        interleaves runs and stops prompts whose time is up (the moderation service).
        ``decide``: see ``score``. ``pool``: join that pool's running search instead (``ScoringPool``).
        ``round_nodes``: at most that many tree nodes per model call (shared fairly by the run's
        searches), so that no step of a large run holds a scheduler's worker for long; None: each
        search takes its ``batch``. ``options``: the ScoreOptions to score with, instead of
        ``decide``, ``thresholds``, ``calibration`` and the search and trace keyword arguments."""
        methods = tuple(methods)
        groups = check_groups(groups, self.taxonomy)  # before the search, so a bad group costs nothing
        if groups and self.per_category:
            raise InputError(
                f"groups score the verdicts that name any of several categories; format {self.format.name!r} asks about "
                "each category in a question of its own, so no verdict names several: leave groups out"
            )
        if options is None:
            options = self.options(methods, groups=groups, decide=decide, thresholds=thresholds,
                                   calibration=calibration, **params)
        elif params or decide is not False or thresholds is not None or calibration is not None:
            raise InputError("give the options either as one ScoreOptions (options=) or as keyword arguments, not both")
        return self.open(prompts, options.search, methods, groups=groups, trace=options.trace,
                         decision=options.decision, pool=pool, round_nodes=round_nodes)

    def options(
        self, methods: str | Sequence[str] = ("marginal",), *, groups: Groups | None = None,
        decide: bool | DecisionRule = False, thresholds: Thresholds = None, calibration: Any = None, **params: Any,
    ) -> ScoreOptions:
        """The one options object a scoring call carries (guardprob.options.score), from its keyword
        arguments: the search and trace options of the table (guardprob.options.table), each
        checked once, here, and the decision (see ``score``)."""
        methods = (methods,) if isinstance(methods, str) else tuple(methods)
        params = dict(params)
        trace = TraceConfig.pop(params)
        rule = self.decision_rule(decide, thresholds, calibration, groups, methods, trace)
        if rule is not None:
            params = {**_DECIDING, **params}
        return ScoreOptions(self.search_config(methods, **params), trace, rule)

    @property
    def joinable(self) -> bool:
        """True when the engine's sessions take prompts mid-run, so that requests can join a
        running search (``ScoringPool``, continuous batching)."""
        return bool(getattr(self.backend, "joinable", False))

    def pool(self, round_nodes: int | None = None) -> ScoringPool:
        """Continuous batching: runs that join one search between model calls (see ScoringPool)."""
        return ScoringPool(self, round_nodes)

    def decision_rule(
        self, decide: bool | DecisionRule, thresholds: Thresholds = None, calibration: Any = None,
        groups: Groups | None = None, methods: Sequence[str] = ("marginal",), trace: TraceConfig = GREEDY_TRACE,
    ) -> DecisionRule | None:
        """The thresholds a certified decision is taken on (None: no decision): ``decide`` may be
        a DecisionRule, or True with ``thresholds`` and ``calibration`` (a Calibration or its file)."""
        if decide is False or decide is None:
            if thresholds is not None or calibration is not None:
                raise InputError("thresholds and calibration set what decide=True decides on; pass decide=True too, "
                                 "or leave them out")
            return None
        if "marginal" not in methods:
            raise InputError(f"decide=True narrows the marginal's bounds until each threshold is decided; score with "
                             f"method='marginal' (asked: {', '.join(methods)})")
        if trace.traces > 1:
            raise InputError("decide=True certifies the flags of one search; a mean over sampled reasoning traces has "
                             "no single search to decide: leave traces out (the greedy reasoning is decided exactly)")
        if isinstance(decide, DecisionRule):
            return decide
        if decide is not True:
            raise InputError(f"decide={decide!r}: use True or False")
        if isinstance(calibration, (str, Path)):
            from guardprob.evaluation.calibration import load_calibration

            calibration = load_calibration(calibration, self.taxonomy)
        elif calibration is not None:
            calibration.check_taxonomy(self.taxonomy)
        return DecisionRule.build(self.taxonomy, thresholds, calibration, tuple(check_groups(groups, self.taxonomy)))

    @property
    def reasoning(self) -> Reasoning | None:
        """How the format's model reasons before its verdict (None: it answers at once)."""
        return self.format.reasoning

    def open(
        self, prompts: Sequence[Prompt], config: SearchConfig, methods: Sequence[str] = ("marginal",), *,
        groups: Groups | None = None, backend: Backend | None = None, prior: TreePrior | None = None,
        trace: TraceConfig = GREEDY_TRACE, decision: DecisionRule | None = None, pool: ScoringPool | None = None,
        round_nodes: int | None = None,
    ) -> ScoringRun:
        """``start`` at a given SearchConfig, on ``backend`` (default: the classifier's) and with
        ``prior`` (default: the classifier's own history at these settings). For a format that
        reasons first, the reasoning is written here (``trace``), before the verdict search.
        ``decision``: thresholds each search stops at once it has decided them. ``pool``: join
        its running search (the pool's engine) instead of opening one (the pool's ``round_nodes``
        then applies); ``round_nodes``: see ``start``."""
        if trace != GREEDY_TRACE and self.reasoning is None:
            raise InputError(f"format {self.format.name!r} answers without reasoning first, so traces, temperature, seed "
                             "and reasoning_tokens have nothing to act on; leave them out (or use a format that reasons)")
        roots, grammars, owners = self._plan(prompts)
        groups = check_groups(groups, self.taxonomy)
        engine = backend or self.backend
        opened = time.perf_counter()
        joined = pool.running if pool is not None else None
        if joined is not None:
            session, base = joined.session, joined.session.add(prompts)  # prefilled with the next call
        else:
            session, base = begin(engine, prompts), 0  # prefilled in the run's steps
        prior = self.prior(config) if prior is None else prior
        plan = SearchPlan(roots, grammars, owners, config, prior)
        if self.reasoning is not None:  # the verdict searches join once the reasoning is written
            roots, grammars, owners = [], [], []
        goals = None if decision is None else [decision.goal(g, groups, config.constrained) for g in grammars]
        if joined is not None:
            run, ids = joined, joined.attach(base, len(prompts), grammars, config, prior, roots, goals)
        elif pool is not None:
            run = SearchRun(engine, prompts, grammars, config, prior, roots, session=session, goals=goals,
                            round_nodes=pool.round_nodes, joinable=True)
            ids = list(run.searches)
        else:
            run = SearchRun(engine, prompts, grammars, config, prior, roots, session=session, goals=goals,
                            round_nodes=round_nodes)
            ids = list(run.searches)
        scoring = ScoringRun(self, run, ids, base=base, methods=tuple(methods), groups=groups,
                             seconds=time.perf_counter() - opened, owners=owners, trace=trace, decision=decision,
                             pool=pool)
        if self.reasoning is not None:
            writer = TraceWriter([(base + p, suffix) for p, suffix in plan.roots], self.reasoning, trace, self._piece,
                                 self._spell, self.vocabulary.eos_ids, len(self.vocabulary.texts))
            scoring.reason(writer, plan)
        if pool is not None:
            pool.admit(scoring, run if joined is None else None)
        return scoring

    def _piece(self, token: int) -> str:
        """A token's text as the model writes it (a control token as its own string)."""
        text = self.vocabulary.texts[token]
        return text if text is not None else self.tokenizer.decode([token])

    def _spell(self, text: str) -> tuple[int, ...]:
        return encode_parts(self.tokenizer, [(text, False)])

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
        groups: Groups | None = None, deadline: float | None = None, decide: bool | DecisionRule = False,
        thresholds: Thresholds = None, calibration: Any = None, **params: Any,
    ) -> Scores:
        """Per-category probabilities for one conversation (a string is one user message).

        groups: named unions of categories, e.g. ``{"violence": ["S1", "S9"]}``, scored as
        P(the verdict names any of them) with bounds (``Scores.groups``).
        deadline: seconds; the search stops after the model call under way then and answers
        with the bounds reached (``Scores.complete`` False) instead of going on.
        decide: stop as soon as every score lies wholly on one side of its threshold
        (``Scores.decision``: the flags the exhaustive search would give). thresholds: one
        probability for all, or category id / group name / ``"unsafe"`` -> probability (default
        0.5, or the calibration's); calibration: a Calibration or its file, whose calibrated scores
        the category thresholds apply to. cancel: a ``threading.Event``; once it is set the
        search stops at the next model call and raises ``guardprob.Cancelled`` (also taken by
        ``score_batch``, ``score_methods`` and ``stream``)."""
        return self.score_batch([conversation], method, role=role, groups=groups, deadline=deadline, decide=decide,
                                thresholds=thresholds, calibration=calibration, **params)[0]

    def stream(self, conversation: ConversationLike, chunks: Iterable[str], **score_kwargs: Any) -> Iterator[Scores | None]:
        """Judge an assistant answer while it is written: the scores after each chunk of
        ``chunks`` (None while the answer holds no text yet). ``conversation`` ends with the
        user's message, or with the answer begun; ``score_kwargs`` are ``score``'s (``decide=True``
        to cut an answer as soon as a flag is certified). With the transformers engine's prefix
        cache each chunk costs its own tokens, the template's closing text and the verdict search
        (streaming.py)."""
        from guardprob.core.streaming import stream

        return stream(self, conversation, chunks, **score_kwargs)

    def score_ids(
        self, prompt_ids: Iterable[int], method: str = "marginal", *, role: str = "user", groups: Groups | None = None,
        **params: Any,
    ) -> Scores:
        """Score a prompt that is already rendered (its ids end where the verdict starts);
        ``role``: whose message it judges, for formats whose verdicts depend on it."""
        prompt = self._prompt_from_ids(prompt_ids, role)
        return self._score_prompts([prompt], (method,), self.options(method, groups=groups, **params), groups)[0][method]

    def score_batch(
        self,
        conversations: Sequence[ConversationLike],
        method: str = "marginal",
        *,
        role: str | None = None,
        batch_size: int = 16,
        groups: Groups | None = None,
        deadline: float | None = None,
        decide: bool | DecisionRule = False,
        thresholds: Thresholds = None,
        calibration: Any = None,
        **params: Any,
    ) -> list[Scores]:
        """Score many conversations; ``batch_size`` of them share each model call."""
        return [
            r[method]
            for r in self.score_methods(conversations, (method,), role=role, batch_size=batch_size, groups=groups,
                                        deadline=deadline, decide=decide, thresholds=thresholds,
                                        calibration=calibration, **params)
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
        decide: bool | DecisionRule = False,
        thresholds: Thresholds = None,
        calibration: Any = None,
        cancel: threading.Event | None = None,
        **params: Any,
    ) -> list[dict[str, Scores]]:
        """Every requested estimator from one search per conversation (``deadline``: seconds for
        all of them; ``decide``, ``thresholds``, ``calibration``, ``cancel``: see ``score``)."""
        if isinstance(conversations, str):
            raise InputError("score_methods/score_batch take a list of conversations; use score() for one string")
        option(RUN, "batch_size").check(batch_size)  # the table's check (guardprob.options.table)
        if cancel is not None and not callable(getattr(cancel, "is_set", None)):
            raise InputError(f"cancel={cancel!r}: give a threading.Event (set it to stop the search)")
        answer_by = deadlines.answer_by(deadline)  # an instant on the deadlines' clock, from here down
        options = self.options(methods, groups=groups, decide=decide, thresholds=thresholds, calibration=calibration,
                               **params)  # the keyword arguments become one checked object, once
        prompts = [self.prompt(c, role) for c in conversations]
        out: list[dict[str, Scores]] = []
        for start in range(0, len(prompts), batch_size):
            out.extend(self._score_prompts(prompts[start : start + batch_size], methods, options, groups, answer_by, cancel))
        return out

    def score_prompts(
        self, prompts: Sequence[Prompt], methods: Sequence[str] = ("marginal",), *, groups: Groups | None = None,
        **params: Any,
    ) -> list[dict[str, Scores]]:
        """Score rendered prompts (see ``prompt``) in one batched search: a dict per prompt, by method."""
        return self._score_prompts(list(prompts), methods, self.options(methods, groups=groups, **params), groups)

    def _score_prompts(
        self, prompts: list[Prompt], methods: Sequence[str], options: ScoreOptions | Mapping[str, Any],
        groups: Groups | None = None, answer_by: float | None = None, cancel: threading.Event | None = None,
    ) -> list[dict[str, Scores]]:
        """``options``: a ScoreOptions (or keyword arguments, read into one); ``answer_by``: an
        instant on ``deadlines.now``'s clock."""
        _check_cancel(cancel)
        if not isinstance(options, ScoreOptions):
            options = self.options(methods, groups=groups, **options)
        run = self.start(prompts, methods, groups=groups, options=options)
        run.stop_on(cancel, answer_by)  # an engine that can stops a call in flight (HTTP rounds)
        try:
            while True:
                try:
                    more = run.step()
                except RoundCancelled:  # stopped in flight: by the cancel event, or at the deadline
                    _check_cancel(cancel)
                    run.stop_all()
                    break
                if not more:
                    break
                _check_cancel(cancel)
                if deadlines.passed(answer_by):
                    run.stop_all()
        finally:
            run.close()
        return run.results()


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("scoring was cancelled (its cancel event is set); no scores were computed")
