"""FALLBACK_MODELS: when Groq is out of capacity for a model, the same request goes to that model's fallback.

Imported only when FALLBACK_MODELS is set. A request's chain is the asked-for model and the fallbacks that follow
it (`a>b,b>c`), less those the client may not use, at most `MAX_FALLBACKS` of them. A call falls back when Groq
answered 429, 498, 500, 502 or 503, or could not be reached, and nothing has reached the client: a stream only
before its first piece, so before its response head. Every model but the last is called first without the SDK's
retries, so a 429 goes on at once; a failure the SDK would retry that is no such trigger (408, 409, 504, another
5xx) calls that model again with GROQ_MAX_RETRIES, so a fallback never takes a retry away. The last model keeps
GROQ_MAX_RETRIES. All share one GROQ_TIMEOUT deadline, and no call starts after it. When every model fails, the
last error stands. The request's record (so its access line) gets `fallback_from` and `attempts`; `on_fallback`
(metrics.Metrics.fallback) hears of each failed call as it falls back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import groq
from starlette.types import Scope

import errors
from access import CLIENT
from config import Settings
from record import RECORD, Record, elapsed_ms

MAX_FALLBACKS = 3  # Groq calls after the first, for one request
_CAPACITY = frozenset({429, 498, 500, 502, 503})  # never 400/401/403/404/413/422: the request is the problem
_SDK_RETRIES = frozenset({408, 409, 429})  # and every status >= 500: the SDK's `_should_retry`, groq-wire.md §1
OnFallback = Callable[[str, str, str, float], None]  # model that failed, model tried next, error type, seconds
Call = Callable[..., Awaitable[bytes]]  # llm.Upstream._post(body, *, retries, deadline)
Events = Callable[..., AsyncGenerator[Any]]  # llm.Upstream._events(body, *, retries, deadline)
Opened = tuple[AsyncGenerator[Any], Any]  # a stream and its first piece
T = TypeVar("T")


class Fallbacks:
    """The chains FALLBACK_MODELS sets; `chain` gives a request's own."""

    def __init__(self, settings: Settings, *, on_fallback: OnFallback | None = None) -> None:
        self._after = dict(settings.fallback_models)  # each model's chain, as env_values.Reader.fallbacks walked it
        self.timeout = settings.groq_timeout
        self.retries = settings.groq_max_retries
        self.on_fallback = on_fallback

    def chain(self, model: str, scope: Scope) -> Chain | None:
        """The request's chain; None when the model has no fallback this client may use (the call is as before).

        config.py keeps every fallback within ALLOWED_MODELS; a SERVICE_KEYS_FILE client's own list may narrow it."""
        after = self._after.get(model)
        if after is None:
            return None
        client = scope.get(CLIENT)
        allowed = client.allowed_models if client is not None else ()
        usable = after if not allowed else tuple(m for m in after if m in allowed)  # a forbidden one is skipped
        if not usable:
            return None
        return Chain(self, (model, *usable[:MAX_FALLBACKS]), scope[RECORD])


