"""What Groq sends, read defensively: SSE events, completion bodies, token counts, and its errors mapped once.

Nothing here trusts the shape of Groq's JSON; anything unexpected becomes `errors.UpstreamError` (502).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import groq
import httpx

import errors

_TOKEN_COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens")
_HEADER_TEXT = re.compile(r"[\x20-\x7e]{1,128}")


Delta = tuple[str, str]  # ("reasoning" | "content", text) or ("model", the model Groq names): a piece of a /chat stream


@dataclass(frozen=True, slots=True)
class ChatResult:
    content: str
    model: str
    usage: dict[str, int] | None
    finish_reason: str | None
    reasoning: str | None = None  # only when Groq sent it

    def answer(self) -> dict[str, Any]:
        """The /chat answer: `reasoning` is left out, not null, when Groq sent none."""
        answer = asdict(self)
        if self.reasoning is None:
            del answer["reasoning"]
        return answer


def split_events(buffer: bytes, secret: str) -> tuple[list[tuple[bytes, Any]], bytes]:
    """Complete SSE events in `buffer` as (raw event without its blank line, parsed data), and the rest.

    Every event is a JSON object of the shape `_well_formed` checks, so the relay and the log can read it. A bad
    event (Groq's error event too) raises, but only once the events before it are returned: the rest then starts
    with it, so the same read gives the same answer however Groq's bytes were split into reads.
    """
    if b"\r" in buffer:
        buffer = buffer.replace(b"\r\n", b"\n")
    *blocks, rest = buffer.split(b"\n\n")
    events: list[tuple[bytes, Any]] = []
    for i, block in enumerate(blocks):
        try:
            event = _event(block, secret)
        except errors.UpstreamError:
            if not events:
                raise
            return events, b"\n\n".join([*blocks[i:], rest])
        if event is not None:
            events.append(event)
    return events, rest


def _event(block: bytes, secret: str) -> tuple[bytes, Any] | None:
    if block.startswith(b"data: ") and b"\n" not in block:  # Groq's usual one-line event
        data, error_event = block[6:], False
    else:
        lines = block.split(b"\n")
        data = b"\n".join(ln[5:].lstrip(b" ") for ln in lines if ln.startswith(b"data:"))
        error_event = any(ln.replace(b" ", b"") == b"event:error" for ln in lines)
    if data == b"[DONE]":
        return block, "[DONE]"
    if not data:
        return None
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise errors.UpstreamError("Groq sent a stream event that is not JSON; try again.") from exc
    if error_event or not isinstance(parsed, dict) or parsed.get("error"):
        error = parsed.get("error") if isinstance(parsed, dict) else None
        message = error.get("message") if isinstance(error, dict) else error
        detail = f": {mask(message, secret)[:500]}" if isinstance(message, str) and message else ""
        raise errors.UpstreamError(
            f"Groq reported an error during the stream{detail}", sdk_error=sdk_error(error, secret)
        )
    if not _well_formed(parsed):
        raise errors.UpstreamError("Groq sent a stream event of an unexpected shape; try again.")
    return block, parsed


def json_object(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        raise errors.UpstreamError("Groq sent a body that is not a JSON object; try again.")
    return data


def completion(raw: bytes) -> dict[str, Any]:
    """A chat completion body, parsed, with the fields the service reads of the types Groq documents."""
    data = json_object(raw)
    if not _well_formed(data):
        raise errors.UpstreamError("Groq sent a body that is not a valid chat completion; try again.")
    return data


def model_list(raw: bytes) -> dict[str, Any]:
    """Groq's model list, with `data` a list of objects each with a text `id` (what ALLOWED_MODELS filters on)."""
    data = json_object(raw)
    models = data.get("data")
    if not (isinstance(models, list) and all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in models)):
        raise errors.UpstreamError("Groq sent a model list of an unexpected shape; try again.")
    return data


def model_object(raw: bytes) -> dict[str, Any]:
    """One of Groq's model objects, with a text `id`."""
    data = json_object(raw)
    if not isinstance(data.get("id"), str):
        raise errors.UpstreamError("Groq sent a model object of an unexpected shape; try again.")
    return data


def _well_formed(data: dict[str, Any]) -> bool:
    """What the service reads of a completion or a stream chunk is an object, a list, text or null as documented:
    `model`, `usage`, `x_groq.usage`, and each choice's `finish_reason` and `message`/`delta` text."""
    x_groq, choices = data.get("x_groq"), data.get("choices")
    return (
        _optional(data.get("model"), str)
        and _optional(data.get("usage"), dict)
        and _optional(x_groq, dict)
        and (x_groq is None or _optional(x_groq.get("usage"), dict))
        and _optional(choices, list)
        and all(_well_formed_choice(choice) for choice in choices or ())
    )


def _well_formed_choice(choice: object) -> bool:
    if not isinstance(choice, dict) or not _optional(choice.get("finish_reason"), str):
        return False
    parts = [part for part in (choice.get("message"), choice.get("delta")) if part is not None]
    return all(
        isinstance(part, dict) and _optional(part.get("content"), str) and _optional(part.get("reasoning"), str)
        for part in parts
    )


def _optional(value: object, kind: type) -> bool:
    return value is None or isinstance(value, kind)


def mask(text: str, secret: str) -> str:
    """Groq's text with the service's key masked: done before any cut, so no part of the key survives."""
    return text.replace(secret, "[redacted]") if secret else text


