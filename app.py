"""The Starlette app: its routes and middleware declared in one place, and the handlers behind them.

Run it with `python app.py` (see server.py) or `python -m uvicorn app:app`.
"""

from __future__ import annotations

import signal

if __name__ == "__main__":  # first, before the imports below (~0.5 s): a SIGHUP while starting is ignored
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # server.main keeps it so until the reload takes it

import contextlib
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

import access
import body
import errors
import reloading
import shutdown
import streaming
from config import Settings
from disconnect import while_connected
from envelope import chat_error_event, http_error, openai_error_event, service_error
from llm import Upstream
from middleware import Cors, RequestLog
from pacing import Paced
from record import RECORD, Record, elapsed_ms
from sdk_validation import check_model_id, parse_completion
from validation import parse_chat

if TYPE_CHECKING:
    import quota
    from fallback import Fallbacks
    from metrics import Metrics

logger = logging.getLogger("service")
_JSON = "application/json"


def create_app(settings: Settings, *, reload_on_hup: bool = False) -> Starlette:
    service = Service(settings, reload_on_hup=reload_on_hup)
    routes = [
        Route("/", service.status),
        Route("/healthz", service.healthz),
        Route("/readyz", service.readyz),
        Route("/chat", service.chat, methods=["POST"]),
        Route("/openai/v1/chat/completions", service.completions, methods=["POST"]),
        Route("/v1/chat/completions", service.completions, methods=["POST"]),
        Route("/openai/v1/models", service.models),
        Route("/v1/models", service.models),
        Route("/openai/v1/models/{model:path}", service.models),  # model ids hold slashes, sent unescaped
        Route("/v1/models/{model:path}", service.models),
    ]
    observe = None
    if settings.metrics:  # prometheus-client is optional: imported only when asked for
        import metrics

        service.metrics = metrics.Metrics(settings, paths=[*(route.path for route in routes), "/metrics"])
        routes.append(Route("/metrics", service.metrics.scrape))
        observe = service.metrics.observe
    if settings.quotas_on():  # quota.py (and quota_redis.py) imported only when a limit is set
        import quota

        service.quota = quota.build(settings, on_remaining=service.metrics.quota if service.metrics else None)
    if settings.fallback_models:  # fallback.py imported only when FALLBACK_MODELS is set
        import fallback

        on_fallback = service.metrics.fallback if service.metrics else None
        service.fallbacks = fallback.Fallbacks(settings, on_fallback=on_fallback)
    cors = [
        Middleware(
            Cors,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    ]
    # Real order, outermost first: Starlette's ServerErrorMiddleware -> RequestLog -> Paced -> EndOnShutdown
    # -> CORS (if set) -> Authorize -> QuotaGate (if a quota is set) -> Starlette's ExceptionMiddleware -> router.
    middleware = [
        Middleware(RequestLog, observe=observe),
        Middleware(Paced),
        Middleware(shutdown.EndOnShutdown, requests=service.requests),
        *(cors if settings.cors_origins else []),
        Middleware(access.Authorize, keyring=service.keyring, settings=settings),
        *([Middleware(service.quota.gate)] if service.quota else []),
    ]
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=service.lifespan,
        exception_handlers={HTTPException: http_error, errors.ServiceError: service_error},
    )
    app.router.redirect_slashes = False  # its redirect would build a Location from the client's Host header
    app.state.service = service
    return app


