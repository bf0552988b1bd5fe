"""Hand-written validation of request bodies into frozen dataclasses, for /chat and the SDK routes.

Every check collects a `{"field", "message"}` detail instead of stopping at the first (up to
MAX_DETAILS; the rest are only counted), and no message echoes a client's value back (it could be a
secret pasted in the wrong place); a client's field name is echoed escaped and cut to 64 characters. A validator
is `(checker, value, field)`; the shapes below are built from a few of them, and both routes share
the message, model, parameter and allowlist checks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from body import MAX_JSON_DEPTH
from config import MODEL_PATTERN
from errors import ValidationError

_SURROGATE = re.compile("[\ud800-\udfff]")  # text holding one cannot be sent upstream as UTF-8
MAX_DETAILS = 20  # field errors listed in one answer; a 1 MiB body can hold 100,000 of them


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
        self.failures = 0
        self._allowed_models = allowed_models

    def fail(self, field: str, message: str) -> None:
        self.failures += 1
        if len(self.details) < MAX_DETAILS:
            self.details.append({"field": field, "message": f"{field} {message}"})

    def raise_if_any(self) -> None:
        if self.details:
            summary = "; ".join(d["message"] for d in self.details[:5])
            more = f" (and {self.failures - 5} more)" if self.failures > 5 else ""
            raise ValidationError(f"Invalid request: {summary}{more}.", details=tuple(self.details))

    def unknown_fields(self, body: dict[str, Any], known: frozenset[str], prefix: str = "") -> None:
        for name in body:
            if name not in known and len(self.details) >= MAX_DETAILS:
                self.failures += 1  # only counted, so 100,000 unknown keys cost no more than a few lookups each
            elif name not in known:
                self.fail(f"{prefix}{_field_name(name)}", f"is not a known field (allowed: {', '.join(sorted(known))})")

    def text(self, value: object, field: str) -> str | None:
        if not isinstance(value, str) or not value:
            self.fail(field, f"must be a non-empty string (got {kind(value)})")
        elif not value.isascii() and _SURROGATE.search(value):
            self.fail(field, "must be valid Unicode text (it holds a lone surrogate)")
        else:
            return value
        return None

    def number(self, value: object, field: str, low: float, high: float) -> None:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and _finite(value)
        if not ok or not low <= value <= high:  # type: ignore[operator]
            self.fail(field, f"must be a finite number from {low:g} to {high:g} (got {kind(value)})")

    def integer(self, value: object, field: str, low: int, high: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            self.fail(field, f"must be a whole number from {low} to {high} (got {kind(value)})")

    def boolean(self, value: object, field: str) -> None:
        if not isinstance(value, bool):
            self.fail(field, f"must be true or false (got {kind(value)})")

    def stop(self, value: object, field: str) -> None:
        if isinstance(value, list) and 1 <= len(value) <= 4:
            for i, item in enumerate(value):
                self.text(item, f"{field}[{i}]")
        elif isinstance(value, str):
            self.text(value, field)
        else:
            self.fail(field, f"must be a string or a list of 1 to 4 strings (got {kind(value)})")

    def model(self, value: object, field: str = "model") -> None:
        if not isinstance(value, str) or not MODEL_PATTERN.fullmatch(value):
            self.fail(field, f"must be 1-128 characters of A-Z a-z 0-9 . _ : / - (got {kind(value)})")
        elif self._allowed_models and value not in self._allowed_models:
            self.fail(field, f"must be one of the allowed models: {', '.join(self._allowed_models)}")


Validator = Callable[[Checker, Any, str], object]


def shape(spec: dict[str, Validator], required: str = "") -> Validator:
    """An object with only the keys of `spec`, each checked by its validator; `required` lists some."""

    known, required_names = frozenset(spec), required.split()

    def check_shape(check: Checker, value: Any, field: str) -> None:
        if not isinstance(value, dict):
            check.fail(field, f"must be an object (got {kind(value)})")
            return
        check.unknown_fields(value, known, prefix=f"{field}.")
        for name in required_names:
            if name not in value:
                check.fail(f"{field}.{name}", "is required")
        for name, item in value.items():
            if name in spec:
                spec[name](check, item, f"{field}.{name}")

    return check_shape


def list_of(item: Validator, low: int, high: int) -> Validator:
    def check_list(check: Checker, value: Any, field: str) -> None:
        if not isinstance(value, list) or not low <= len(value) <= high:
            check.fail(field, f"must be a list of {low} to {high} items (got {kind(value)})")
            return
        for i, element in enumerate(value):
            item(check, element, f"{field}[{i}]")

    return check_list


def literal(words: str) -> Validator:
    allowed = words.split()

    def check_literal(check: Checker, value: Any, field: str) -> None:
        if value not in allowed:
            check.fail(field, f"must be one of {', '.join(allowed)}")

    return check_literal


def either(by_type: dict[type, Validator], expected: str) -> Validator:
    def check_either(check: Checker, value: Any, field: str) -> None:
        validator = by_type.get(type(value))
        if validator is None:
            check.fail(field, f"must be {expected} (got {kind(value)})")
        else:
            validator(check, value, field)

    return check_either


def string(check: Checker, value: Any, field: str) -> None:
    """Any text, the empty string included."""
    if value != "":
        check.text(value, field)


def json_value(check: Checker, value: Any, field: str) -> None:
    """Free-form JSON (a schema, tool parameters): only what Groq could receive as JSON text, at most
    MAX_JSON_DEPTH levels deep. Walked without recursion; the first problem found is the one reported."""
    failures, pending = check.failures, [(value, 1)]
    while pending and check.failures == failures:
        item, depth = pending.pop()
        if isinstance(item, dict | list) and depth > MAX_JSON_DEPTH:
            check.fail(field, f"must not be nested more than {MAX_JSON_DEPTH} levels deep")
        elif isinstance(item, dict | list):
            parts = [*item, *item.values()] if isinstance(item, dict) else item
            pending += [(part, depth + 1) for part in parts]
        elif isinstance(item, float) and not math.isfinite(item):
            check.fail(field, "must not hold NaN or Infinity")
        elif isinstance(item, str):
            string(check, item, field)


GENERATION_PARAMS: dict[str, Validator] = {
    "temperature": lambda c, v, f: c.number(v, f, 0, 2),
    "top_p": lambda c, v, f: c.number(v, f, 0, 1),
    "max_tokens": lambda c, v, f: c.integer(v, f, 1, 131072),
    "stop": Checker.stop,
    "seed": lambda c, v, f: c.integer(v, f, -(2**63), 2**63 - 1),
}
_JSON_SCHEMA = shape(
    {
        "name": Checker.text,
        "description": string,
        "schema": either({dict: json_value}, "an object"),
        "strict": Checker.boolean,
    },
    "name",
)
_RESPONSE_FORMATS = {
    "text": shape({"type": string}),
    "json_object": shape({"type": string}),
    "json_schema": shape({"type": string, "json_schema": _JSON_SCHEMA}, "json_schema"),
}


def _response_format(check: Checker, value: Any, field: str) -> None:
    """`{"type": "text"}`, `{"type": "json_object"}`, or `{"type": "json_schema", "json_schema": {...}}`."""
    if not isinstance(value, dict):
        check.fail(field, f"must be an object (got {kind(value)})")
    elif not isinstance(value.get("type"), str) or value["type"] not in _RESPONSE_FORMATS:
        check.fail(f"{field}.type", f"must be one of {', '.join(_RESPONSE_FORMATS)}")
    else:
        _RESPONSE_FORMATS[value["type"]](check, value, field)


# Groq's options for reasoning models, structured output and its service tiers; both routes take them.
GROQ_OPTIONS: dict[str, Validator] = {
    "reasoning_effort": literal("none default low medium high"),
    "include_reasoning": Checker.boolean,
    "reasoning_format": literal("hidden raw parsed"),
    "response_format": _response_format,
    "max_completion_tokens": GENERATION_PARAMS["max_tokens"],
    "service_tier": literal("auto on_demand flex performance"),
}
# /chat: plain messages, a role of three and non-empty text, nothing else.
_CHAT_PARAMS = {**GENERATION_PARAMS, **GROQ_OPTIONS}
_CHAT_FIELDS = frozenset({"prompt", "system_prompt", "messages", "model", "stream", *_CHAT_PARAMS})
_CHAT_MESSAGES = list_of(
    shape({"role": literal("system user assistant"), "content": Checker.text}, "role content"), 1, 2048
)


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
        _CHAT_MESSAGES(check, body["messages"], "messages")
        messages += body["messages"] if isinstance(body["messages"], list) else []
    if "model" in body:
        check.model(body["model"])
    if "stream" in body:
        check.boolean(body["stream"], "stream")
    params = {name: body[name] for name in _CHAT_PARAMS if name in body}
    for name, value in params.items():
        _CHAT_PARAMS[name](check, value, name)
    if "max_tokens" in params and "max_completion_tokens" in params:
        check.fail("max_completion_tokens", "is the new name of max_tokens: give one of them, not both")
    check.raise_if_any()
    return ChatRequest(messages, body.get("model"), params, body.get("stream") is True)


def _field_name(name: str) -> str:
    """A client's field name as a message may show it: cut, with a lone surrogate escaped (`\\ud800`)."""
    return name[:64].encode("utf-8", "backslashreplace").decode()


def _finite(value: float) -> bool:
    """math.isfinite() raises OverflowError on an int too large for a float; every int is finite."""
    return isinstance(value, int) or math.isfinite(value)


def kind(value: object) -> str:
    if value is None or isinstance(value, bool):
        return "null" if value is None else "a boolean"
    if isinstance(value, int | float):
        return "a number" if _finite(value) else "a non-finite number"
    if isinstance(value, str):
        return f"a string of {len(value)} characters"
    return "a list" if isinstance(value, list) else "an object"
