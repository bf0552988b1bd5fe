"""Who may call: the service tokens (Keyring, replaced by a reload) and the checks on each request (Authorize).

Authorize's place in the middleware stack is declared in app.py.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re

from starlette.types import ASGIApp, Receive, Scope, Send

from config import ServiceKey, Settings
from envelope import error_response
from errors import InvalidRequest, NotFound, ServiceError, Unauthorized
from record import RECORD, Record

CLIENT = "service.client"  # scope key: the ServiceKey of the caller, set by Authorize (quotas and models use it)
LOCAL = ServiceKey("local", b"")  # every loopback caller when no token is configured: one client
OPEN_PATHS = frozenset({"/", "/healthz", "/readyz"})
METRICS_PATH = "/metrics"
LOOPBACK_ONLY = (
    "Only loopback clients may call this service: set SERVICE_API_KEYS (or SERVICE_KEYS_FILE) to serve"
    " non-loopback clients."
)
_FORWARDING = frozenset({b"x-forwarded-for", b"x-real-ip", b"forwarded"})  # sent by proxies, never by a local client
_HOST = re.compile(r"(\[[^\]]*\]|[^:\[\]]+)(?::[0-9]*)?")
_ORIGIN = re.compile(r"https?://(.+)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # in a decoded path: never one of ours


class Keyring:
    """The clients Authorize knows, by their token's SHA-256, and METRICS_TOKEN's; a reload replaces them for the
    requests after it."""

    def __init__(self, settings: Settings) -> None:
        self.replace(settings)

    def replace(self, settings: Settings) -> None:
        digests = [hashlib.sha256(k.encode()) for k in settings.service_api_keys]
        # Tokens from SERVICE_API_KEYS are known by an 8-hex key_id, entries of SERVICE_KEYS_FILE by their name.
        self.clients = {c.sha256: c for c in settings.service_keys} or {
            d.digest(): ServiceKey(d.hexdigest()[:8], d.digest()) for d in digests
        }
        self.named = bool(settings.service_keys)  # the access line shows a `key` (its name), else a `key_id`
        token = settings.metrics_token  # the scraper's: it opens /metrics only
        self.metrics = hashlib.sha256(token.encode()).digest() if token else None


class Authorize:
    """Every route but the open ones needs a service token, or a loopback peer when none is configured.

    `/metrics` (when served) has a rule of its own: only METRICS_TOKEN, or, without it, a loopback peer with a
    loopback Host (never a client token); the metrics token opens no other route.

    Decided on the raw `scope["path"]`, never on a URL rebuilt from the Host header. Without tokens, every
    path also needs a loopback Host (or one in ALLOWED_HOSTS) and no foreign Origin: a browser is a loopback
    peer too, and a page on a domain that resolves to 127.0.0.1 (DNS rebinding) must not reach the service.
    With tokens, the Host is checked only when ALLOWED_HOSTS is set. The host patterns match the way
    Starlette's TrustedHostMiddleware matches them; that middleware is not used because it refuses in plain text.
    """

    def __init__(self, app: ASGIApp, keyring: Keyring, settings: Settings) -> None:
        """The tokens come from `keyring` (a reload replaces them); the rest of `settings` is fixed at start."""
        self.app = app
        self._keyring = keyring  # a reload never turns tokens on or off (reloading.py), so _hosts stays right
        self._metrics = settings.metrics  # /metrics is served
        self._allowed_hosts = allowed_hosts = settings.allowed_hosts
        self._hosts = allowed_hosts if allowed_hosts or not keyring.clients else None  # None: no Host check
        self._origins = frozenset(settings.cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = None
        if scope["type"] == "http":
            refusal = self._misdirected(scope)
            if refusal is None and _CONTROL.search(scope["path"]):
                # uvicorn decodes %0A, and Starlette's route patterns end in `$`, which matches before a final
                # newline: "/chat\n" would reach /chat past every rule that compares the path exactly.
                refusal = NotFound("No route matches this path: it holds a control character.")
            elif refusal is None and self._metrics and scope["path"] == METRICS_PATH:
                refusal = self._scraper_refusal(scope)
            elif refusal is None and self._keyring.metrics and self._bearer_is(scope, self._keyring.metrics):
                refusal = Unauthorized("METRICS_TOKEN opens /metrics only.", headers={"WWW-Authenticate": "Bearer"})
            elif refusal is None and scope["path"] not in OPEN_PATHS:
                refusal = self._refusal(scope)
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            record: Record = scope[RECORD]
            record.error = refusal.type
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
        record: Record = scope[RECORD]
        if self._keyring.named:
            record.key = client.name
        else:
            record.key_id = client.name
        scope[CLIENT] = client
        return None

    def _scraper_refusal(self, scope: Scope) -> ServiceError | None:
        if self._keyring.metrics is not None:
            if self._bearer_is(scope, self._keyring.metrics):
                return None
            message = "/metrics needs the scraper's token: send Authorization: Bearer <METRICS_TOKEN>."
            return Unauthorized(message, headers={"WWW-Authenticate": "Bearer"})
        # No METRICS_TOKEN: a local scraper only, decided on the socket's peer, never on a token or forwarded
        # headers; and a loopback Host, so a web page on a name that resolves here (DNS rebinding) cannot read it.
        host = _host(_header(scope, b"host"))
        local_host = _is_loopback_name(host) or _matches(host, self._allowed_hosts)
        forwarded = any(k in _FORWARDING for k, _ in scope["headers"])
        if _is_loopback(scope.get("client")) and not forwarded and local_host:
            return None
        return Unauthorized(
            "/metrics answers loopback peers only while METRICS_TOKEN is not set; the operator can set it to let a"
            " scraper elsewhere in."
        )

    def _client(self, scope: Scope) -> ServiceKey | None:
        scheme, digest = _bearer(scope)
        found = None
        for known, client in self._keyring.clients.items():  # compare with every key, in constant time
            if hmac.compare_digest(digest, known) and scheme.lower() == b"bearer":
                found = client
        return found

    @staticmethod
    def _bearer_is(scope: Scope, known: bytes) -> bool:
        scheme, digest = _bearer(scope)
        return hmac.compare_digest(digest, known) and scheme.lower() == b"bearer"


def _bearer(scope: Scope) -> tuple[bytes, bytes]:
    """The Authorization header's scheme, and the SHA-256 of its token (compared in constant time, never echoed)."""
    header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
    scheme, _, token = header.partition(b" ")
    return scheme, hashlib.sha256(token.strip()).digest()


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
