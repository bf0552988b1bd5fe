"""Validation of the groq/openai SDK routes' bodies: OpenAI-format messages and the parameters Groq documents.

Built from the shared checks in validation.py; the same rules apply (collect every field error, echo no value).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from validation import (
    GENERATION_PARAMS,
    GROQ_OPTIONS,
    Checker,
    Validator,
    either,
    json_value,
    list_of,
    literal,
    shape,
    string,
)


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    body: dict[str, Any]  # what Groq receives: the client's fields, without nulls
    model: str
    stream: bool


def _message(check: Checker, value: Any, field: str) -> None:
    role = value.get("role") if isinstance(value, dict) else None
    if role not in _ROLES:
        check.fail(f"{field}.role", f"must be one of {', '.join(_ROLES)}")
    else:
        _ROLES[role](check, value, field)


# The SDK routes: OpenAI-format messages and the parameters Groq documents.
_TEXT_PART = shape({"type": literal("text"), "text": string}, "type text")
_IMAGE_URL = shape({"url": Checker.text, "detail": literal("auto low high")}, "url")
_IMAGE_PART = shape({"type": literal("image_url"), "image_url": _IMAGE_URL}, "type image_url")
_TEXT_CONTENT = either({str: string, list: list_of(_TEXT_PART, 1, 256)}, "a string or a list of text parts")
_USER_PART = either(
    {dict: lambda c, v, f: (_IMAGE_PART if v.get("type") == "image_url" else _TEXT_PART)(c, v, f)}, "a part"
)
_FUNCTION_CALL = shape({"name": Checker.text, "arguments": string}, "name arguments")
_TOOL_CALL = shape({"id": Checker.text, "type": literal("function"), "function": _FUNCTION_CALL}, "id type function")
_ROLES: dict[str, Validator] = {
    "system": shape({"role": string, "content": _TEXT_CONTENT}, "content"),
    "user": shape(
        {"role": string, "content": either({str: string, list: list_of(_USER_PART, 1, 256)}, "a string or parts")},
        "content",
    ),
    "assistant": shape(
        {
            "role": string,
            "content": either(
                {str: string, list: _TEXT_CONTENT, type(None): lambda c, v, f: None}, "a string, text parts or null"
            ),
            "tool_calls": list_of(_TOOL_CALL, 1, 128),
            "reasoning": string,
        }
    ),
    "tool": shape({"role": string, "content": _TEXT_CONTENT, "tool_call_id": Checker.text}, "content tool_call_id"),
}
_FUNCTION = shape(
    {"name": Checker.text, "description": string, "parameters": json_value, "strict": Checker.boolean}, "name"
)
_FUNCTION_CHOICE = shape(
    {"type": literal("function"), "function": shape({"name": Checker.text}, "name")}, "type function"
)
OPENAI_PARAMS: dict[str, Validator] = {
    **GENERATION_PARAMS,
    **GROQ_OPTIONS,
    "model": lambda c, v, f: c.model(v, f),
    "messages": list_of(_message, 1, 2048),
    "stream": Checker.boolean,
    "stream_options": shape({"include_usage": Checker.boolean}),
    "tools": list_of(shape({"type": literal("function"), "function": _FUNCTION}, "type function"), 1, 128),
    "tool_choice": either({str: literal("none auto required"), dict: _FUNCTION_CHOICE}, "a choice"),
    "parallel_tool_calls": Checker.boolean,
    "user": string,
    "n": lambda c, v, f: c.integer(v, f, 1, 1),
}
_OPENAI_FIELDS = frozenset(OPENAI_PARAMS)


def parse_completion(body: dict[str, Any], *, allowed_models: tuple[str, ...] = ()) -> CompletionRequest:
    echoed = body.get("messages")  # a message echoed back from a response keeps its nulls: they mean "not set"
    if isinstance(echoed, list) and all(isinstance(m, dict) for m in echoed):
        body = {**body, "messages": [{k: v for k, v in m.items() if v is not None or k == "content"} for m in echoed]}
    check = Checker(allowed_models)
    check.unknown_fields(body, _OPENAI_FIELDS)
    for name in ("model", "messages"):
        if body.get(name) is None:
            check.fail(name, "is required")
    for name, value in body.items():
        if name in OPENAI_PARAMS and value is not None:
            OPENAI_PARAMS[name](check, value, name)
    check.raise_if_any()
    forwarded = {name: value for name, value in body.items() if value is not None}
    return CompletionRequest(forwarded, body["model"], body.get("stream") is True)
