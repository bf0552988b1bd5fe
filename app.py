"""The Starlette app: routes, middleware and the handlers behind them.

Run it with `python app.py` (see server.py) or `python -m uvicorn app:app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import logging_config
from config import Settings, SettingsError, load_settings
from errors import (
    InvalidJSON,
    MethodNotAllowed,
    NotConfigured,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    Unauthorized,
    UnsupportedMediaType,
)
from llm import ChatResult, Upstream
from validation import parse_chat, parse_completion

logger = logging.getLogger("service")
LOG_FIELDS = "service.log_fields"  # scope key: the dict that becomes the request's access line
OPEN_PATHS = frozenset({"/", "/healthz", "/readyz"})
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_JSON = "application/json"
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(settings: Settings) -> Starlette:
    service = Service(settings)
    routes = [
        Route("/", service.status),
        Route("/healthz", service.healthz),
        Route("/readyz", service.readyz),
        Route("/chat", service.chat, methods=["POST"]),
        Route("/openai/v1/chat/completions", service.completions, methods=["POST"]),
        Route("/v1/chat/completions", service.completions, methods=["POST"]),
        Route("/openai/v1/models", service.models),
        Route("/v1/models", service.models),
    ]
    cors = [
        Middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    ]
    # Real order, outermost first: Starlette's ServerErrorMiddleware -> _Observe -> CORS (if set)
    # -> _Authorize -> Starlette's ExceptionMiddleware -> router.
    middleware = [
        Middleware(_Observe, secrets=_secrets(settings)),
        *(cors if settings.cors_origins else []),
        Middleware(_Authorize, keys=settings.service_api_keys),
    ]
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=service.lifespan,
        exception_handlers={HTTPException: _http_error, ServiceError: _service_error},
    )
    app.state.service = service
    return app


class Service:
    """Per-process state (settings, the Groq client, requests in flight) and the route handlers."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.upstream: Upstream | None = None
        self.in_flight = 0
        self.draining = False

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[dict[str, Any]]:
        if self.settings.groq_api_key:
            self.upstream = Upstream(self.settings)
        else:
            logger.warning("GROQ_API_KEY is not set: the service starts, but /chat answers 503 not_configured")
        if not self.settings.service_api_keys:
            logger.warning("SERVICE_API_KEYS is not set: /chat answers loopback clients only")
        try:
            yield {"client_timeout": self.settings.client_timeout}
        finally:
            if self.upstream is not None:
                await self.upstream.aclose()

    async def status(self, request: Request) -> Response:
        return _json({"status": "ok", "service": "Groq Starlette Service"})

    async def healthz(self, request: Request) -> Response:
        return _json({"status": "ok", "model": self.settings.groq_model})

    async def readyz(self, request: Request) -> Response:
        if self.draining:
            return _json({"status": "not_ready", "reason": "shutting down"}, 503)
        if self.upstream is None:
            return _json({"status": "not_ready", "reason": "GROQ_API_KEY is not set"}, 503)
        return _json({"status": "ready"})

    async def chat(self, request: Request) -> Response:
        upstream = self._upstream()
        chat = parse_chat(await self._read_json(request), allowed_models=self.settings.allowed_models)
        model = chat.model or self.settings.groq_model
        fields = self._log_request(request, model, chat.messages)
        if chat.stream:
            pieces = upstream.chat_stream(chat.messages, model, chat.params)
            return await self._stream(pieces, _chat_encoder(fields), _chat_error_event, fields)
        with self._slot(fields):
            result = await upstream.chat(chat.messages, model, chat.params)
        _log_result(fields, result.model, result.usage, fields.get("completion") is not None and result.content)
        return _json(result.as_dict())

    async def completions(self, request: Request) -> Response:
        """The groq and openai SDKs' own route: Groq's body and stream relayed as Groq sent them."""
        upstream = self._upstream()
        completion = parse_completion(await self._read_json(request), allowed_models=self.settings.allowed_models)
        fields = self._log_request(request, completion.model, completion.body["messages"])
        if completion.stream:
            events = upstream.stream_events(completion.body)
            return await self._stream(events, _relay_encoder(fields), _openai_error_event, fields)
        with self._slot(fields):
            raw, data = await upstream.complete(completion.body)
        _note_completion(fields, data)
        return Response(raw, media_type=_JSON)

    async def models(self, request: Request) -> Response:
        with self._slot(request.scope[LOG_FIELDS]):
            listing = await self._upstream().models()
        if self.settings.allowed_models and isinstance(listing.get("data"), list):
            listing["data"] = [
                m for m in listing["data"] if isinstance(m, dict) and m.get("id") in self.settings.allowed_models
            ]
        return _json(listing)

    def _log_request(self, request: Request, model: str, messages: object) -> dict[str, Any]:
        fields: dict[str, Any] = request.scope[LOG_FIELDS]
        fields["model"] = model
        if self.settings.log_prompts:
            fields["messages"] = messages
            fields["completion"] = ""
        return fields

    @contextlib.contextmanager
    def _slot(self, fields: dict[str, Any]) -> Iterator[None]:
        self._acquire()
        started = time.perf_counter()
        try:
            yield
        finally:
            self._release()
            fields["upstream_ms"] = _ms(started)

    async def _stream(
        self,
        pieces: AsyncGenerator[Any],
        encode: Callable[[Any], bytes],
        error_event: Callable[[ServiceError], bytes],
        fields: dict[str, Any],
    ) -> Response:
        """Wait for the first piece (an error before it is an ordinary JSON error), then stream the rest."""
        self._acquire()
        started = time.perf_counter()
        try:
            first = await anext(pieces)
        except BaseException:
            await pieces.aclose()
            self._release()
            raise
        fields["upstream_ms"] = _ms(started)
        events = self._relay(first, pieces, encode, error_event, fields)
        return _EventStream(events, headers=_STREAM_HEADERS, media_type="text/event-stream")

    async def _relay(
        self,
        piece: Any,
        pieces: AsyncGenerator[Any],
        encode: Callable[[Any], bytes],
        error_event: Callable[[ServiceError], bytes],
        fields: dict[str, Any],
    ) -> AsyncGenerator[bytes]:
        finished = False
        try:
            while True:
                yield encode(piece)
                piece = await anext(pieces)
        except StopAsyncIteration:
            finished = True
        except ServiceError as err:  # after the first byte, an error can only end the stream
            fields["error"] = err.type
            finished = True
            yield error_event(err)
        finally:
            if not finished:
                fields["disconnected"] = True
            await pieces.aclose()
            self._release()

    def _upstream(self) -> Upstream:
        if self.upstream is None:
            raise NotConfigured("GROQ_API_KEY is not set; the operator must set it before /chat can answer.")
        return self.upstream

    def _acquire(self) -> None:
        if self.in_flight >= self.settings.max_concurrency:
            raise Overloaded("Too many requests are in flight; retry in a second.", retry_after="1")
        self.in_flight += 1

    def _release(self) -> None:
        self.in_flight -= 1

    async def _read_json(self, request: Request) -> dict[str, Any]:
        """The body as a JSON object: media type and size checked before parsing, size counted as it arrives."""
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != _JSON:
            raise UnsupportedMediaType("Send the body as JSON with Content-Type: application/json.")
        limit = self.settings.max_body_bytes
        too_large = PayloadTooLarge(f"The body must be at most {limit} bytes (MAX_BODY_BYTES).")
        length = request.headers.get("content-length")
        if length is not None and int(length) > limit:
            raise too_large
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.settings.client_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise too_large
                    chunks.append(chunk)
        except TimeoutError:
            raise RequestTimeout("The body did not arrive within CLIENT_TIMEOUT seconds; send it promptly.") from None
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, RecursionError):
            raise InvalidJSON("The body is not valid JSON; send one UTF-8 JSON object.") from None
        if not isinstance(body, dict):
            raise InvalidJSON('The body must be a JSON object, e.g. {"prompt": "Hello"}.')
        return body


