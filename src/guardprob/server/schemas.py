"""Request models (pydantic) and the OpenAI error shape every failure is answered in.

Responses are plain dicts built in app.py; their fields are documented in docs/server.md.
Requests are strict: wrong JSON types are not coerced (``"0.1"`` is not a number) and
unknown fields are refused with 400, as the OpenAI API does.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from guardprob.options.table import OPTIONS, SCORING, SEARCH


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _ModerationFields(_Strict):
    # a text, or a list of texts and parts: read (and refused where it is not text) by guardprob.inputs.reader
    input: str | list[Any]
    model: str | None = None


class _ClassifyFields(_Strict):
    # chat messages in any shape guardprob.inputs.reader takes (roles and aliases, parts, tool calls and results)
    messages: list[Any] | None = None
    input: str | None = None
    role: str | None = None
    method: str | None = None
    model: str | None = None
    deadline_ms: float | None = Field(default=None, gt=0, le=3_600_000)  # answer by then, with the bounds reached
    # streaming moderation: the answer's chunks, each scored with the answer so far (server-sent events)
    stream: bool = False
    chunks: list[str] | None = Field(default=None, max_length=10_000)


def option_fields(groups: tuple[str, ...] = SCORING) -> dict[str, Any]:
    """The request fields of the options of ``groups`` the service takes per request
    (guardprob.options.table): the option's name and type; None (the server's setting) unless a
    switch (its default); the table's per-request bounds (traces: at most 16). The ranges
    themselves are checked by the table's checks (400, ``invalid_value``)."""
    fields: dict[str, Any] = {}
    for o in OPTIONS:
        if not o.request or o.group not in groups:
            continue
        if o.type is bool:
            fields[o.name] = (bool, Field(default=o.default, description=o.help))
        else:
            fields[o.name] = (o.type | None, Field(default=None, description=o.help, **o.bounds))
    return fields


# the search, trace and decision options a request may set: one field each, from the table
ClassifyRequest = create_model("ClassifyRequest", __base__=_ClassifyFields, __module__=__name__, **option_fields())
ClassifyRequest.__doc__ = "A /v1/classify request: the conversation, and the options it overrides (guardprob.options)."

# OpenAI's request, and the search options a request may set (the openai client's extra_body)
ModerationRequest = create_model("ModerationRequest", __base__=_ModerationFields, __module__=__name__,
                                 **option_fields((SEARCH,)))
ModerationRequest.__doc__ = ("A /v1/moderations request: OpenAI's fields, and the search options it overrides "
                             "(guardprob.options), as the openai client sends them with extra_body.")


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
