"""The error envelope: the JSON answer for a ServiceError, the event that ends a started stream with one, and
the app's handlers that answer the errors raised in a route.

Below every module that answers an error (the middleware, Authorize, the app's handlers, the shutdown deadline,
framing.py), so none of them imports another to do it; the app hands a stream's error event to streaming.py.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

import logging_config
from errors import MethodNotAllowed, NotFound, ServiceError
from record import RECORD, Record


def error_response(error: ServiceError, scope: Scope) -> Response:
    """The envelope; on the SDK routes it also carries `code`, which the OpenAI and groq SDKs read, or it is Groq's
    own error object (`ServiceError.sdk_error`) with Groq's status."""
    request_id = logging_config.REQUEST_ID.get() or ""
    openai = is_sdk_route(scope)
    body = error.body(request_id, openai=openai)
    headers = {**error.headers, **dict(error.rate_limits)}  # Groq's x-ratelimit-*: quota.QuotaGate swaps in its own
    return Response(body, error.status_for(openai=openai), headers=headers, media_type="application/json")


def is_sdk_route(scope: Scope) -> bool:
    """The groq/openai SDK routes, whose errors carry `code` and whose streams end in OpenAI's error event."""
    return str(scope["path"]).startswith(("/openai/", "/v1/"))


def chat_error_event(error: ServiceError) -> bytes:
    """How an error ends a /chat stream already under way."""
    return b"event: error\ndata: %s\n\n" % error.body(logging_config.REQUEST_ID.get() or "")


def openai_error_event(error: ServiceError) -> bytes:
    """How an error ends an SDK route's stream already under way: a `data:` event, as OpenAI's streams end."""
    return b"data: %s\n\n" % error.body(logging_config.REQUEST_ID.get() or "", openai=True)


async def service_error(request: Request, exc: Exception) -> Response:
    """The app's handler for ServiceError: the envelope, and the error's type on the access line."""
    assert isinstance(exc, ServiceError)
    record: Record = request.scope[RECORD]
    record.error = exc.type
    return error_response(exc, request.scope)


async def http_error(request: Request, exc: Exception) -> Response:
    """The app's handler for the router's own 404 and 405, in the same envelope."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        error: ServiceError = MethodNotAllowed(
            f"This method is not allowed here; use {allow}.", headers={"Allow": allow}
        )
    else:
        error = NotFound("No route matches this path; the endpoints are listed in the README.")
    return await service_error(request, error)
