"""Pure ASGI middleware: the request id and the one access line per request, and who may call.

Stack, outermost first (declared in app.py): Starlette's ServerErrorMiddleware -> RequestLog ->
Cors (only when CORS_ORIGINS is set) -> Authorize -> Starlette's ExceptionMiddleware -> router.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import logging_config
from errors import InvalidRequest, ServiceError, Unauthorized

logger = logging.getLogger("service")
LOG_FIELDS = "service.log_fields"  # scope key: the dict that becomes the request's access line
REQUESTED = "service.requested"  # scope key: (model asked for, streamed), for metrics; the log shows Groq's model
OPEN_PATHS = frozenset({"/", "/healthz", "/readyz"})
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


class RequestLog:
    """Request id, the one access line per request, and the last-resort 500."""

    def __init__(
        self, app: ASGIApp, secrets: tuple[str, ...], observe: Callable[[Scope], Callable[[], None]] | None = None
    ) -> None:
        self.app = app
        self._secrets = frozenset(secrets)
        self._observe = observe  # METRICS=true: called as a request starts; what it returns, with the final fields

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"").decode("latin-1")
        echo = _REQUEST_ID.fullmatch(given) and given not in self._secrets  # a token pasted here is not echoed
        request_id = given if echo else uuid.uuid4().hex
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
            if message["type"] == "http.response.start":
                response_started = True
                fields["status"] = message["status"]
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            fields["disconnected"] = True
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
            logger.info("request", extra={"fields": fields})
            logging_config.REQUEST_ID.reset(token)


class Authorize:
    """Every route but the open ones needs a service token, or a loopback peer when none is configured.

    Decided on the raw `scope["path"]`, never on a URL rebuilt from the Host header.
    """

    def __init__(self, app: ASGIApp, keys: tuple[str, ...]) -> None:
        self.app = app
        self._digests = {hashlib.sha256(k.encode()).digest(): hashlib.sha256(k.encode()).hexdigest()[:8] for k in keys}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = None if scope["type"] != "http" or scope["path"] in OPEN_PATHS else self._refusal(scope)
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            scope[LOG_FIELDS]["error"] = refusal.type
            await error_response(refusal, scope)(scope, receive, send)

    def _refusal(self, scope: Scope) -> ServiceError | None:
        if not self._digests:
            if _is_loopback(scope.get("client")):
                return None
            return Unauthorized("Only loopback clients may call this service until the operator sets SERVICE_API_KEYS.")
        key_id = self._key_id(scope)
        if key_id is None:
            message = "A valid service token is required: send Authorization: Bearer <token>."
            return Unauthorized(message, headers={"WWW-Authenticate": "Bearer"})
        scope[LOG_FIELDS]["key_id"] = key_id
        return None

    def _key_id(self, scope: Scope) -> str | None:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        digest = hashlib.sha256(token.strip()).digest()
        found = None
        for known, key_id in self._digests.items():  # compare with every key, in constant time
            if hmac.compare_digest(digest, known) and scheme.lower() == b"bearer":
                found = key_id
        return found


def _is_loopback(client: tuple[str, int] | None) -> bool:
    try:
        address = ipaddress.ip_address(client[0]) if client else None
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address is not None and address.is_loopback


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
    """The envelope; on the SDK routes it also carries `code`, which the OpenAI and groq SDKs read."""
    request_id = logging_config.REQUEST_ID.get() or ""
    body = error.body(request_id, openai=scope["path"].startswith(("/openai/", "/v1/")))
    return Response(body, error.status, headers=error.headers, media_type="application/json")
