"""The one exception family the service answers with, and its JSON envelope.

ServiceError                      500 internal_error (fixed message; the cause is only logged)
├── InvalidJSON / InvalidRequest  400 invalid_json / invalid_request (not HTTP/1.1 at all)
├── Unauthorized                  401 unauthorized
├── NotFound / MethodNotAllowed   404 not_found / 405 method_not_allowed
├── RequestTimeout / PayloadTooLarge  408 request_timeout / 413 payload_too_large
├── UnsupportedMediaType          415 unsupported_media_type
├── ValidationError               422 validation_error (with details)
├── HeadersTooLarge               431 headers_too_large
├── Overloaded / NotConfigured    503 overloaded / not_configured
├── ShuttingDown                  503 shutting_down (still running at the shutdown deadline)
└── from Groq (raised by llm.py): UpstreamRejected (Groq's 400/404/413/422), UpstreamAuth 502,
    RateLimited 429, UpstreamError 502, UpstreamUnreachable 502, UpstreamTimeout 504
"""

from __future__ import annotations

import json


class ServiceError(Exception):
    status = 500
    type = "internal_error"

    def __init__(
        self,
        message: str = "The service hit an unexpected error; it has been logged.",
        *,
        status: int | None = None,
        retry_after: str | None = None,
        details: tuple[dict[str, str], ...] = (),
        headers: dict[str, str] | None = None,
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

    def body(self, request_id: str, *, openai: bool = False) -> bytes:
        """The error envelope; `openai=True` adds `code`, which the OpenAI and groq SDKs read."""
        error: dict[str, object] = {"type": self.type, "message": self.message, "request_id": request_id}
        if openai:
            error["code"] = self.type
        if self.details:
            error["details"] = list(self.details)
        return json.dumps({"error": error}, ensure_ascii=False).encode()


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
