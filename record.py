"""One record per request: what each module learns about the request, written as typed attributes, and the
access line rendered from it in one place.

`middleware.RequestLog` creates it as a request starts and keeps it in the scope under `RECORD`; Authorize, the
handlers, the stream relay, fallback.py, quota.py and the shutdown and write deadlines write it; quota.py settles
a client's tokens from Groq's usage here and metrics.py reads it. Nothing reads the access line to decide
anything. framing.py renders a request it refused before the app saw it from a record of its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

RECORD = "service.record"  # scope key: the request's Record


@dataclass(slots=True)
class Record:
    method: str | None  # None: refused before its head was parsed (framing.py); not on the line then
    path: str | None
    peer: str | None  # "host:port" of the socket's peer; the line's `client`
    request_id: str | None = None  # the X-Request-ID echoed (the client's, or made here); every other log line
    # of the request takes it from logging_config.REQUEST_ID
    status: int = 500  # as the server took it; 499 when the client left before any status
    key: str | None = None  # Authorize: the SERVICE_KEYS_FILE entry's name...
    key_id: str | None = None  # ... or the 8-hex id of a SERVICE_API_KEYS token
    # A chat call's model: the one asked for, then each fallback as it is called (fallback.py). The model the
    # client asked for is `fallback_from` once a fallback was called, else this. Metrics label the call with it;
    # the line's `model` until Groq names one.
    call_model: str | None = None
    model: str | None = None  # Groq's, once it names one; before that the fallback tried last
    stream: bool = False  # a chat call asked Groq for a stream
    call_started_ms: float = 0.0  # into the wait on Groq, when the call reported began (after failed fallbacks)
    messages: list[Any] | None = None  # LOG_PROMPTS: the messages sent...
    completion: str | None = None  # ... and the text answered, as it comes
    fallback_from: str | None = None  # FALLBACK_MODELS: the model asked for, when a fallback was called
    attempts: int | None = None  # the Groq calls made, counting the first
    upstream_ms: float | None = None  # until Groq's answer (a stream's first piece)
    # Groq's usage, as it reported it: a relayed answer's counts are not checked here, so any JSON value.
    usage_reported: bool = False
    prompt_tokens: object = None
    completion_tokens: object = None
    charged_tokens: int | None = None  # quota.py: what the client's quota was charged
    quota: str | None = None  # quota.py: the limit that refused the request
    error: str | None = None  # the error type the client was answered with
    disconnected: bool = False  # the client left (or was dropped) before the answer was over
    duration_ms: float = 0.0

    def note_usage(self, usage: dict[str, Any]) -> None:
        """Groq's usage object, as a completion or a stream chunk carries it."""
        self.usage_reported = True
        self.prompt_tokens = usage.get("prompt_tokens")
        self.completion_tokens = usage.get("completion_tokens")


def access_line(record: Record) -> dict[str, Any]:
    """The access line's fields: `status`, `client` and (last) `duration_ms` always; each other one only once
    something set it, a flag only when true."""
    line: dict[str, Any] = {}
    if record.request_id is not None:
        line["request_id"] = record.request_id
    if record.method is not None:
        line["method"] = record.method
    if record.path is not None:
        line["path"] = record.path
    line["status"] = record.status
    line["client"] = record.peer
    if record.key is not None:
        line["key"] = record.key
    if record.key_id is not None:
        line["key_id"] = record.key_id
    if record.call_model is not None:  # a chat call: the model Groq named, else the one asked for
        line["model"] = record.model if record.model is not None else record.call_model
    if record.stream:
        line["stream"] = True
    if record.messages is not None:
        line["messages"] = record.messages
    if record.completion is not None:
        line["completion"] = record.completion
    if record.fallback_from is not None:
        line["fallback_from"] = record.fallback_from
        line["attempts"] = record.attempts
    if record.upstream_ms is not None:
        line["upstream_ms"] = record.upstream_ms
    if record.usage_reported:
        line["prompt_tokens"] = record.prompt_tokens
        line["completion_tokens"] = record.completion_tokens
    if record.charged_tokens is not None:
        line["charged_tokens"] = record.charged_tokens
    if record.quota is not None:
        line["quota"] = record.quota
    if record.error is not None:
        line["error"] = record.error
    if record.disconnected:
        line["disconnected"] = True
    line["duration_ms"] = record.duration_ms
    return line


def elapsed_ms(started: float) -> float:
    """Milliseconds since `started` (a perf_counter reading), as the access line shows them."""
    return round((time.perf_counter() - started) * 1000, 2)
