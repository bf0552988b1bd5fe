"""Validation of the groq/openai SDK routes' bodies: OpenAI-format messages and the parameters Groq documents.

Built from the shared checks in validation.py; the same rules apply (collect every field error, echo no value).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from validation import (
    GENERATION_PARAMS,
    GROQ_OPTIONS,
    Checker,
    Validator,
    either,
    json_value,
    kind,
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
    validator = _ROLES.get(role) if isinstance(role, str) else None
    if validator is None:
        check.fail(f"{field}.role", f"must be one of {', '.join(_ROLES)}")
    else:
        validator(check, value, field)


def _metadata(check: Checker, value: Any, field: str) -> None:
    """OpenAI's limits: at most 16 pairs, keys of at most 64 characters, string values of at most 512."""
    if not isinstance(value, dict) or len(value) > 16:
        check.fail(field, f"must be an object of at most 16 string values (got {kind(value)})")
        return
    for key, item in value.items():
        if len(key) > 64 or not isinstance(item, str) or len(item) > 512:
            check.fail(field, "must have keys of at most 64 characters and string values of at most 512")
            return
        string(check, key, field)
        string(check, item, field)


def _refused(*neutral: object) -> Validator:
    """An OpenAI parameter Groq refuses: accepted (and dropped) only as null or its neutral value."""
    allowed = " or ".join(["null", *(json.dumps(n) for n in neutral)])

    def check_refused(check: Checker, value: Any, field: str) -> None:
        if not any(type(value) is type(n) and value == n for n in neutral):
            check.fail(field, f"is not supported by Groq; leave it out or send {allowed}")

    return check_refused


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
_SYSTEM = shape({"role": string, "content": _TEXT_CONTENT, "name": string}, "content")
_ROLES: dict[str, Validator] = {
    "system": _SYSTEM,
    "developer": _SYSTEM,
    "user": shape(
        {
            "role": string,
            "content": either({str: string, list: list_of(_USER_PART, 1, 256)}, "a string or parts"),
            "name": string,
        },
        "content",
    ),
    "assistant": shape(
        {
            "role": string,
            "name": string,
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
    "frequency_penalty": lambda c, v, f: c.number(v, f, -2, 2),
    "presence_penalty": lambda c, v, f: c.number(v, f, -2, 2),
    "metadata": _metadata,
    "store": Checker.boolean,
}
# Parameters of OpenAI's API that Groq answers 400 to: never forwarded, so only their "not set" values pass.
_DROPPED: dict[str, Validator] = {
    "logprobs": _refused(False),
    "top_logprobs": _refused(0),
    "logit_bias": _refused({}),
    **dict.fromkeys(
        [
            "audio",
            "function_call",
            "functions",
            "modalities",
            "moderation",
            "prediction",
            "prompt_cache_key",
            "prompt_cache_options",
            "prompt_cache_retention",
            "safety_identifier",
            "verbosity",
            "web_search_options",
        ],
        _refused(),
    ),
}
_OPENAI_FIELDS = frozenset(OPENAI_PARAMS) | frozenset(_DROPPED)


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
        validator = OPENAI_PARAMS.get(name) or _DROPPED.get(name)
        if validator is not None and value is not None:
            validator(check, value, name)
    check.raise_if_any()
    forwarded = {name: value for name, value in body.items() if value is not None and name not in _DROPPED}
    forwarded["messages"] = [{k: v for k, v in m.items() if k != "name"} for m in body["messages"]]  # Groq: 400
    return CompletionRequest(forwarded, body["model"], body.get("stream") is True)
