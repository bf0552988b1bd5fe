"""Pure ASGI middleware: the request id and the one access line per request, and who may call.

The whole stack, and its order, is declared in app.py.
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
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import body
import logging_config
from config import ServiceKey, Settings
from errors import InvalidRequest, MethodNotAllowed, NotFound, ServiceError, Unauthorized

logger = logging.getLogger("service")
LOG_FIELDS = "service.log_fields"  # scope key: the dict that becomes the request's access line
CLIENT = "service.client"  # scope key: the ServiceKey of the caller, set by Authorize (quotas and models use it)
LOCAL = ServiceKey("local", b"")  # every loopback caller when no token is configured: one client
# scope key, for metrics: (model, streamed, ms into the Groq wait its call began). The access line's `model` is
# None until Groq names the model it answers with (metrics learn model labels only from Groq) or a fallback is
# tried; RequestLog writes the one asked for if neither happened.
REQUESTED = "service.requested"
OPEN_PATHS = frozenset({"/", "/healthz", "/readyz"})
LOOPBACK_ONLY = (
    "Only loopback clients may call this service: set SERVICE_API_KEYS (or SERVICE_KEYS_FILE) to serve"
    " non-loopback clients."
)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_FORWARDING = frozenset({b"x-forwarded-for", b"x-real-ip", b"forwarded"})  # sent by proxies, never by a local client
_HOST = re.compile(r"(\[[^\]]*\]|[^:\[\]]+)(?::[0-9]*)?")
_ORIGIN = re.compile(r"https?://(.+)")


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


class Keyring:
    """The clients Authorize knows, by their token's SHA-256; a reload replaces them for the requests after it."""

    def __init__(self, settings: Settings) -> None:
        self.replace(settings)

    def replace(self, settings: Settings) -> None:
        digests = [hashlib.sha256(k.encode()) for k in settings.service_api_keys]
        # Tokens from SERVICE_API_KEYS are known by an 8-hex key_id, entries of SERVICE_KEYS_FILE by their name.
        self.clients = {c.sha256: c for c in settings.service_keys} or {
            d.digest(): ServiceKey(d.hexdigest()[:8], d.digest()) for d in digests
        }
        self.log_as = "key" if settings.service_keys else "key_id"


class Authorize:
    """Every route but the open ones needs a service token, or a loopback peer when none is configured.

    Decided on the raw `scope["path"]`, never on a URL rebuilt from the Host header. Without tokens, every
    path also needs a loopback Host (or one in ALLOWED_HOSTS) and no foreign Origin: a browser is a loopback
    peer too, and a page on a domain that resolves to 127.0.0.1 (DNS rebinding) must not reach the service.
    With tokens, the Host is checked only when ALLOWED_HOSTS is set. The host patterns match the way
    Starlette's TrustedHostMiddleware matches them; that middleware is not used because it refuses in plain text.
    """

    def __init__(
        self,
        app: ASGIApp,
        keyring: Keyring,
        allowed_hosts: tuple[str, ...] = (),
        cors_origins: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self._keyring = keyring  # a reload never turns tokens on or off (reloading.py), so _hosts stays right
        self._hosts = allowed_hosts if allowed_hosts or not keyring.clients else None  # None: no Host check
        self._origins = frozenset(cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = None
        if scope["type"] == "http":
            refusal = self._misdirected(scope)
            if refusal is None and scope["path"] not in OPEN_PATHS:
                refusal = self._refusal(scope)
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            scope[LOG_FIELDS]["error"] = refusal.type
            await error_response(refusal, scope)(scope, receive, send)

    def _misdirected(self, scope: Scope) -> ServiceError | None:
        host = _host(_header(scope, b"host"))
        if self._hosts is not None and not (_is_loopback_name(host) or _matches(host, self._hosts)):
            names = "localhost, 127.0.0.1 or [::1] (any port), or a host in ALLOWED_HOSTS"
            return InvalidRequest(
                f"The Host header must be {names}: this service refuses requests addressed to other names,"
                " such as a web page's domain that resolves here. The operator can add a name to ALLOWED_HOSTS."
            )
        origin = _header(scope, b"origin")
        if self._keyring.clients or origin is None or "*" in self._origins or origin.lower() in self._origins:
            return None
        match = _ORIGIN.fullmatch(origin.lower())
        if match is None or not _is_loopback_name(_host(match.group(1))):
            return InvalidRequest(
                "Requests from web pages on other origins are refused while the service answers loopback clients"
                " only; the operator can allow an origin in CORS_ORIGINS."
            )
        return None

    def _refusal(self, scope: Scope) -> ServiceError | None:
        if not self._keyring.clients:
            forwarded = any(k in _FORWARDING for k, _ in scope["headers"])
            if _is_loopback(scope.get("client")) and not forwarded:
                scope[CLIENT] = LOCAL
                return None
            return Unauthorized(LOOPBACK_ONLY)
        client = self._client(scope)
        if client is None:
            message = "A valid service token is required: send Authorization: Bearer <token>."
            return Unauthorized(message, headers={"WWW-Authenticate": "Bearer"})
        scope[LOG_FIELDS][self._keyring.log_as] = client.name
        scope[CLIENT] = client
        return None

    def _client(self, scope: Scope) -> ServiceKey | None:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        digest = hashlib.sha256(token.strip()).digest()
        found = None
        for known, client in self._keyring.clients.items():  # compare with every key, in constant time
            if hmac.compare_digest(digest, known) and scheme.lower() == b"bearer":
                found = client
        return found


def _header(scope: Scope, name: bytes) -> str | None:
    return next((v.decode("latin-1") for k, v in scope["headers"] if k == name), None)


def _host(value: str | None) -> str | None:
    """The host part of a Host header (or an origin's authority), lower-cased, IPv6 in brackets; None if malformed."""
    match = _HOST.fullmatch(value.lower()) if value else None
    return match.group(1) if match else None


def _is_loopback_name(host: str | None) -> bool:
    return host == "localhost" or (host is not None and _is_loopback((host.removeprefix("[").removesuffix("]"), 0)))


def _matches(host: str | None, patterns: tuple[str, ...]) -> bool:
    return host is not None and any(
        p == "*" or host == p or (p.startswith("*.") and host.endswith(p[1:])) for p in patterns
    )


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
