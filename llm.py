"""The only module that talks to Groq: the SDK clients, their calls, and their errors mapped once.

Calls go through the SDK's documented `client.post(..., cast_to=httpx.Response)`, so auth, retries
and status errors are the SDK's, while the body is parsed once with `json` instead of being built
into typed models only to be turned back into JSON. Message text is never logged here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncGenerator, Iterator
from typing import Any, cast

import anyio
import groq
import httpx

import errors
import groq_wire
from config import Settings, load_settings
from groq_wire import ChatResult
from validation import parse_chat

CHAT_PATH = "/openai/v1/chat/completions"
MODELS_PATH = "/openai/v1/models"
_INCLUDE_USAGE = {"include_usage": True}
_POOL_SIZE = 8
_MAX_EVENT_BYTES = 4 * 1024 * 1024  # one SSE event; a stream never needs to buffer more
Messages = list[dict[str, str]]


class Upstream:
    """The Groq clients the process shares (small connection pools), made at start-up, closed at shutdown."""

    def __init__(self, settings: Settings) -> None:
        if not settings.groq_api_key:
            raise errors.NotConfigured("GROQ_API_KEY is not set; the operator must set it to use /chat.")
        self._secret: str = settings.groq_api_key
        self._timeout = settings.groq_timeout
        self._idle_timeout = settings.stream_idle_timeout
        # httpcore checks every idle connection of a pool on each call (a poll and a getpeername each), so one
        # pool sized for MAX_CONCURRENCY costs O(connections) per call and collapses under load (90 req/s at
        # c=64, bench/run.py); calls spread over small pools of 8 instead, each on the least busy one.
        self._client_options: dict[str, Any] = {
            "api_key": settings.groq_api_key,
            "base_url": settings.groq_base_url,
            "timeout": settings.groq_timeout,
            "max_retries": settings.groq_max_retries,
        }
        self._tls: ssl.SSLContext | None = None  # one CA bundle for all pools, loaded with the first: ~25 ms, 1.7 MB
        shards = -(-settings.max_concurrency // _POOL_SIZE)
        self._clients: list[groq.AsyncGroq | None] = [None] * shards  # each made when first needed
        self._busy = [0] * shards

    async def aclose(self) -> None:
        for client in self._clients:
            if client is not None:
                await client.close()

    @contextlib.contextmanager
    def _client(self) -> Iterator[groq.AsyncGroq]:
        shard = self._busy.index(min(self._busy))
        client = self._clients[shard]
        if client is None:
            limits = httpx.Limits(max_connections=_POOL_SIZE, max_keepalive_connections=_POOL_SIZE)
            self._tls = self._tls or httpx.create_ssl_context()
            http_client = groq.DefaultAsyncHttpxClient(limits=limits, verify=self._tls)
            client = self._clients[shard] = groq.AsyncGroq(**self._client_options, http_client=http_client)
        self._busy[shard] += 1
        try:
            yield client
        finally:
            self._busy[shard] -= 1

    async def complete(self, body: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
        """POST a chat completion; returns Groq's raw body and its parsed form."""
        raw = await self._call(CHAT_PATH, body)
        return raw, groq_wire.completion(raw)

    async def chat(self, messages: Messages, model: str, params: dict[str, Any]) -> ChatResult:
        _, data = await self.complete({"messages": messages, "model": model, **params})
        return groq_wire.result(data)

    async def models(self) -> dict[str, Any]:
        return groq_wire.model_list(await self._call(MODELS_PATH, None))

    async def _call(self, path: str, body: dict[str, Any] | None) -> bytes:
        with groq_wire.mapped_errors(self._secret), self._client() as client:
            async with asyncio.timeout(self._timeout):
                if body is None:
                    return (await client.get(path, cast_to=httpx.Response)).content
                return (await client.post(path, body=body, cast_to=httpx.Response)).content

    async def stream_events(self, body: dict[str, Any]) -> AsyncGenerator[list[tuple[bytes, Any]]]:
        """Yield, per read from Groq, its complete SSE events as (raw event without its blank line, parsed data).

        GROQ_TIMEOUT bounds everything up to the first read, GROQ_STREAM_IDLE_TIMEOUT each later one.
        The upstream response is closed however the caller stops, so Groq stops generating.
        """
        body = {**body, "stream": True}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        with self._client() as client, groq_wire.mapped_errors(self._secret):
            async with asyncio.timeout_at(deadline):
                response = cast(
                    httpx.Response,
                    await client.post(
                        CHAT_PATH, body=body, cast_to=httpx.Response, stream=True, stream_cls=groq.AsyncStream[Any]
                    ),
                )
            try:
                reads = response.aiter_bytes()
                pending, done = b"", False
                while True:  # read to the end even after [DONE], so the connection goes back to the pool
                    async with asyncio.timeout_at(deadline):
                        data = await anext(reads, None)
                    deadline = loop.time() + self._idle_timeout
                    if data is None:
                        break
                    events, pending = ([], b"") if done else groq_wire.split_events(pending + data, self._secret)
                    if len(pending) > _MAX_EVENT_BYTES:
                        raise errors.UpstreamError("Groq sent a stream event too large to relay; try again.")
                    if events:
                        done = events[-1][1] == "[DONE]"
                        yield events
                if not done:
                    raise errors.UpstreamError("Groq ended the stream before it was complete; try again.")
            finally:
                with anyio.CancelScope(shield=True):
                    await response.aclose()

    async def chat_stream(
        self, messages: Messages, model: str, params: dict[str, Any]
    ) -> AsyncGenerator[list[str] | ChatResult]:
        """Yield lists of text deltas (one list per read from Groq), then the final ChatResult."""
        final: dict[str, Any] = {"model": model}
        finish_reason = None
        body = {"messages": messages, "model": model, **params, "stream_options": _INCLUDE_USAGE}
        async with contextlib.aclosing(self.stream_events(body)) as stream:
            async for events in stream:
                deltas = []
                for _, data in events:
                    if data == "[DONE]":
                        continue
                    final["model"] = data.get("model") or final["model"]
                    final["usage"] = data.get("usage") or (data.get("x_groq") or {}).get("usage") or final.get("usage")
                    for choice in data.get("choices") or ():
                        if content := (choice.get("delta") or {}).get("content"):
                            deltas.append(content)
                        finish_reason = choice.get("finish_reason") or finish_reason
                if deltas:
                    yield deltas
        yield ChatResult("", str(final["model"]), groq_wire.usage(final.get("usage")), finish_reason)


