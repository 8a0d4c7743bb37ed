"""Request models (pydantic) and the OpenAI error shape every failure is answered in.

Responses are plain dicts built in app.py; their fields are documented in docs/server.md.
Requests are strict: wrong JSON types are not coerced (``"0.1"`` is not a number) and
unknown fields are refused with 400, as the OpenAI API does.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ModerationRequest(_Strict):
    # a text, or a list of texts and parts: read (and refused where it is not text) by guardprob.inputs.reader
    input: str | list[Any]
    model: str | None = None


class ClassifyRequest(_Strict):
    # chat messages in any shape guardprob.inputs.reader takes (roles and aliases, parts, tool calls and results)
    messages: list[Any] | None = None
    input: str | None = None
    role: str | None = None
    method: str | None = None
    model: str | None = None
    eps: float | None = None
    top_p: float | None = None
    max_nodes: int | None = None
    max_depth: int | None = None
    deadline_ms: float | None = Field(default=None, gt=0, le=3_600_000)  # answer by then, with the bounds reached
    # formats that reason before the verdict: sampled traces (0: the greedy one), bounded per request
    traces: int | None = Field(default=None, ge=0, le=16)
    temperature: float | None = None
    seed: int | None = None
    reasoning_tokens: int | None = None
    decide: bool = False  # stop once every category's interval lies on one side of its threshold
    # streaming moderation: the answer's chunks, each scored with the answer so far (server-sent events)
    stream: bool = False
    chunks: list[str] | None = Field(default=None, max_length=10_000)


# -- errors -------------------------------------------------------------------------------
class ApiError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# the request models' own field names (a location's other parts are pydantic's union branch tags)
_FIELD_NAMES = {name for model in (ModerationRequest, ClassifyRequest) for name in model.model_fields}


def _param(loc: tuple) -> str | None:
    """('messages', 0, 'content') -> 'messages[0].content'; union branch tags ('str', 'TextPart') are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _FIELD_NAMES:
            out += f".{part}" if out else part
    return out or None


def validation_error(exc: ValidationError) -> ApiError:
    """The ApiError for a request body that failed to parse or validate (the first problem found)."""
    errors = exc.errors(include_url=False)
    for e in errors:
        if e["type"] == "json_invalid":
            return ApiError(400, f"the request body is not valid JSON: {e['msg']}", code="invalid_json")
    extra = next((e for e in errors if e["type"] == "extra_forbidden"), None)
    if extra is not None:
        parent, field = _param(extra["loc"][:-1]), str(extra["loc"][-1])
        name = f"{parent}.{field}" if parent else field
        return ApiError(400, f"Unrecognized request argument supplied: {name}", param=name, code="unknown_parameter")
    if any(e["type"] in ("model_type", "dict_type") and not e["loc"] for e in errors):
        return ApiError(400, "the request body must be a JSON object", code="invalid_json")
    # The most specific error: for input=["a", 3] the one at input[1], not the "not a string" branch.
    first = max(errors, key=lambda e: sum(isinstance(part, int) for part in e["loc"]))
    param = _param(first["loc"])
    if first["type"] == "missing":
        return ApiError(422, f"missing required field {param!r}", param=param, code="missing_field")
    if param == "input" or (param or "").startswith("input["):
        message = "'input' must be a string or a list of strings (or of {'type': 'text', 'text': ...} parts)"
        return ApiError(422, f"{message}; {param}: {first['msg']}", param=param, code="invalid_type")
    return ApiError(422, f"{param}: {first['msg']}", param=param, code="invalid_type")
