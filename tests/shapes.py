"""Hypothesis strategies for the request shapes guardprob's entry points take (OpenAI chat,
text completions, the Responses API, moderations, Anthropic messages), with marker phrases in
the places a model reads text. Every marker is ``zqmark<n>q``: nothing else in a payload (roles,
types, ids, URLs) can hold one, so the markers in ``json.dumps(payload)`` are the texts to judge."""

from __future__ import annotations

import json
import re

from hypothesis import strategies as st

MARKER = re.compile(r"zqmark\d+q")
FILLER = st.sampled_from(["", " ", "hello there", "What is the capital of France?", "ok\n", "Ünïcödé ✓"])
markers = st.integers(0, 10**6).map(lambda n: f"zqmark{n}q")
texts = st.one_of(FILLER, markers, st.builds(lambda a, m, b: f"{a} {m} {b}", FILLER, markers, FILLER))

USER_ROLES = ("user", "human", "system", "developer", "tool", "function")
ASSISTANT_ROLES = ("assistant", "ai", "bot", "model")
cases = st.sampled_from([str.lower, str.upper, str.title])


def role(names: tuple[str, ...]) -> st.SearchStrategy[str]:
    return st.builds(lambda name, case: case(name), st.sampled_from(names), cases)


IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
text_parts = st.builds(lambda kind, t: {"type": kind, "text": t}, st.sampled_from(["text", "input_text", "output_text"]), texts)
parts = st.one_of(text_parts, st.just(IMAGE), st.just({"type": "input_image", "image_url": "https://example.com/c.png"}))
contents = st.one_of(texts, parts, st.lists(parts, min_size=1, max_size=3), st.lists(texts, min_size=1, max_size=2))


def tool_call(arguments: str) -> dict:
    return {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": json.dumps({"q": arguments})}}


chat_messages = st.one_of(
    st.builds(lambda r, c: {"role": r, "content": c}, role(USER_ROLES + ASSISTANT_ROLES), contents),
    st.builds(lambda r, c, a: {"role": r, "content": c, "tool_calls": [tool_call(a)]}, role(ASSISTANT_ROLES),
              st.one_of(st.none(), texts), texts),
    st.builds(lambda c: {"role": "tool", "tool_call_id": "call_1", "content": c}, contents),
    st.builds(lambda c, a: {"role": "assistant", "content": c, "function_call": {"name": "f", "arguments": a}},
              st.none(), texts),
)
chat = st.builds(lambda m: {"model": "m", "messages": m}, st.lists(chat_messages, min_size=1, max_size=5))

token_ids = st.lists(st.integers(0, 50_000), min_size=1, max_size=4)
completion = st.builds(
    lambda p, s: {"model": "m", "prompt": p, **({"suffix": s} if s is not None else {})},
    st.one_of(texts, st.lists(texts, min_size=1, max_size=3), token_ids, st.lists(st.one_of(texts, token_ids), min_size=1, max_size=3)),
    st.one_of(st.none(), texts),
)

response_items = st.one_of(
    st.builds(lambda r, c: {"role": r, "content": c}, role(("user", "system", "developer", "assistant")), contents),
    st.builds(lambda r, c: {"type": "message", "role": r, "content": c}, role(("user", "assistant")), contents),
    st.builds(lambda a: {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": json.dumps({"q": a})}, texts),
    st.builds(lambda o: {"type": "function_call_output", "call_id": "c1", "output": o}, texts),
    st.builds(lambda t: {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": t}]}, texts),
)
responses = st.builds(
    lambda i, instructions: {"model": "m", "input": i, **({"instructions": instructions} if instructions is not None else {})},
    st.one_of(texts, st.lists(response_items, min_size=1, max_size=4)), st.one_of(st.none(), texts),
)
moderation = st.builds(lambda i: {"input": i}, st.one_of(texts, st.lists(texts, min_size=1, max_size=3),
                                                      st.lists(parts, min_size=1, max_size=3)))
anthropic = st.builds(
    lambda system, question, result, argument: {"model": "m", "system": system, "messages": [
        {"role": "user", "content": [{"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "lookup", "input": {"q": argument}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": result}]}]},
    st.one_of(texts, st.lists(text_parts, min_size=1, max_size=2)), texts, texts, texts,
)
requests = st.one_of(chat, completion, responses, moderation, anthropic)


def markers_in(value: object) -> set[str]:
    return set(MARKER.findall(json.dumps(value, ensure_ascii=False)))


def holds_unreadable(payload: dict) -> bool:
    """Whether the payload holds something that is not text: an image part or token ids."""

    def ids(value: object) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(x, int) for x in value)

    prompts = [payload.get("prompt"), payload.get("input")]
    tokens = any(ids(p) or isinstance(p, list) and any(ids(x) for x in p) for p in prompts)
    return tokens or "image_url" in json.dumps(payload)
