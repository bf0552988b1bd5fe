"""The one exception family the service answers with, and its JSON envelope.

ServiceError                      500 internal_error (fixed message; the cause is only logged)
├── InvalidJSON / InvalidRequest  400 invalid_json / invalid_request (not HTTP/1.1 at all)
├── Unauthorized                  401 unauthorized
├── NotFound / MethodNotAllowed   404 not_found / 405 method_not_allowed
├── RequestTimeout / PayloadTooLarge  408 request_timeout / 413 payload_too_large
├── UnsupportedMediaType          415 unsupported_media_type
├── ValidationError               422 validation_error (with details)
├── HeadersTooLarge               431 headers_too_large
├── QuotaExceeded                 429 quota_exceeded (code rate_limit_exceeded on the SDK routes)
├── Overloaded / NotConfigured    503 overloaded / not_configured
├── UpstreamBusy                  503 upstream_busy (Groq's 498: its flex tier is at capacity; raised by llm.py)
├── QuotaUnavailable              503 quota_unavailable (Redis unreachable, QUOTA_FAIL_MODE=closed)
├── ShuttingDown                  503 shutting_down (still running at the shutdown deadline)
└── from Groq (raised by llm.py): UpstreamRejected (Groq's 400/404/413/422), UpstreamAuth 502,
    RateLimited 429, UpstreamError 502, UpstreamUnreachable 502, UpstreamTimeout 504

On the SDK routes an error that carries `sdk_error` (Groq's own error object, or one the service writes in
Groq's form) answers with that object and `sdk_status` instead of the envelope; `/chat` keeps the envelope.
"""

from __future__ import annotations

import json

MAX_BODY_BYTES = 16 * 1024  # the largest error body: details are left out, last first, to fit


class ServiceError(Exception):
    status = 500
    type = "internal_error"
    code: str | None = None  # the OpenAI `code` when it is not the type

    def __init__(
        self,
        message: str = "The service hit an unexpected error; it has been logged.",
        *,
        status: int | None = None,
        retry_after: str | None = None,
        details: tuple[dict[str, str], ...] = (),
        headers: dict[str, str] | None = None,
        sdk_error: dict[str, object] | None = None,
        sdk_status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.retry_after = retry_after
        self.details = details
        self.headers = dict(headers or {})
        if retry_after is not None:
            self.headers["Retry-After"] = retry_after
        self.sdk_error = sdk_error  # message, type, code, param: what the SDK routes answer in place of the envelope
        self.sdk_status = sdk_status  # with sdk_error: Groq's status, for the SDK routes
        self.rate_limits: list[tuple[str, str]] = []  # Groq's x-ratelimit-* headers, when Groq answered

    def status_for(self, *, openai: bool) -> int:
        return self.sdk_status if openai and self.sdk_error is not None and self.sdk_status else self.status

    def body(self, request_id: str, *, openai: bool = False) -> bytes:
        """The error envelope; `openai=True` adds `code`, which the OpenAI and groq SDKs read.

        At most MAX_BODY_BYTES, and never fails on text it did not make: a lone surrogate (from a
        client's field name or Groq's message) is written as its JSON escape.
        """
        error: dict[str, object] = {"type": self.type, "message": self.message, "request_id": request_id}
        if openai and self.sdk_error is not None:
            error = {**self.sdk_error, "request_id": request_id}
        elif openai:
            error["code"] = self.code or self.type
        details = list(self.details)
        while True:
            if details:
                error["details"] = details
            else:
                error.pop("details", None)
            encoded = encode_json({"error": error})
            if len(encoded) <= MAX_BODY_BYTES:
                return encoded
            if not details:  # only a message of thousands of escaped characters gets here
                error["message"] = self.message[:1000]
            details = details[:-1]


def encode_json(payload: object) -> bytes:
    """UTF-8 JSON that cannot fail on a lone surrogate: it becomes `\\udXXX`, the escape JSON has for it."""
    return json.dumps(payload, ensure_ascii=False).encode("utf-8", "backslashreplace")


class InvalidJSON(ServiceError):
    status, type = 400, "invalid_json"


class InvalidRequest(ServiceError):
    status, type = 400, "invalid_request"


class Unauthorized(ServiceError):
    status, type = 401, "unauthorized"


class NotFound(ServiceError):
    status, type = 404, "not_found"


class MethodNotAllowed(ServiceError):
    status, type = 405, "method_not_allowed"


class RequestTimeout(ServiceError):
    status, type = 408, "request_timeout"


class PayloadTooLarge(ServiceError):
    status, type = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, type = 415, "unsupported_media_type"


class ValidationError(ServiceError):
    status, type = 422, "validation_error"


class HeadersTooLarge(ServiceError):
    status, type = 431, "headers_too_large"


class Overloaded(ServiceError):
    status, type = 503, "overloaded"


class NotConfigured(ServiceError):
    status, type = 503, "not_configured"


class UpstreamBusy(ServiceError):
    status, type = 503, "upstream_busy"


class QuotaExceeded(ServiceError):
    status, type, code = 429, "quota_exceeded", "rate_limit_exceeded"


class QuotaUnavailable(ServiceError):
    status, type = 503, "quota_unavailable"


class ShuttingDown(ServiceError):
    status, type = 503, "shutting_down"


class UpstreamRejected(ServiceError):
    status, type = 400, "upstream_rejected"


class UpstreamAuth(ServiceError):
    status, type = 502, "upstream_auth"


class RateLimited(ServiceError):
    status, type = 429, "rate_limited"


class UpstreamError(ServiceError):
    status, type = 502, "upstream_error"


class UpstreamUnreachable(ServiceError):
    status, type = 502, "upstream_unreachable"


class UpstreamTimeout(ServiceError):
    status, type = 504, "upstream_timeout"
