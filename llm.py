"""The only module that talks to Groq: the SDK clients, their calls, and their errors mapped once.

Calls go through the SDK's documented `client.post(..., cast_to=httpx.Response)`, so auth, retries
and status errors are the SDK's, while the body is parsed once with `json` instead of being built
into typed models only to be turned back into JSON. Message text is never logged here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
from collections.abc import AsyncGenerator, Awaitable
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote

import anyio
import groq
import httpx

import errors
import groq_wire
import upstream_clients
from config import Settings
from groq_wire import ChatResult, Delta

if TYPE_CHECKING:
    from fallback import Chain

CHAT_PATH = "/openai/v1/chat/completions"
MODELS_PATH = "/openai/v1/models"
_INCLUDE_USAGE = {"include_usage": True}
_MAX_EVENT_BYTES = 4 * 1024 * 1024  # one SSE event; a stream never needs to buffer more
RateLimits = list[tuple[str, str]] | None  # a list to add Groq's x-ratelimit-* headers to, or None: not wanted


class Upstream:
    """Calls to Groq, each on an SDK client leased from upstream_clients.py, closed at shutdown."""

    def __init__(self, settings: Settings) -> None:
        if not settings.groq_api_key:
            raise errors.NotConfigured("GROQ_API_KEY is not set; the operator must set it to use /chat.")
        self._secret: str = settings.groq_api_key
        self._timeout = settings.groq_timeout
        self._idle_timeout = settings.stream_idle_timeout
        self._clients = upstream_clients.build(settings)

    async def aclose(self) -> None:
        await self._clients.aclose()

    async def complete(
        self, body: dict[str, Any], chain: Chain | None = None, rate_limits: RateLimits = None
    ) -> tuple[bytes, dict[str, Any]]:
        """POST a chat completion (to each model of a FALLBACK_MODELS chain in turn); Groq's raw body, parsed too."""
        post = functools.partial(self._post, rate_limits=rate_limits)
        raw = await (post(body) if chain is None else chain.complete(post, body))
        return raw, groq_wire.completion(raw)

    async def chat(
        self, body: dict[str, Any], chain: Chain | None = None, rate_limits: RateLimits = None
    ) -> ChatResult:
        """/chat's answer to a body of its messages, model and parameters (validation.ChatRequest's)."""
        _, data = await self.complete(body, chain, rate_limits)
        result = groq_wire.result(data)
        return result if _shows_reasoning(body) else dataclasses.replace(result, reasoning=None)

    async def models(self, rate_limits: RateLimits = None) -> dict[str, Any]:
        return groq_wire.model_list(await self._call(MODELS_PATH, None, rate_limits=rate_limits))

    async def model(self, model_id: str, rate_limits: RateLimits = None) -> dict[str, Any]:
        """One model's object; the id (sdk_validation.check_model_id's) goes into the path escaped, slashes kept."""
        path = f"{MODELS_PATH}/{quote(model_id)}"
        return groq_wire.model_object(await self._call(path, None, rate_limits=rate_limits))

    def _post(
        self,
        body: dict[str, Any],
        *,
        retries: int | None = None,
        deadline: float | None = None,
        rate_limits: RateLimits = None,
    ) -> Awaitable[bytes]:
        return self._call(CHAT_PATH, body, retries=retries, deadline=deadline, rate_limits=rate_limits)

    async def _call(
        self,
        path: str,
        body: dict[str, Any] | None,
        *,
        retries: int | None = None,
        deadline: float | None = None,
        rate_limits: RateLimits = None,
    ) -> bytes:
        """`retries` replaces GROQ_MAX_RETRIES for this call, `deadline` (loop time) GROQ_TIMEOUT from now."""
        options: groq.RequestOptions = {} if retries is None else {"max_retries": retries}
        with groq_wire.mapped_errors(self._secret):
            timeout = asyncio.timeout(self._timeout) if deadline is None else asyncio.timeout_at(deadline)
            async with self._clients.lease() as client, timeout:
                if body is None:
                    response = await client.get(path, cast_to=httpx.Response)
                else:
                    response = await client.post(path, body=body, cast_to=httpx.Response, options=options)
        if rate_limits is not None:
            rate_limits += groq_wire.rate_limits(response.headers)
        return response.content

    def stream_events(
        self, body: dict[str, Any], chain: Chain | None = None, rate_limits: RateLimits = None
    ) -> AsyncGenerator[list[tuple[bytes, Any]]]:
        """Groq's stream (from each model of a FALLBACK_MODELS chain in turn, until one starts): see `_events`."""
        events = functools.partial(self._events, rate_limits=rate_limits)
        return events(body) if chain is None else chain.stream(events, body)

    async def _events(
        self,
        body: dict[str, Any],
        *,
        retries: int | None = None,
        deadline: float | None = None,
        rate_limits: RateLimits = None,
    ) -> AsyncGenerator[list[tuple[bytes, Any]]]:
        """Yield, per read from Groq, its complete SSE events as (raw event without its blank line, parsed data).

        GROQ_TIMEOUT bounds everything up to the first read, GROQ_STREAM_IDLE_TIMEOUT each later one: Groq's
        silence only, counted from when the next read is asked for, not the time our client takes to read.
        The upstream response is closed however the caller stops, so Groq stops generating.
        """
        body = {**body, "stream": True}
        options: groq.RequestOptions = {} if retries is None else {"max_retries": retries}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout if deadline is None else deadline
        with groq_wire.mapped_errors(self._secret):
            async with self._clients.lease() as client:
                async with asyncio.timeout_at(deadline):
                    response = cast(
                        httpx.Response,
                        await client.post(
                            CHAT_PATH,
                            body=body,
                            cast_to=httpx.Response,
                            stream=True,
                            stream_cls=groq.AsyncStream[Any],
                            options=options,
                        ),
                    )
                if rate_limits is not None:  # filled before the first events, so they can go in the answer's head
                    rate_limits += groq_wire.rate_limits(response.headers)
                try:
                    reads = response.aiter_bytes()
                    pending = b""
                    done = False
                    while True:  # read to the end even after [DONE], so the connection goes back to the pool
                        async with asyncio.timeout_at(deadline):
                            data = await anext(reads, None)
                        if data is None:
                            break
                        events, pending = ([], b"") if done else groq_wire.split_events(pending + data, self._secret)
                        if len(pending) > _MAX_EVENT_BYTES:
                            raise errors.UpstreamError("Groq sent a stream event too large to relay; try again.")
                        if events:
                            done = events[-1][1] == "[DONE]"
                            yield events
                        if b"\n\n" in pending:  # a bad event after those: raises now they are relayed
                            groq_wire.split_events(pending, self._secret)
                        deadline = loop.time() + self._idle_timeout
                    if not done:
                        raise errors.UpstreamError("Groq ended the stream before it was complete; try again.")
                finally:
                    with anyio.CancelScope(shield=True):
                        await response.aclose()

    async def chat_stream(
        self, body: dict[str, Any], chain: Chain | None = None, rate_limits: RateLimits = None
    ) -> AsyncGenerator[list[Delta] | ChatResult]:
        """Yield lists of deltas (one list per read from Groq), then the final ChatResult.

        A list holds reasoning and text deltas, and a ("model", name) one when a chunk first names Groq's model.
        The first list comes with Groq's first chunk even when that holds no text (a reasoning model's
        first chunk is only its role), so a stream can start while the model is still thinking.
        """
        final: dict[str, Any] = {}
        finish_reason = None
        first = True
        shows_reasoning = _shows_reasoning(body)
        named = None
        body = {**body, "stream_options": _INCLUDE_USAGE}
        async with contextlib.aclosing(self.stream_events(body, chain, rate_limits)) as stream:
            async for events in stream:
                deltas: list[Delta] = []
                for _, data in events:
                    if data == "[DONE]":
                        continue
                    if data.get("model") and data["model"] != named:  # Groq names its model: for the access line
                        deltas.append(("model", named := data["model"]))
                    final["usage"] = groq_wire.chunk_usage(data) or final.get("usage")
                    for choice in data.get("choices") or ():
                        delta = choice.get("delta") or {}
                        if shows_reasoning and (reasoning := delta.get("reasoning")):  # text: split_events checked
                            deltas.append(("reasoning", reasoning))
                        if content := delta.get("content"):
                            deltas.append(("content", content))
                        finish_reason = choice.get("finish_reason") or finish_reason
                if deltas or first:
                    first = False
                    yield deltas
        yield ChatResult("", named or body["model"], groq_wire.usage(final.get("usage")), finish_reason)


def _shows_reasoning(body: dict[str, Any]) -> bool:
    """Whether the client asked to see reasoning; gpt-oss sends it unasked, and unasked it would change the answer."""
    return body.get("include_reasoning") is True or body.get("reasoning_format") == "parsed"
