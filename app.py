"""The Starlette app: its routes and middleware declared in one place, and the handlers behind them.

Run it with `python app.py` (see server.py) or `python -m uvicorn app:app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import errors
import logging_config
import streaming
from config import Settings, SettingsError, load_settings
from llm import Upstream
from middleware import LOG_FIELDS, REQUESTED, Authorize, Cors, RequestLog, elapsed_ms, error_response
from sdk_validation import parse_completion
from validation import parse_chat

if TYPE_CHECKING:
    from metrics import Metrics

logger = logging.getLogger("service")
_JSON = "application/json"


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
    observe = None
    if settings.metrics:  # prometheus-client is optional: imported only when asked for
        import metrics

        service.metrics = metrics.Metrics(settings, paths=[*(route.path for route in routes), "/metrics"])
        routes.append(Route("/metrics", service.metrics.scrape))
        observe = service.metrics.observe
    cors = [
        Middleware(
            Cors,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    ]
    # Real order, outermost first: Starlette's ServerErrorMiddleware -> RequestLog -> CORS (if set)
    # -> Authorize -> Starlette's ExceptionMiddleware -> router.
    middleware = [
        Middleware(RequestLog, secrets=settings.secrets(), observe=observe),
        *(cors if settings.cors_origins else []),
        Middleware(Authorize, keys=settings.service_api_keys),
    ]
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=service.lifespan,
        exception_handlers={HTTPException: _http_error, errors.ServiceError: _service_error},
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
        self.metrics: Metrics | None = None

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
        fields = self._log_request(request, model, chat.messages, chat.stream)
        if chat.stream:
            self._acquire()
            pieces = upstream.chat_stream(chat.messages, model, chat.params)
            return await streaming.start(
                pieces, streaming.chat_encoder(fields), streaming.chat_error_event, fields, self._release
            )
        with self._slot(fields):
            result = await upstream.chat(chat.messages, model, chat.params)
        streaming.log_result(
            fields, result.model, result.usage, fields.get("completion") is not None and result.content
        )
        return _json(dataclasses.asdict(result))

    async def completions(self, request: Request) -> Response:
        """The groq and openai SDKs' own route: Groq's body and stream relayed as Groq sent them."""
        upstream = self._upstream()
        completion = parse_completion(await self._read_json(request), allowed_models=self.settings.allowed_models)
        fields = self._log_request(request, completion.model, completion.body["messages"], completion.stream)
        if completion.stream:
            self._acquire()
            events = upstream.stream_events(completion.body)
            return await streaming.start(
                events, streaming.relay_encoder(fields), streaming.openai_error_event, fields, self._release
            )
        with self._slot(fields):
            raw, data = await upstream.complete(completion.body)
        streaming.note_completion(fields, data)
        return Response(raw, media_type=_JSON)

    async def models(self, request: Request) -> Response:
        with self._slot(request.scope[LOG_FIELDS]):
            listing = await self._upstream().models()
        if self.settings.allowed_models and isinstance(listing.get("data"), list):
            listing["data"] = [
                m for m in listing["data"] if isinstance(m, dict) and m.get("id") in self.settings.allowed_models
            ]
        return _json(listing)

    def _log_request(self, request: Request, model: str, messages: object, stream: bool) -> dict[str, Any]:
        fields: dict[str, Any] = request.scope[LOG_FIELDS]
        fields["model"] = model
        request.scope[REQUESTED] = (model, stream)
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
            fields["upstream_ms"] = elapsed_ms(started)

    def _upstream(self) -> Upstream:
        if self.upstream is None:
            raise errors.NotConfigured("GROQ_API_KEY is not set; the operator must set it before /chat can answer.")
        return self.upstream

    def _acquire(self) -> None:
        if self.in_flight >= self.settings.max_concurrency:
            raise errors.Overloaded("Too many requests are in flight; retry in a second.", retry_after="1")
        self.in_flight += 1
        if self.metrics is not None:
            self.metrics.in_flight(self.in_flight)

    def _release(self) -> None:
        self.in_flight -= 1
        if self.metrics is not None:
            self.metrics.in_flight(self.in_flight)

    async def _read_json(self, request: Request) -> dict[str, Any]:
        """The body as a JSON object: media type and size checked before parsing, size counted as it arrives."""
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != _JSON:
            raise errors.UnsupportedMediaType("Send the body as JSON with Content-Type: application/json.")
        limit = self.settings.max_body_bytes
        length = request.headers.get("content-length")
        size = limit + 1 if length and length.isdigit() and int(length) > limit else 0  # then refused unread
        chunks: list[bytes] = []
        if size <= limit:
            try:
                async with asyncio.timeout(self.settings.client_timeout):
                    async for chunk in request.stream():
                        size += len(chunk)
                        if size > limit:
                            break
                        chunks.append(chunk)
            except TimeoutError:
                message = "The body did not arrive within CLIENT_TIMEOUT seconds; send it promptly."
                raise errors.RequestTimeout(message) from None
        if size > limit:
            raise errors.PayloadTooLarge(f"The body must be at most {limit} bytes (MAX_BODY_BYTES).")
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, RecursionError):
            raise errors.InvalidJSON("The body is not valid JSON; send one UTF-8 JSON object.") from None
        if not isinstance(body, dict):
            raise errors.InvalidJSON('The body must be a JSON object, e.g. {"prompt": "Hello"}.')
        return body


def _json(payload: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(payload, ensure_ascii=False).encode(), status, media_type=_JSON)


async def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.ServiceError)
    request.scope[LOG_FIELDS]["error"] = exc.type
    return error_response(exc, request.scope)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        error: errors.ServiceError = errors.MethodNotAllowed(
            f"This method is not allowed here; use {allow}.", headers={"Allow": allow}
        )
    else:
        error = errors.NotFound("No route matches this path; the endpoints are listed in the README.")
    return await _service_error(request, error)


def configure_from_environment() -> tuple[Settings, dict[str, Any]]:
    """Read the settings and set up logging once at start-up; an invalid value ends the process with one line."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        raise SystemExit(logging_config.fatal_line(f"configuration error: {exc}", fmt=exc.log_format)) from None
    log_config = logging_config.configure(level=settings.log_level, fmt=settings.log_format, secrets=settings.secrets())
    return settings, log_config


@functools.cache
def _app_from_environment() -> Starlette:
    """`app:app` for `python -m uvicorn` and for each worker: settings and logging set up on first use."""
    return create_app(configure_from_environment()[0])


def __getattr__(name: str) -> Any:
    # PEP 562: importing this module does nothing but define; `app.app` is built when first asked for.
    if name == "app":
        return _app_from_environment()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    import server

    server.main()