class Service:
    """Per-process state (settings, clients, the Groq client, requests in flight) and the route handlers."""

    def __init__(self, settings: Settings, *, reload_on_hup: bool = False) -> None:
        self.settings = settings  # replaced, with keyring and upstream, by a reload (reloading.py)
        self.keyring = access.Keyring(settings)
        self.reload_on_hup = reload_on_hup  # SIGHUP reloads the files (reloading.py): a main thread's loop only
        self.upstream: Upstream | None = None
        self.in_flight = 0
        self.draining = False
        self.quota: quota.Quota | None = None  # set by create_app, after the metrics it reports to
        self.requests = shutdown.Requests()  # every HTTP request in flight, ended at the shutdown deadline
        self.metrics: Metrics | None = None
        self.fallbacks: Fallbacks | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[dict[str, Any]]:
        body.return_freed_memory()
        if self.settings.groq_api_key:
            self.upstream = Upstream(self.settings)
        else:
            logger.warning("GROQ_API_KEY is not set: the service starts, but /chat answers 503 not_configured")
        if not self.settings.service_api_keys and not self.settings.service_keys:
            logger.warning("SERVICE_API_KEYS is not set: only /, /healthz and /readyz answer non-loopback clients")
        if self.settings.redis_url and self.quota is None:
            logger.warning("REDIS_URL is set but no quota is; Redis is not used")
        reloader = reloading.Reloader(self).install()
        try:
            yield {"client_timeout": self.settings.client_timeout, "metrics": self.metrics}  # framing.py reads both
        finally:
            await reloader.aclose()
            if self.upstream is not None:
                await self.upstream.aclose()
            if self.quota is not None:
                await self.quota.aclose()

    async def status(self, request: Request) -> Response:
        return _json({"status": "ok", "service": "Groq Starlette Service"})

    async def healthz(self, request: Request) -> Response:
        return _json({"status": "ok", "model": self.settings.groq_model})

    async def readyz(self, request: Request) -> Response:
        if self.draining:
            return _json({"status": "not_ready", "reason": "shutting down"}, 503)
        if self.upstream is None:
            return _json({"status": "not_ready", "reason": "GROQ_API_KEY is not set"}, 503)
        if self.quota is not None and not await self.quota.ready():
            return _json({"status": "not_ready", "reason": "the quota store (Redis) cannot be reached"}, 503)
        return _json({"status": "ready"})

    async def chat(self, request: Request) -> Response:
        self._upstream()  # 503 before reading the body; the call takes the Upstream of its time (a reload swaps it)
        chat = parse_chat(await self._body(request), allowed_models=self._allowed_models(request))
        model = chat.model or self.settings.groq_model
        record = self._record_chat(request, model, chat.messages)
        await self._admit(request, chat.params.get("max_tokens") or chat.params.get("max_completion_tokens"))
        chain = self.fallbacks.chain(model, request.scope) if self.fallbacks else None
        limits: list[tuple[str, str]] = []  # Groq's x-ratelimit-*, passed on (quota.py swaps in its own)
        body = {"messages": chat.messages, "model": model, **chat.params}
        if chat.stream:
            record.stream = True
            pieces = self._upstream().chat_stream(body, chain, limits)
            return await streaming.start(
                pieces, streaming.chat_encoder(record), chat_error_event, record, self._release, request.receive, limits
            )
        with self._slot(record):
            result = await while_connected(request.receive, self._upstream().chat(body, chain, limits))
        streaming.note_result(record, result)
        return _json(result.answer(), headers=limits)

    async def completions(self, request: Request) -> Response:
        """The groq and openai SDKs' own route: Groq's body and stream relayed as Groq sent them."""
        self._upstream()
        completion = parse_completion(await self._body(request), allowed_models=self._allowed_models(request))
        record = self._record_chat(request, completion.model, completion.body["messages"])
        body = completion.body
        await self._admit(request, body.get("max_completion_tokens") or body.get("max_tokens"))
        chain = self.fallbacks.chain(completion.model, request.scope) if self.fallbacks else None
        limits: list[tuple[str, str]] = []  # Groq's x-ratelimit-*, passed on (quota.py swaps in its own)
        if completion.stream:
            record.stream = True
            body, strip_usage = self.quota.ask_for_usage(body) if self.quota else (body, False)
            events = self._upstream().stream_events(body, chain, limits)
            return await streaming.start(
                events,
                streaming.relay_encoder(record, strip_usage),
                openai_error_event,
                record,
                self._release,
                request.receive,
                limits,
            )
        with self._slot(record):
            raw, data = await while_connected(
                request.receive, self._upstream().complete(completion.body, chain, limits)
            )
        streaming.note_completion(record, data)
        return Response(raw, headers=dict(limits), media_type=_JSON)

    async def models(self, request: Request) -> Response:
        """The model list, narrowed to the allowed models; or one model (`model` in the path), 404 outside them."""
        model_id, allowed = request.path_params.get("model"), self._allowed_models(request)
        model_id = None if model_id is None else check_model_id(model_id, allowed)  # before any quota is spent
        limits: list[tuple[str, str]] = []  # Groq's x-ratelimit-*, passed on (quota.py swaps in its own)
        await self._admit(request, 0)  # holds a slot: nothing may raise before `_slot` takes it over
        with self._slot(request.scope[RECORD]):
            upstream = self._upstream()  # inside: admitted, so not_configured is refunded like any refusal
            if model_id is not None:
                model = await while_connected(request.receive, upstream.model(model_id, limits))
                return _json(model, headers=limits)
            listing = await while_connected(request.receive, upstream.models(limits))
        if allowed and isinstance(listing.get("data"), list):
            listing["data"] = [m for m in listing["data"] if isinstance(m, dict) and m.get("id") in allowed]
        return _json(listing, headers=limits)

    def _record_chat(self, request: Request, model: str, messages: list[Any]) -> Record:
        """A chat call's record: the model asked for, and with LOG_PROMPTS the messages (the answer's text follows)."""
        record: Record = request.scope[RECORD]
        record.call_model = model
        if self.settings.log_prompts:
            record.messages = messages
            record.completion = ""
        return record

    async def _admit(self, request: Request, max_tokens: object) -> None:
        """A slot (freed by `_slot` or streaming.start) first, so `overloaded` spends no quota; then the quota's."""
        self._acquire()
        if self.quota is not None:
            try:
                await self.quota.admit(request.scope, request.scope.get(body.BODY_BYTES), max_tokens)
            except BaseException:
                self._release()
                raise

    def _allowed_models(self, request: Request) -> tuple[str, ...]:
        client = request.scope.get(access.CLIENT)  # a SERVICE_KEYS_FILE entry may narrow ALLOWED_MODELS
        return client.allowed_models if client is not None and client.allowed_models else self.settings.allowed_models

    @contextlib.contextmanager
    def _slot(self, record: Record) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._release()
            record.upstream_ms = elapsed_ms(started)

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

    async def _body(self, request: Request) -> dict[str, Any]:
        return await body.read_json(request, limit=self.settings.max_body_bytes, timeout=self.settings.client_timeout)


def _json(payload: dict[str, Any], status: int = 200, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(errors.encode_json(payload), status, headers=dict(headers or ()), media_type=_JSON)


def __getattr__(name: str) -> Any:
    # PEP 562: importing this module does nothing but define; `app.app` is built when first asked for.
    if name == "app":
        import server  # the process's start-up (settings, logging), only when an app is asked for

        return server.app_from_environment(create_app)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    import server

    server.main(create_app)
