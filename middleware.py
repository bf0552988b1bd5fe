"""Pure ASGI middleware: the request id and the one access line per request, and the error envelope.

Who may call (Keyring, Authorize) is in access.py. The whole stack, and its order, is declared in app.py.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import body
import logging_config
from config import ServiceKey
from errors import InvalidRequest, MethodNotAllowed, NotFound, ServiceError

logger = logging.getLogger("service")
LOG_FIELDS = "service.log_fields"  # scope key: the dict that becomes the request's access line
CLIENT = "service.client"  # scope key: the ServiceKey of the caller, set by Authorize (quotas and models use it)
LOCAL = ServiceKey("local", b"")  # every loopback caller when no token is configured: one client
# scope key, for metrics: (model, streamed, ms into the Groq wait its call began). The access line's `model` is
# None until Groq names the model it answers with (metrics learn model labels only from Groq) or a fallback is
# tried; RequestLog writes the one asked for if neither happened.
REQUESTED = "service.requested"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


class RequestLog:
    """Request id, the one access line per request, and the last-resort 500."""

    def __init__(self, app: ASGIApp, observe: Callable[[Scope], Callable[[], None]] | None = None) -> None:
        self.app = app
        self._observe = observe  # METRICS=true: called as a request starts; what it returns, with the final fields

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"").decode("latin-1")
        # Echoed even when it equals a secret: the client sent it, and the log formatter masks secrets.
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        token = logging_config.REQUEST_ID.set(request_id)
        client = scope.get("client")
        fields: dict[str, Any] = {"method": scope["method"], "path": scope["path"], "status": 500}
        fields["client"] = f"{client[0]}:{client[1]}" if client else None
        scope[LOG_FIELDS] = fields
        finished = self._observe(scope) if self._observe else None
        id_header = (b"x-request-id", request_id.encode())
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal response_started
            starting = message["type"] == "http.response.start"
            if starting:
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)
            if starting:  # a status counts once the server took it (a send can fail when the client has gone)
                response_started = True
                fields["status"] = message["status"]

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            fields["disconnected"] = True
            if not response_started:
                fields["status"] = 499  # nginx's "client closed request": the client saw no status
        except Exception as exc:
            error = exc if isinstance(exc, ServiceError) else ServiceError()
            if not isinstance(exc, ServiceError):
                logger.exception("unhandled error")
            fields["error"] = error.type
            if not response_started:
                await error_response(error, scope)(scope, receive, send_with_id)
        finally:
            fields["duration_ms"] = elapsed_ms(started)
            if finished is not None:  # before the line, so whoever sees the line sees its metrics
                finished()
            if fields.get("model", "") is None:  # Groq named no model: the line shows the one asked for
                fields["model"] = scope[REQUESTED][0]
            logger.info("request", extra={"fields": fields})
            logging_config.REQUEST_ID.reset(token)
            body.give_back(scope)  # after the line: the handler and its objects are gone by now


class Cors(CORSMiddleware):
    """Starlette's CORS, with a refused preflight answered in the envelope instead of plain text."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 400:
            refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")
            error = InvalidRequest(f"This cross-origin request is not allowed ({refused}); see CORS_ORIGINS.")
            response = Response(error.body(logging_config.REQUEST_ID.get() or ""), 400, media_type="application/json")
        return response


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


async def service_error(request: Request, exc: Exception) -> Response:
    """The app's handler for ServiceError: the envelope, and the error's type on the access line."""
    assert isinstance(exc, ServiceError)
    request.scope[LOG_FIELDS]["error"] = exc.type
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