class _EventStream(StreamingResponse):
    """A StreamingResponse that always closes its generator, so the upstream stream and the
    concurrency slot are released as soon as the client goes, not when the generator is collected."""

    def __init__(self, events: AsyncGenerator[bytes], **kwargs: Any) -> None:
        super().__init__(events, **kwargs)
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()


class _Observe:
    """Request id, the one access line per request, and the last-resort 500."""

    def __init__(self, app: ASGIApp, secrets: tuple[str, ...]) -> None:
        self.app = app
        self._secrets = frozenset(secrets)

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
                await _error_response(error, scope)(scope, receive, send_with_id)
        finally:
            fields["duration_ms"] = _ms(started)
            logger.info("request", extra={"fields": fields})
            logging_config.REQUEST_ID.reset(token)


class _Authorize:
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
            await _error_response(refusal, scope)(scope, receive, send)

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


def _json(payload: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(payload, ensure_ascii=False).encode(), status, media_type=_JSON)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


def _log_result(fields: dict[str, Any], model: object, usage: object, completion: str | bool) -> None:
    if isinstance(model, str):
        fields["model"] = model
    if isinstance(usage, dict):
        fields["prompt_tokens"] = usage.get("prompt_tokens")
        fields["completion_tokens"] = usage.get("completion_tokens")
    if completion is not False:
        fields["completion"] = completion