def chat_completion(messages: Messages, model: str | None = None, **params: Any) -> ChatResult:
    """For scripts: blocking, config from env/`.env`; the app's code on a private loop, so not inside a running one."""

    async def run() -> ChatResult:
        upstream, request = _script_call(messages, model, params)
        try:
            return await upstream.chat(*request)
        finally:
            await upstream.aclose()

    return asyncio.run(run())


def stream_chat_completion(messages: Messages, model: str | None = None, **params: Any) -> Iterator[str | ChatResult]:
    """Blocking stream for scripts: text deltas as they arrive, then the final ChatResult."""
    upstream, request = _script_call(messages, model, params)
    loop = asyncio.new_event_loop()
    pieces = upstream.chat_stream(*request)
    try:
        while (piece := loop.run_until_complete(anext(pieces, None))) is not None:
            yield from piece if isinstance(piece, list) else [piece]
    finally:
        loop.run_until_complete(pieces.aclose())
        loop.run_until_complete(upstream.aclose())
        loop.close()


def _script_call(
    messages: Messages, model: str | None, params: dict[str, Any]
) -> tuple[Upstream, tuple[Messages, str, dict[str, Any]]]:
    settings = load_settings()
    body: dict[str, Any] = {"messages": messages, **params, **({"model": model} if model is not None else {})}
    request = parse_chat(body, allowed_models=settings.allowed_models)
    return Upstream(settings), (request.messages, request.model or settings.groq_model, request.params)