class Chain:
    """One request's models, tried in turn by `complete` or `stream`; its record and metrics told as it goes."""

    __slots__ = ("_began", "_fallbacks", "_models", "_record")

    def __init__(self, fallbacks: Fallbacks, models: tuple[str, ...], record: Record) -> None:
        self._fallbacks = fallbacks
        self._models = models
        self._record = record
        self._began = 0.0  # perf_counter when the first call started

    async def complete(self, call: Call, body: dict[str, Any]) -> bytes:
        deadline = asyncio.get_running_loop().time() + self._fallbacks.timeout
        self._began = time.perf_counter()
        for i, model in enumerate(self._models[:-1]):
            started = time.perf_counter()
            try:
                return await self._attempt(
                    functools.partial(call, {**body, "model": model}, deadline=deadline), deadline
                )
            except errors.ServiceError as exc:
                if not self._falls_back(i, exc, started, deadline):
                    raise
        return await call({**body, "model": self._models[-1]}, deadline=deadline)  # with the SDK's retries

    async def stream(self, events: Events, body: dict[str, Any]) -> AsyncGenerator[Any]:
        """Each model's stream until one yields its first piece; from then on that stream only, errors included."""
        deadline = asyncio.get_running_loop().time() + self._fallbacks.timeout
        self._began = time.perf_counter()
        for i, model in enumerate(self._models[:-1]):
            started = time.perf_counter()
            opening = functools.partial(_opened, events, {**body, "model": model}, deadline=deadline)
            try:
                pieces, first = await self._attempt(opening, deadline)
            except errors.ServiceError as exc:
                if self._falls_back(i, exc, started, deadline):
                    continue
                raise
            break
        else:
            pieces, first = await _opened(events, {**body, "model": self._models[-1]}, deadline=deadline)
        async with contextlib.aclosing(pieces):
            yield first
            async for piece in pieces:
                yield piece

    async def _attempt(self, call: Callable[..., Awaitable[T]], deadline: float) -> T:
        """A model that has a fallback: called without the SDK's retries, so a 429 goes on at once; when it failed
        in a way the SDK retries but that does not fall back (408, 409, 504, another 5xx), called again with them:
        every retry it would get without FALLBACK_MODELS, and one more attempt, at once, before them."""
        try:
            return await call(retries=0)
        except errors.ServiceError as exc:
            if not (self._fallbacks.retries and _sdk_retries(exc) and not _capacity(exc) and _before(deadline)):
                raise
        return await call()

    def _falls_back(self, i: int, exc: errors.ServiceError, started: float, deadline: float) -> bool:
        """Whether the call to model i (not the last) failed for capacity, in time to try the next; if so, say so."""
        if not (_capacity(exc) and _before(deadline)):
            return False
        failed, following = self._models[i], self._models[i + 1]
        self._record.fallback_from = self._models[0]
        self._record.attempts = i + 2
        self._record.model = following  # the last model tried, until Groq's answer names its own
        # Metrics: the next call is the one the request reports, measured from its own start.
        self._record.call_model = following
        self._record.call_started_ms = elapsed_ms(self._began)
        if self._fallbacks.on_fallback is not None:
            self._fallbacks.on_fallback(failed, following, exc.type, time.perf_counter() - started)
        return True


async def _opened(events: Events, body: dict[str, Any], *, retries: int | None = None, deadline: float) -> Opened:
    """A model's stream and its first piece; the stream closed when that fails, or the client leaves meanwhile."""
    pieces = events(body, retries=retries, deadline=deadline)
    try:
        return pieces, await anext(pieces)
    except BaseException:
        await pieces.aclose()
        raise


def _before(deadline: float) -> bool:
    """No call starts after the deadline, where it could reach Groq before its own timeout fired. A call still
    running at the deadline ends as UpstreamTimeout, so this is false only when a call's error came back in the
    last instant before the deadline, which then passed before this check: rare, and not reached by a test."""
    return asyncio.get_running_loop().time() < deadline


def _capacity(exc: errors.ServiceError) -> bool:
    """Groq's own status (or the connection error) that groq_wire.mapped_errors chained as the cause."""
    cause = exc.__cause__
    if isinstance(cause, groq.APIStatusError):
        return cause.status_code in _CAPACITY
    return isinstance(cause, groq.APIConnectionError) and not isinstance(cause, groq.APITimeoutError)


def _sdk_retries(exc: errors.ServiceError) -> bool:
    """Whether the SDK retries Groq's status: as `x-should-retry` says, else 408, 409, 429 and 5xx."""
    cause = exc.__cause__
    if not isinstance(cause, groq.APIStatusError):
        return False  # a connection error falls back; a timeout is past the deadline
    told: str | None = cause.response.headers.get("x-should-retry")
    if told in ("true", "false"):
        return told == "true"
    return cause.status_code in _SDK_RETRIES or cause.status_code >= 500
