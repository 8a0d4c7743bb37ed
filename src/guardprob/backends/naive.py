"""The per-node baseline: every node re-runs the whole prompt plus its path, with no cache.

This is what the paper's reference code costs (one full pass per node, about N x P tokens).
It exists to measure against (``guardprob bench``) and as a test oracle; never use it to score.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from guardprob.backends.base import NextToken, Prompt, Query, Usage, check_prompts
from guardprob.backends.transformers import _answer, flush_denormals


class NaiveBackend:
    name = "naive"
    joinable = True  # sessions take prompts between rounds (Session.add)

    def __init__(self, model: Any):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        flush_denormals(self.device)  # the same float mode as the engine it is compared with
        self.max_context = getattr(model.config.get_text_config(), "max_position_embeddings", None)

    def open(self, prompts: Sequence[Prompt]) -> NaiveSession:
        check_prompts(prompts, int(self.model.get_output_embeddings().weight.shape[0]), self.max_context)
        return NaiveSession(self, prompts)


class NaiveSession:
    def __init__(self, backend: NaiveBackend, prompts: Sequence[Prompt]):
        self.backend = backend
        self.prompts = prompts
        self.usage = Usage()

    def add(self, prompts: Sequence[Prompt]) -> int:
        """More prompts between rounds (continuous batching); the index of the first."""
        self.backend.open(prompts)  # the same checks
        base = len(self.prompts)
        self.prompts = (*self.prompts, *prompts)
        return base

    @torch.inference_mode()
    def next_tokens(self, queries: Sequence[Query]) -> list[NextToken]:
        answers = []
        for q in queries:
            ids = torch.tensor([self.prompts[q.prompt].ids + q.path], device=self.backend.device)
            logits = self.backend.model(input_ids=ids, use_cache=False).logits[0, -1].float()
            self.usage.model_calls += 1
            self.usage.tokens += ids.shape[1]
            answers.append(_answer(logits, q.candidates))
        return answers

    def close(self) -> None:
        self.prompts = ()
