"""Server-sent events: a stream starts only once its first piece is in hand, then relays the rest.

An error before the first piece is an ordinary JSON error response; after it, an error can only end
the stream with one error event. However the stream ends (its client gone while Groq is silent, or
`send` failing before the first event), the upstream generator is closed and `release` is called
once, so Groq stops generating and the concurrency slot is freed at once.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

import groq_wire
from disconnect import while_connected
from errors import ServiceError
from groq_wire import ChatResult, Delta
from record import Record, elapsed_ms

# Set here, not as media_type, so Starlette adds no charset: SSE is always UTF-8.
_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
Encoder = Callable[[Any], bytes]
_DELTA_EVENT = {"content": b'data: {"content": %s}\n\n', "reasoning": b'data: {"reasoning": %s}\n\n'}


async def start(
    pieces: AsyncGenerator[Any],
    encode: Encoder,
    error_event: Callable[[ServiceError], bytes],
    record: Record,
    release: Callable[[], None],
    receive: Receive,
    head: list[tuple[str, str]] | None = None,
) -> Response:
    """Wait for the first piece while the client stays, then answer 200 with the event stream.

    The caller holds a slot for it: `release` is called exactly once, however the stream ends. `head`: more
    headers for the answer, read once the first piece is in (Groq's x-ratelimit-*, filled by then).
    """
    started = time.perf_counter()
    close = _closer(pieces, release)
    try:
        first = await while_connected(receive, anext(pieces))
        record.upstream_ms = elapsed_ms(started)
        events = _relay(first, pieces, encode, error_event, record, close)
        return _EventStream(events, close, headers={**_HEADERS, **dict(head or ())})  # until here, no one else closes
    except BaseException:
        await close()
        raise


def _closer(pieces: AsyncGenerator[Any], release: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    """Close the upstream generator and free the slot, once, even if closing raises."""
    done = False

    async def close() -> None:
        nonlocal done
        if not done:
            done = True
            try:
                await pieces.aclose()
            finally:
                release()

    return close


async def _relay(
    piece: Any,
    pieces: AsyncGenerator[Any],
    encode: Encoder,
    error_event: Callable[[ServiceError], bytes],
    record: Record,
    close: Callable[[], Awaitable[None]],
) -> AsyncGenerator[bytes]:
    finished = False
    try:
        while True:
            yield encode(piece)
            piece = await anext(pieces)
    except StopAsyncIteration:
        finished = True
    except ServiceError as err:
        record.error = err.type
        finished = True
        yield error_event(err)
    finally:
        if not finished:
            record.disconnected = True
        await close()


class _EventStream(StreamingResponse):
    """A StreamingResponse that always closes its generator and the upstream, so the upstream stream and
    the concurrency slot are released as soon as the client goes, not when the generator is collected,
    and also when `send` fails before the generator has started (its `finally` would then never run)."""

    def __init__(self, events: AsyncGenerator[bytes], close: Callable[[], Awaitable[None]], **kwargs: Any) -> None:
        super().__init__(events, **kwargs)
        self._events = events
        self._close = close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._events.aclose()
            finally:
                await self._close()


def chat_encoder(record: Record) -> Callable[[list[Delta] | ChatResult], bytes]:
    """/chat events: one `data: {"reasoning" or "content": ...}` per delta, then the metadata and `[DONE]`.
    A ("model", name) delta sends nothing: it is Groq naming its model, for the access line."""

    def encode(piece: list[Delta] | ChatResult) -> bytes:
        if isinstance(piece, ChatResult):  # its model is the one asked for if Groq named none: not logged as Groq's
            if piece.usage is not None:
                record.note_usage(piece.usage)
            return b"data: %s\n\ndata: [DONE]\n\n" % json.dumps(piece.answer()).encode()
        if record.completion is not None:
            record.completion += "".join(text for kind, text in piece if kind == "content")
        events = []
        for kind, text in piece:
            if kind == "model":
                record.model = text
            else:
                events.append(_DELTA_EVENT[kind] % json.dumps(text).encode())
        return b"".join(events)

    return encode


def relay_encoder(record: Record, strip_usage: bool = False) -> Callable[[list[tuple[bytes, Any]]], bytes]:
    """Groq's own events, byte for byte; only usage (and text, with LOG_PROMPTS) is read for the log.
    `strip_usage` drops the usage-only chunk the client did not ask for (quotas ask Groq for it)."""

    def encode(events: list[tuple[bytes, Any]]) -> bytes:
        for _, data in events:
            if isinstance(data, dict):
                note_completion(record, data)
        if strip_usage:
            events = [
                e for e in events if not (isinstance(e[1], dict) and e[1].get("choices") == [] and "usage" in e[1])
            ]
        return b"\n\n".join([raw for raw, _ in events]) + b"\n\n" if events else b""

    return encode


def note_completion(record: Record, data: dict[str, Any]) -> None:
    """A completion or stream chunk from Groq: the model it names, its usage, and its text with LOG_PROMPTS."""
    if isinstance(model := data.get("model"), str):  # Groq naming its model (metrics learn labels only so)
        record.model = model
    usage = groq_wire.chunk_usage(data)
    if usage and isinstance(usage, dict):
        record.note_usage(usage)
    if record.completion is not None:
        for choice in data.get("choices") or ():
            part = (choice.get("delta") or choice.get("message") or {}).get("content")
            record.completion += part if isinstance(part, str) else ""


def note_result(record: Record, result: ChatResult) -> None:
    """A /chat answer from Groq: the model it names, its usage, and its text with LOG_PROMPTS."""
    record.model = result.model
    if result.usage is not None:
        record.note_usage(result.usage)
    if record.completion is not None:
        record.completion = result.content
