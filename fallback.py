"""FALLBACK_MODELS: when Groq is out of capacity for a model, the same request goes to that model's fallback.

Imported only when FALLBACK_MODELS is set. A request's chain is the asked-for model and the fallbacks that follow
it (`a>b,b>c`), less those the client may not use, at most `MAX_FALLBACKS` of them. A call falls back when Groq
answered 429, 498, 500, 502 or 503, or could not be reached, and nothing has reached the client: a stream only
before its first piece, so before its response head. Every model but the last is called without the SDK's
retries (a 429 goes on at once); the last keeps GROQ_MAX_RETRIES. All share one GROQ_TIMEOUT deadline, and no
call starts after it. When every model fails, the last error stands. The access line gets `fallback_from` and
`attempts`; `on_fallback` (metrics.Metrics.fallback) hears of each failed call as it falls back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import groq
from starlette.types import Scope

import errors
from config import Settings
from middleware import CLIENT, LOG_FIELDS, REQUESTED

MAX_FALLBACKS = 3  # Groq calls after the first, for one request
_CAPACITY = frozenset({429, 498, 500, 502, 503})  # never 400/401/403/404/413/422: the request is the problem
OnFallback = Callable[[str, str, str, float], None]  # model that failed, model tried next, error type, seconds
Call = Callable[..., Awaitable[bytes]]  # llm.Upstream._post(body, *, retries, deadline)
Events = Callable[..., AsyncGenerator[Any]]  # llm.Upstream._events(body, *, retries, deadline)


class Fallbacks:
    """The chains FALLBACK_MODELS sets, made once; `chain` gives a request's own."""

    def __init__(self, settings: Settings, *, on_fallback: OnFallback | None = None) -> None:
        self._after = dict(settings.fallback_models)  # each model's chain, as env_values.Reader.fallbacks walked it
        self._timeout = settings.groq_timeout
        self._on_fallback = on_fallback

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
        return Chain((model, *usable[:MAX_FALLBACKS]), scope, self._timeout, self._on_fallback)


class Chain:
    """One request's models, tried in turn by `complete` or `stream`; its access line and metrics told as it goes."""

    __slots__ = ("_models", "_on_fallback", "_scope", "_timeout")

    def __init__(self, models: tuple[str, ...], scope: Scope, timeout: float, on_fallback: OnFallback | None) -> None:
        self._models = models
        self._scope = scope
        self._timeout = timeout
        self._on_fallback = on_fallback

    async def complete(self, call: Call, body: dict[str, Any]) -> bytes:
        deadline = asyncio.get_running_loop().time() + self._timeout
        for i, model in enumerate(self._models[:-1]):
            started = time.perf_counter()
            try:
                return await call({**body, "model": model}, retries=0, deadline=deadline)
            except errors.ServiceError as exc:
                if not self._falls_back(i, exc, started, deadline):
                    raise
        return await call({**body, "model": self._models[-1]}, deadline=deadline)  # with the SDK's retries

    async def stream(self, events: Events, body: dict[str, Any]) -> AsyncGenerator[Any]:
        """Each model's stream until one yields its first piece; from then on that stream only, errors included."""
        deadline = asyncio.get_running_loop().time() + self._timeout
        for i, model in enumerate(self._models[:-1]):
            started = time.perf_counter()
            async with contextlib.aclosing(events({**body, "model": model}, retries=0, deadline=deadline)) as pieces:
                try:
                    first = await anext(pieces)
                except errors.ServiceError as exc:
                    if self._falls_back(i, exc, started, deadline):
                        continue
                    raise
                yield first
                async for piece in pieces:
                    yield piece
                return
        async with contextlib.aclosing(events({**body, "model": self._models[-1]}, deadline=deadline)) as pieces:
            async for piece in pieces:
                yield piece

    def _falls_back(self, i: int, exc: errors.ServiceError, started: float, deadline: float) -> bool:
        """Whether the call to model i (not the last) failed for capacity, in time to try the next; if so, say so."""
        if not _capacity(exc) or asyncio.get_running_loop().time() >= deadline:
            return False
        failed, following = self._models[i], self._models[i + 1]
        fields = self._scope[LOG_FIELDS]
        fields["fallback_from"] = self._models[0]
        fields["attempts"] = i + 2
        self._scope[REQUESTED] = (following, self._scope[REQUESTED][1])  # metrics: the next call asks for this
        if self._on_fallback is not None:
            self._on_fallback(failed, following, exc.type, time.perf_counter() - started)
        return True


def _capacity(exc: errors.ServiceError) -> bool:
    """Groq's own status (or the connection error) that groq_wire.mapped_errors chained as the cause."""
    cause = exc.__cause__
    if isinstance(cause, groq.APIStatusError):
        return cause.status_code in _CAPACITY
    return isinstance(cause, groq.APIConnectionError) and not isinstance(cause, groq.APITimeoutError)