def _chat_encoder(fields: dict[str, Any]) -> Callable[[list[str] | ChatResult], bytes]:
    """/chat events: one `data: {"content": ...}` per delta, then the metadata and `[DONE]`."""

    def encode(piece: list[str] | ChatResult) -> bytes:
        if isinstance(piece, ChatResult):
            _log_result(fields, piece.model, piece.usage, False)
            return b"data: %s\n\ndata: [DONE]\n\n" % json.dumps(piece.as_dict()).encode()
        if "completion" in fields:
            fields["completion"] += "".join(piece)
        return b"".join(b'data: {"content": %s}\n\n' % json.dumps(d).encode() for d in piece)

    return encode


def _relay_encoder(fields: dict[str, Any]) -> Callable[[list[tuple[bytes, Any]]], bytes]:
    """Groq's own events, byte for byte; only usage (and text, with LOG_PROMPTS) is read for the log."""

    def encode(events: list[tuple[bytes, Any]]) -> bytes:
        for _, data in events:
            if isinstance(data, dict):
                _note_completion(fields, data)
        return b"".join(raw for raw, _ in events)

    return encode


def _note_completion(fields: dict[str, Any], data: dict[str, Any]) -> None:
    usage = data.get("usage") or (data.get("x_groq") or {}).get("usage")
    if usage:
        _log_result(fields, data.get("model"), usage, False)
    if "completion" in fields:
        for choice in data.get("choices") or ():
            part = (choice.get("delta") or choice.get("message") or {}).get("content")
            fields["completion"] += part if isinstance(part, str) else ""


def _chat_error_event(error: ServiceError) -> bytes:
    return b"event: error\ndata: %s\n\n" % error.body(logging_config.REQUEST_ID.get() or "")


def _openai_error_event(error: ServiceError) -> bytes:
    return b"data: %s\n\n" % error.body(logging_config.REQUEST_ID.get() or "", openai=True)


def _error_response(error: ServiceError, scope: Scope) -> Response:
    request_id = logging_config.REQUEST_ID.get() or ""
    body = error.body(request_id, openai=scope["path"].startswith(("/openai/", "/v1/")))
    return Response(body, error.status, headers=error.headers, media_type=_JSON)


async def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    request.scope[LOG_FIELDS]["error"] = exc.type
    return _error_response(exc, request.scope)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        error: ServiceError = MethodNotAllowed(
            f"This method is not allowed here; use {allow}.", headers={"Allow": allow}
        )
    else:
        error = NotFound("No route matches this path; the endpoints are listed in the README.")
    return await _service_error(request, error)


@functools.cache
def _app_from_environment() -> Starlette:
    """`app:app` for `python -m uvicorn` and for each worker: settings and logging set up on first use."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        raise SystemExit(f"configuration error: {exc}") from None
    logging_config.configure(level=settings.log_level, fmt=settings.log_format, secrets=_secrets(settings))
    return create_app(settings)


def _secrets(settings: Settings) -> tuple[str, ...]:
    return (settings.groq_api_key or "", *settings.service_api_keys)


def __getattr__(name: str) -> Any:
    # PEP 562: importing this module does nothing but define; `app.app` is built when first asked for.
    if name == "app":
        return _app_from_environment()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    import server

    server.main()