def result(data: dict[str, Any]) -> ChatResult:
    try:
        choice = data["choices"][0]
        content = choice["message"].get("content") or ""
        model = data["model"]
        finish_reason = choice.get("finish_reason")
        reasoning = choice["message"].get("reasoning")
        if not (isinstance(content, str) and isinstance(model, str) and isinstance(reasoning, str | None)):
            raise TypeError
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise errors.UpstreamError("Groq sent a body that is not a valid chat completion; try again.") from exc
    return ChatResult(content, model, usage(data.get("usage")), finish_reason, reasoning)


def chunk_usage(data: dict[str, Any]) -> Any:
    """The usage a chunk or a body carries: top-level, or in `x_groq` (as Groq puts it on a stream's last chunk)."""
    return data.get("usage") or (data.get("x_groq") or {}).get("usage")


def usage(usage: object) -> dict[str, int] | None:
    """Groq's three token counts, or None rather than invented numbers when they are missing."""
    counts = {k: usage.get(k) for k in _TOKEN_COUNTS} if isinstance(usage, dict) else {}
    valid = counts and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts.values())
    return {**counts, **_reasoning_tokens(usage)} if valid else None  # type: ignore[dict-item]


def _reasoning_tokens(usage: Any) -> dict[str, int]:
    """`reasoning_tokens` when Groq reports how many of the completion tokens were reasoning."""
    details = usage.get("completion_tokens_details")
    tokens = details.get("reasoning_tokens") if isinstance(details, dict) else None
    return {"reasoning_tokens": tokens} if isinstance(tokens, int) and not isinstance(tokens, bool) else {}


@contextlib.contextmanager
def mapped_errors(secret: str) -> Iterator[None]:
    """The one place where the SDK's and httpx's exceptions become ours."""
    try:
        yield
    except (TimeoutError, groq.APITimeoutError, httpx.TimeoutException) as exc:
        raise errors.UpstreamTimeout("Groq did not answer in time; try again or raise GROQ_TIMEOUT.") from exc
    except groq.APIStatusError as exc:
        error = status_error(exc.status_code, exc.body, exc.response.headers, secret)
        error.rate_limits = rate_limits(exc.response.headers)  # passed on, as on a success
        raise error from exc
    except groq.APIConnectionError as exc:
        if isinstance(exc.__cause__, httpx.ConnectError):  # never sent: quota.py charges it 0
            raise errors.UpstreamUnreachable("Groq could not be reached; check the network or GROQ_BASE_URL.") from exc
        raise errors.UpstreamError("Groq closed the connection before the answer was complete; try again.") from exc
    except httpx.TransportError as exc:
        raise errors.UpstreamError("Groq closed the connection before the answer was complete; try again.") from exc


def status_error(status: int, body: object, headers: httpx.Headers, secret: str) -> errors.ServiceError:
    """Our error for Groq's; on the SDK routes Groq's own error object and status, but for 401/403 and 498."""
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    groq_message = mask(message, secret)[:1000] if isinstance(message, str) and message else None
    groq_error = sdk_error(error, secret)
    if status in (400, 404, 413, 422):
        message = groq_message or f"Groq rejected the request (HTTP {status})."
        return errors.UpstreamRejected(message, status=status, sdk_error=groq_error, sdk_status=status)
    if status in (401, 403):
        return errors.UpstreamAuth(f"Groq refused the service's key (HTTP {status}); the operator must check it.")
    if status == 429:
        message = groq_message or "Groq's rate limit was reached; retry later."
        return errors.RateLimited(message, retry_after=retry_after(headers), sdk_error=groq_error, sdk_status=status)
    if status == 498:
        message = "Groq's flex tier is at capacity (HTTP 498); retry later, or use another service_tier."
        return errors.UpstreamBusy(message, retry_after=retry_after(headers))
    message = f"Groq answered HTTP {status}; try again later."
    return errors.UpstreamError(message, sdk_error=groq_error, sdk_status=status)


def sdk_error(error: object, secret: str) -> dict[str, object] | None:
    """Groq's error object as the SDK routes pass it on: its message (the service's key masked), type, code and
    param, each text or null (as OpenAI's API writes them); None when Groq sent no error object with a message."""
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(error, dict) or not isinstance(message, str) or not message:
        return None
    passed: dict[str, object] = {"message": mask(message, secret)[:1000]}
    for key in ("type", "code", "param"):
        value = error.get(key)
        passed[key] = mask(value, secret)[:200] if isinstance(value, str) and value else None
    return passed


def rate_limits(headers: httpx.Headers) -> list[tuple[str, str]]:
    """Groq's x-ratelimit-* headers, to pass on when the service has no quota of its own: only printable ASCII,
    as httpx decodes UTF-8 that a response head (Latin-1) could not carry."""
    passed = [(k, v) for k, v in headers.items() if _HEADER_TEXT.fullmatch(k) and _HEADER_TEXT.fullmatch(v)]
    return [(k, v) for k, v in passed if k.startswith("x-ratelimit-")][:16]


def retry_after(headers: httpx.Headers) -> str | None:
    try:
        seconds = float(headers.get("retry-after", ""))
    except ValueError:
        return None
    return str(max(0, math.ceil(seconds))) if math.isfinite(seconds) else None
