"""`GET /metrics` for Prometheus (METRICS=true): OpenTelemetry's HTTP and GenAI names, fed by each request's record.

Imported only when METRICS=true, so prometheus-client (requirements-metrics.txt) stays optional.
`middleware.RequestLog` calls `Metrics.observe` as a request starts and the function it returns once the
request's record is final (framing.py calls `refused_below` for a request refused before the app saw it,
through the lifespan state); `Service` reports its Groq calls in flight, quota.py each client's remaining
quota, and fallback.py each fallback taken. Nothing a client sends can add a series: routes are the app's
templates (else `other`), methods the standard ones (else `_OTHER`), keys the configured clients' names or token
key ids, and a model label only GROQ_MODEL, ALLOWED_MODELS, FALLBACK_MODELS, or (when ALLOWED_MODELS is unset)
the first `_LEARNED_MODELS` models Groq answered with (in a completion or a stream chunk); any other model is
`other`. /metrics answers only METRICS_TOKEN or, without it, loopback peers (access.Authorize).

With several workers, prometheus-client's multiprocess mode: `python app.py` makes a private directory for
its files (`shared_directory`) and every worker writes there, so whichever worker answers a scrape sums them.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

import errors
from config import Settings
from record import RECORD, Record

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"  # where prometheus-client's multiprocess mode keeps its files
OTHER = "other"
# Bucket boundaries advised by the OpenTelemetry semantic conventions for each instrument.
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_OPERATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
_TOKEN_BUCKETS = tuple(float(4**i) for i in range(14))  # 1, 4, 16, ... 67108864
_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
# Failures Groq caused, or a bug of ours: not refusals. Every other error type is the service saying no.
_NOT_REFUSALS = frozenset(
    e.type
    for e in (
        errors.UpstreamRejected,
        errors.UpstreamAuth,
        errors.RateLimited,
        errors.UpstreamBusy,
        errors.UpstreamError,
        errors.UpstreamUnreachable,
        errors.UpstreamTimeout,
        errors.ServiceError,  # internal_error
    )
)
# Refused before any Groq call (quotas and the concurrency slot come after the body is read): no operation.
_GROQ_NOT_CALLED = frozenset(
    e.type
    for e in (
        errors.Overloaded,
        errors.QuotaExceeded,
        errors.QuotaUnavailable,
        errors.NotConfigured,
        errors.Unauthorized,
        errors.InvalidJSON,
        errors.InvalidRequest,
        errors.ValidationError,
        errors.PayloadTooLarge,
        errors.UnsupportedMediaType,
        errors.RequestTimeout,
    )
)
_LEARNED_MODELS = 16
_GEN_AI = ("chat", "groq")  # gen_ai_operation_name, gen_ai_provider_name
_GEN_AI_LABELS = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model")


class Metrics:
    """The metric families of one process, and the scrape; made once per app."""

    def __init__(self, settings: Settings, *, paths: Iterable[str]) -> None:
        # No `_created` series: they would double the count for nothing.
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        # prometheus-client itself switches to multiprocess mode when this is set (server.main sets it).
        self._directory = os.environ.get(MULTIPROC_DIR)
        self._registry = CollectorRegistry()  # what a scrape shows; never the library's global one
        self._own = None if self._directory else self._registry  # where the families register themselves
        if self._directory:
            multiprocess.MultiProcessCollector(self._registry, path=self._directory)  # type: ignore[no-untyped-call]
        self._routes = frozenset(paths)
        fallbacks = (model for start, after in settings.fallback_models for model in (start, *after))
        self._models = {settings.groq_model, *settings.allowed_models, *fallbacks}
        self._learning = _LEARNED_MODELS if not settings.allowed_models else 0
        self._children: dict[tuple[object, ...], Any] = {}  # bounded like the labels; skips `labels()`'s checks
        self.requests = self._histogram(
            "http_server_request_duration_seconds",
            "Duration of HTTP server requests, until the last byte of the response.",
            ("http_request_method", "http_route", "http_response_status_code"),
            _HTTP_BUCKETS,
        )
        self.active = self._gauge("http_server_active_requests", "HTTP requests in progress.", ("http_route",))
        self.operations = self._histogram(
            "gen_ai_client_operation_duration_seconds",
            "Duration of chat calls to Groq (for a stream, until its last event).",
            (*_GEN_AI_LABELS, "error_type"),
            _OPERATION_BUCKETS,
        )
        self.token_usage = self._histogram(
            "gen_ai_client_token_usage",
            "Tokens per chat call, as Groq counted them.",
            (*_GEN_AI_LABELS, "error_type", "gen_ai_token_type", "gen_ai_response_model"),
            _TOKEN_BUCKETS,
        )
        self.first_token = self._histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time from the start of a streamed call until Groq's first chunk.",
            (*_GEN_AI_LABELS, "gen_ai_response_model"),
            _FIRST_TOKEN_BUCKETS,
        )
        self.tokens = self._counter(
            "groq_proxy_tokens", "Tokens spent, by client key.", ("key", "gen_ai_token_type", "gen_ai_response_model")
        )
        self.refused = self._counter("groq_proxy_refused", "Requests the service refused, by reason.", ("reason",))
        self.fallbacks = self._counter(
            "groq_proxy_fallbacks", "Calls to a FALLBACK_MODELS fallback after its model failed.", ("from", "to")
        )
        self.upstream_in_flight = self._gauge("groq_proxy_upstream_in_flight", "Groq calls in flight.")
        self.max_concurrency = self._gauge("groq_proxy_max_concurrency", "MAX_CONCURRENCY (summed over workers).")
        self.max_concurrency.set(settings.max_concurrency)
        # Quotas are shared (Redis) by every worker, so the latest figure any of them reported is the right one.
        self.quota_remaining = self._gauge(
            "groq_proxy_quota_remaining",
            "Requests or tokens a client has left under each quota limit that is set, as last reported.",
            ("key", "limit"),
            mode="mostrecent",
        )

    def _histogram(self, name: str, doc: str, labels: Iterable[str], buckets: Iterable[float]) -> Histogram:
        return Histogram(name, doc, labels, buckets=tuple(buckets), registry=self._own)

    def _counter(self, name: str, doc: str, labels: Iterable[str]) -> Counter:
        return Counter(name, doc, labels, registry=self._own)

    def _gauge(
        self, name: str, doc: str, labels: Iterable[str] = (), mode: Literal["livesum", "mostrecent"] = "livesum"
    ) -> Gauge:
        """With several workers `livesum` adds up the live workers' values; `mostrecent` shows the latest one."""
        return Gauge(name, doc, labels, registry=self._own, multiprocess_mode=mode)

    async def scrape(self, request: Request) -> Response:
        if self._directory:
            self._forget_dead_workers(self._directory)
        return Response(generate_latest(self._registry), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    def in_flight(self, count: int) -> None:
        self.upstream_in_flight.set(count)

    def quota(self, key: str, limit: str, remaining: int) -> None:
        """quota.Quota's `on_remaining`: `key` is a configured client name, `limit` a quota limit's name."""
        self._child(self.quota_remaining, key, limit).set(remaining)

    def fallback(self, failed: str, following: str, error: str, seconds: float) -> None:
        """fallback.Chain's `on_fallback`: the failed Groq call (its own operation), and the fallback it led to.
        Both models are FALLBACK_MODELS names, which the operator set."""
        self._child(self.operations, *_GEN_AI, self._model(failed), error).observe(seconds)
        self._child(self.fallbacks, failed, following).inc()

    def observe(self, scope: Scope) -> Callable[[], None]:
        route = scope["path"] if scope["path"] in self._routes else OTHER
        active = self._child(self.active, route)
        active.inc()

        def finished() -> None:
            active.dec()
            self._observed(route, scope[RECORD])

        return finished

    def refused_below(self, record: Record) -> None:
        """framing.GuardedProtocol's record of a request it refused before the app saw it (431, 400)."""
        self._observed(record.path if record.path in self._routes else OTHER, record)

    def _observed(self, route: str, record: Record) -> None:
        method = record.method if record.method in _METHODS else "_OTHER"
        self._child(self.requests, method, route, record.status).observe(record.duration_ms / 1000)
        error = record.error
        if error is not None and error not in _NOT_REFUSALS:
            self._child(self.refused, error).inc()
        if record.call_model is not None and error not in _GROQ_NOT_CALLED:
            self._call(record)

    def _call(self, record: Record) -> None:
        """A chat call that reached Groq (or tried to): duration, tokens, and a stream's first chunk, timed from
        `call_started_ms` into the wait on Groq: the calls that failed before it (fallback.py) are their own
        operations."""
        error = record.error or ""
        # The record's model is None until Groq names one (a completion, a stream chunk): only Groq's names
        # are learned, never a model a client asked for and Groq did not answer (the client may have left first).
        answered = self._model(record.model, learn=not error)
        model = self._model(record.call_model)
        ms = record.duration_ms if record.stream or record.upstream_ms is None else record.upstream_ms
        self._child(self.operations, *_GEN_AI, model, error).observe((ms - record.call_started_ms) / 1000)
        if record.stream and record.upstream_ms is not None:
            self._child(self.first_token, *_GEN_AI, model, answered).observe(
                (record.upstream_ms - record.call_started_ms) / 1000
            )
        key = record.key or record.key_id or "none"  # Authorize: a keys-file name, or a token's id
        for kind, count in (("input", record.prompt_tokens), ("output", record.completion_tokens)):
            if type(count) is int and count >= 0:  # Groq's count, checked: not a bool, a float or garbage
                self._child(self.token_usage, *_GEN_AI, model, error, kind, answered).observe(count)
                self._child(self.tokens, key, kind, answered).inc(count)

    def _child(self, family: Any, *labels: object) -> Any:
        child = self._children.get((family, *labels))
        if child is None:
            child = self._children[(family, *labels)] = family.labels(*(str(label) for label in labels))
        return child

    def _model(self, name: object, *, learn: bool = False) -> str:
        """The label for a model: one the operator named or Groq answered with (a few), else `other`."""
        if name in self._models:
            return str(name)
        if learn and self._learning and isinstance(name, str):
            self._learning -= 1
            self._models.add(name)
            return name
        return OTHER

    @staticmethod
    def _forget_dead_workers(directory: str) -> None:
        """Drop the live gauges of workers that died (uvicorn restarts them), so in-flight counts stay true."""
        for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
            pid = int(path.rsplit("_", 1)[1].removesuffix(".db"))
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
            except PermissionError:  # pragma: no cover - alive, but someone else's: a reused pid
                pass


@contextlib.contextmanager
def shared_directory() -> Iterator[str]:
    """For WORKERS > 1: a fresh private directory (mode 0700) for every worker's metric files, removed at exit.

    Set as PROMETHEUS_MULTIPROC_DIR before the workers start, so each inherits it.
    """
    directory = tempfile.mkdtemp(prefix="groq-service-metrics-")
    os.environ[MULTIPROC_DIR] = directory
    try:
        yield directory
    finally:
        os.environ.pop(MULTIPROC_DIR, None)
        shutil.rmtree(directory, ignore_errors=True)
