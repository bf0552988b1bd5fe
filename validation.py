"""Hand-written validation of request bodies into frozen dataclasses.

Every check collects a `{"field", "message"}` detail instead of stopping at the first, and no
message echoes a client's value back (it could be a secret pasted in the wrong place).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from config import MODEL_PATTERN
from errors import ValidationError

CHAT_ROLES = ("system", "user", "assistant")
_SEED_RANGE = (-(2**63), 2**63 - 1)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    messages: list[dict[str, str]]
    model: str | None
    params: dict[str, Any]
    stream: bool


class Checker:
    """Collects field errors; `raise_if_any` turns them into one 422 naming every field."""

    def __init__(self, allowed_models: tuple[str, ...] = ()) -> None:
        self.details: list[dict[str, str]] = []
        self._allowed_models = allowed_models

    def fail(self, field: str, message: str) -> None:
        self.details.append({"field": field, "message": f"{field} {message}"})

    def raise_if_any(self) -> None:
        if self.details:
            summary = "; ".join(d["message"] for d in self.details[:5])
            more = f" (and {len(self.details) - 5} more)" if len(self.details) > 5 else ""
            raise ValidationError(f"Invalid request: {summary}{more}.", details=tuple(self.details))

    def unknown_fields(self, body: dict[str, Any], known: frozenset[str], prefix: str = "") -> None:
        for name in body:
            if name not in known:
                self.fail(f"{prefix}{name[:64]}", f"is not a known field (allowed: {', '.join(sorted(known))})")

    def text(self, value: object, field: str) -> str | None:
        if not isinstance(value, str) or not value:
            self.fail(field, f"must be a non-empty string (got {_kind(value)})")
            return None
        if not (value.isascii() or _encodable(value)):
            self.fail(field, "must be valid Unicode text (it holds a lone surrogate)")
            return None
        return value

    def number(self, value: object, field: str, low: float, high: float) -> None:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not low <= value <= high:  # type: ignore[operator]
            self.fail(field, f"must be a finite number from {low:g} to {high:g} (got {_kind(value)})")

    def integer(self, value: object, field: str, low: int, high: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            self.fail(field, f"must be a whole number from {low} to {high} (got {_kind(value)})")

    def boolean(self, value: object, field: str) -> None:
        if not isinstance(value, bool):
            self.fail(field, f"must be true or false (got {_kind(value)})")

    def stop(self, value: object, field: str) -> None:
        if isinstance(value, list) and 1 <= len(value) <= 4:
            for i, item in enumerate(value):
                self.text(item, f"{field}[{i}]")
        elif not isinstance(value, str):
            self.fail(field, f"must be a string or a list of 1 to 4 strings (got {_kind(value)})")
        else:
            self.text(value, field)

    def model(self, value: object, field: str = "model") -> None:
        if not isinstance(value, str) or not MODEL_PATTERN.fullmatch(value):
            self.fail(field, f"must be 1-128 characters of A-Z a-z 0-9 . _ : / - (got {_kind(value)})")
        elif self._allowed_models and value not in self._allowed_models:
            self.fail(field, f"must be one of the allowed models: {', '.join(self._allowed_models)}")


GENERATION_PARAMS: dict[str, Callable[[Checker, object, str], None]] = {
    "temperature": lambda c, v, f: c.number(v, f, 0, 2),
    "top_p": lambda c, v, f: c.number(v, f, 0, 1),
    "max_tokens": lambda c, v, f: c.integer(v, f, 1, 131072),
    "stop": Checker.stop,
    "seed": lambda c, v, f: c.integer(v, f, *_SEED_RANGE),
}
_CHAT_FIELDS = frozenset({"prompt", "system_prompt", "messages", "model", "stream", *GENERATION_PARAMS})
_MESSAGE_FIELDS = frozenset({"role", "content"})


def parse_chat(body: dict[str, Any], *, allowed_models: tuple[str, ...] = ()) -> ChatRequest:
    check = Checker(allowed_models)
    check.unknown_fields(body, _CHAT_FIELDS)
    messages: list[dict[str, str]] = []
    if "system_prompt" in body and (system := check.text(body["system_prompt"], "system_prompt")):
        messages.append({"role": "system", "content": system})
    if ("prompt" in body) == ("messages" in body):
        check.fail("prompt", "or messages must be given, and not both")
    elif "prompt" in body:
        if prompt := check.text(body["prompt"], "prompt"):
            messages.append({"role": "user", "content": prompt})
    else:
        messages += _chat_messages(check, body["messages"])
    if "model" in body:
        check.model(body["model"])
    if "stream" in body:
        check.boolean(body["stream"], "stream")
    params = {name: body[name] for name in GENERATION_PARAMS if name in body}
    for name, value in params.items():
        GENERATION_PARAMS[name](check, value, name)
    check.raise_if_any()
    return ChatRequest(messages, body.get("model"), params, body.get("stream") is True)


def _chat_messages(check: Checker, value: object) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        check.fail("messages", f"must be a non-empty list of {{role, content}} objects (got {_kind(value)})")
        return []
    messages = []
    for i, item in enumerate(value):
        field = f"messages[{i}]"
        if not isinstance(item, dict):
            check.fail(field, f"must be an object with role and content (got {_kind(item)})")
            continue
        check.unknown_fields(item, _MESSAGE_FIELDS, prefix=f"{field}.")
        role = item.get("role")
        if role not in CHAT_ROLES:
            check.fail(f"{field}.role", f"must be one of {', '.join(CHAT_ROLES)}")
        content = check.text(item.get("content"), f"{field}.content")
        if role in CHAT_ROLES and content:
            messages.append({"role": role, "content": content})
    return messages


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number" if math.isfinite(value) else "a non-finite number"
    if isinstance(value, str):
        return f"a string of {len(value)} characters"
    return "a list" if isinstance(value, list) else "an object"


# OpenAI-format requests for the drop-in routes: a strict allowlist, each field type-checked.
# A validator is `(checker, value, field) -> None`; the helpers below build them from shapes.
Validator = Callable[[Checker, Any, str], object]


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    body: dict[str, Any]  # what Groq receives: the client's fields, without nulls
    model: str
    stream: bool


def _shape(spec: dict[str, Validator], required: frozenset[str] = frozenset()) -> Validator:
    def check_shape(check: Checker, value: Any, field: str) -> None:
        if not isinstance(value, dict):
            check.fail(field, f"must be an object (got {_kind(value)})")
            return
        check.unknown_fields(value, frozenset(spec), prefix=f"{field}.")
        for name in sorted(required - value.keys()):
            check.fail(f"{field}.{name}", "is required")
        for name, item in value.items():
            if name in spec:
                spec[name](check, item, f"{field}.{name}")

    return check_shape


def _list_of(item: Validator, low: int, high: int) -> Validator:
    def check_list(check: Checker, value: Any, field: str) -> None:
        if not isinstance(value, list) or not low <= len(value) <= high:
            check.fail(field, f"must be a list of {low} to {high} items (got {_kind(value)})")
            return
        for i, element in enumerate(value):
            item(check, element, f"{field}[{i}]")

    return check_list


def _literal(*allowed: str) -> Validator:
    def check_literal(check: Checker, value: Any, field: str) -> None:
        if value not in allowed:
            check.fail(field, f"must be one of {', '.join(allowed)}")

    return check_literal


def _string(check: Checker, value: Any, field: str) -> None:
    if isinstance(value, str) and value == "":
        return
    check.text(value, field)


def _json_value(check: Checker, value: Any, field: str) -> None:
    """Free-form JSON (a schema, tool parameters): only what Groq could receive as JSON text."""
    if isinstance(value, dict):
        for key, item in value.items():
            _json_value(check, key, field)
            _json_value(check, item, field)
    elif isinstance(value, list):
        for item in value:
            _json_value(check, item, field)
    elif isinstance(value, float) and not math.isfinite(value):
        check.fail(field, "must not hold NaN or Infinity")
    elif isinstance(value, str) and not (value.isascii() or _encodable(value)):
        check.fail(field, "must be valid Unicode text (it holds a lone surrogate)")


def _either(by_type: dict[type, Validator], expected: str) -> Validator:
    def check_either(check: Checker, value: Any, field: str) -> None:
        validator = by_type.get(type(value))
        if validator is None:
            check.fail(field, f"must be {expected} (got {_kind(value)})")
        else:
            validator(check, value, field)

    return check_either


_boolean: Validator = Checker.boolean
_TEXT_PART = _shape({"type": _literal("text"), "text": _string}, frozenset({"type", "text"}))
_IMAGE_PART = _shape(
    {
        "type": _literal("image_url"),
        "image_url": _shape({"url": Checker.text, "detail": _literal("auto", "low", "high")}, frozenset({"url"})),
    },
    frozenset({"type", "image_url"}),
)
_text_content = _either({str: _string, list: _list_of(_TEXT_PART, 1, 256)}, "a string or a list of text parts")


def _user_part(check: Checker, value: Any, field: str) -> None:
    (_IMAGE_PART if isinstance(value, dict) and value.get("type") == "image_url" else _TEXT_PART)(check, value, field)


_FUNCTION_CALL = _shape({"name": Checker.text, "arguments": _string}, frozenset({"name", "arguments"}))
_TOOL_CALL = _shape(
    {"id": Checker.text, "type": _literal("function"), "function": _FUNCTION_CALL},
    frozenset({"id", "type", "function"}),
)
_ROLES: dict[str, Validator] = {
    "system": _shape({"role": _literal("system"), "content": _text_content}, frozenset({"content"})),
    "user": _shape(
        {
            "role": _literal("user"),
            "content": _either({str: _string, list: _list_of(_user_part, 1, 256)}, "a string or a list of parts"),
        },
        frozenset({"content"}),
    ),
    "assistant": _shape(
        {
            "role": _literal("assistant"),
            "content": _either(
                {str: _string, list: _text_content, type(None): lambda c, v, f: None},
                "a string, a list of text parts or null",
            ),
            "tool_calls": _list_of(_TOOL_CALL, 1, 128),
            "reasoning": _string,
        },
    ),
    "tool": _shape(
        {"role": _literal("tool"), "content": _text_content, "tool_call_id": Checker.text},
        frozenset({"content", "tool_call_id"}),
    ),
}


def _message(check: Checker, value: Any, field: str) -> None:
    role = value.get("role") if isinstance(value, dict) else None
    if role not in _ROLES:
        check.fail(f"{field}.role", f"must be one of {', '.join(_ROLES)}")
    else:
        _ROLES[role](check, value, field)


_FUNCTION = _shape(
    {"name": Checker.text, "description": _string, "parameters": _json_value, "strict": _boolean}, frozenset({"name"})
)
_JSON_SCHEMA = _shape(
    {"name": Checker.text, "description": _string, "schema": _json_value, "strict": _boolean}, frozenset({"name"})
)
_max_tokens: Validator = lambda c, v, f: c.integer(v, f, 1, 131072)  # noqa: E731
OPENAI_PARAMS: dict[str, Validator] = {
    **GENERATION_PARAMS,
    "model": lambda c, v, f: c.model(v, f),
    "messages": _list_of(_message, 1, 2048),
    "max_completion_tokens": _max_tokens,
    "stream": _boolean,
    "stream_options": _shape({"include_usage": _boolean}),
    "response_format": _shape(
        {"type": _literal("text", "json_object", "json_schema"), "json_schema": _JSON_SCHEMA}, frozenset({"type"})
    ),
    "tools": _list_of(
        _shape({"type": _literal("function"), "function": _FUNCTION}, frozenset({"type", "function"})), 1, 128
    ),
    "tool_choice": _either(
        {
            str: _literal("none", "auto", "required"),
            dict: _shape(
                {"type": _literal("function"), "function": _shape({"name": Checker.text}, frozenset({"name"}))},
                frozenset({"type", "function"}),
            ),
        },
        "none, auto, required or a function choice",
    ),
    "parallel_tool_calls": _boolean,
    "reasoning_effort": _literal("none", "default", "low", "medium", "high"),
    "reasoning_format": _literal("hidden", "raw", "parsed"),
    "user": _string,
    "n": lambda c, v, f: c.integer(v, f, 1, 1),
}


def parse_completion(body: dict[str, Any], *, allowed_models: tuple[str, ...] = ()) -> CompletionRequest:
    check = Checker(allowed_models)
    check.unknown_fields(body, frozenset(OPENAI_PARAMS))
    for name in ("model", "messages"):
        if body.get(name) is None:
            check.fail(name, "is required")
    for name, value in body.items():
        if name in OPENAI_PARAMS and value is not None:
            OPENAI_PARAMS[name](check, value, name)
    check.raise_if_any()
    forwarded = {name: value for name, value in body.items() if value is not None}
    return CompletionRequest(forwarded, body["model"], body.get("stream") is True)
