"""Validation of the groq/openai SDK routes' bodies: OpenAI-format messages and the parameters Groq documents.

Built from the shared checks in validation.py; the same rules apply (collect every field error, echo no value).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import errors
from config import MODEL_PATTERN
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
_FREE_FORM = frozenset({"parameters", "schema"})  # tools[].function.parameters, response_format.json_schema.schema
_SHAPE_DEPTH = 8  # levels of objects and lists in the deepest shape (messages[].tool_calls[].function.*)


def parse_completion(body: dict[str, Any], *, allowed_models: tuple[str, ...] = ()) -> CompletionRequest:
    _remove_not_set(body, 0)
    if isinstance(body.get("messages"), list):
        body["messages"] = [_sent_back(m) if isinstance(m, dict) else m for m in body["messages"]]
    check = Checker(allowed_models)
    check.unknown_fields(body, _OPENAI_FIELDS)
    for name in ("model", "messages"):
        if body.get(name) is None:
            check.fail(name, "is required")
    for name, value in body.items():
        validator = OPENAI_PARAMS.get(name) or _DROPPED.get(name)
        if validator is not None:
            validator(check, value, name)
    check.raise_if_any()
    forwarded = {name: value for name, value in body.items() if name not in _DROPPED}
    forwarded["messages"] = [{k: v for k, v in m.items() if k != "name"} for m in body["messages"]]  # Groq: 400
    return CompletionRequest(forwarded, body["model"], body.get("stream") is True)


def _remove_not_set(value: Any, depth: int) -> None:
    """`null` means "not set" anywhere the SDKs send it (they send it for every unset field): the key is removed,
    in place. Not inside free-form JSON, where it is a value (a schema's `"default": null`), nor from lists; an
    assistant's `content: null` stays, as Groq sends it beside tool calls. Past the levels our shapes have, kept."""
    if isinstance(value, dict) and depth < _SHAPE_DEPTH:
        for key in [k for k, v in value.items() if v is None and not (k == "content" and depth == 2)]:
            del value[key]  # depth 2: body -> messages -> a message
        for key, item in value.items():
            if key not in _FREE_FORM:
                _remove_not_set(item, depth + 1)
    elif isinstance(value, list) and depth < _SHAPE_DEPTH:
        for item in value:
            _remove_not_set(item, depth + 1)


def _sent_back(message: dict[str, Any]) -> dict[str, Any]:
    """A message the openai SDK built from its own answer, without the SDK's bookkeeping: `parsed` (its reading of
    the content), and each tool call's `index` (its place in the stream) and `function.parsed_arguments`."""
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        message = {**message, "tool_calls": [_call_sent_back(c) if isinstance(c, dict) else c for c in calls]}
    return {k: v for k, v in message.items() if k != "parsed"}


def _call_sent_back(call: dict[str, Any]) -> dict[str, Any]:
    call = {k: v for k, v in call.items() if k != "index"}
    if isinstance(call.get("function"), dict):
        call["function"] = {k: v for k, v in call["function"].items() if k != "parsed_arguments"}
    return call


def check_model_id(model_id: str, allowed_models: tuple[str, ...]) -> str:
    """The id of `GET .../models/{id}` (the rest of the path): outside the allowed models, or not a model id at all
    (which Groq could read as another path), 404 as Groq answers an unknown model."""
    if not model_id:  # `/v1/models/`: a trailing slash, as on every route
        raise errors.NotFound("No route matches this path; the endpoints are listed in the README.")
    segments = model_id.split("/")
    if (
        not MODEL_PATTERN.fullmatch(model_id)
        or any(s in ("", ".", "..") for s in segments)
        or (allowed_models and model_id not in allowed_models)
    ):
        message = "The model does not exist or you do not have access to it."
        unknown: dict[str, object] = {"message": message, "type": "invalid_request_error", "code": "model_not_found"}
        raise errors.NotFound(message, sdk_error=unknown, sdk_status=404)
    return model_id
