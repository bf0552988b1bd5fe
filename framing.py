"""The HTTP/1.1 framing guard `python app.py` runs uvicorn's protocol (h11 or httptools) behind.

uvicorn leaves four things to the server around it:
- a request head that never completes holds its connection: closed after CLIENT_TIMEOUT;
- head size: h11 bounds only a head arriving in pieces, httptools none. Every head, pipelined ones too, is held
  to 16 KiB, 8 KiB a line and 100 headers (431), counted as it arrives and again once parsed;
- bytes the parser refuses, and Content-Length with Transfer-Encoding (RFC 9112 6.1), get the JSON envelope,
  one access line with the id the client received, and a closed connection;
- an answer given while the request body is still arriving (413, 401, ...) closes the connection: the socket is
  half-closed after the answer and what the client still sends is dropped, within bounds, so that the client
  reads the answer and then a clean end instead of a reset.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import h11
from starlette.types import Message, Receive, Scope, Send
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from envelope import is_sdk_route
from errors import HeadersTooLarge, InvalidRequest, ServiceError
from record import Record, access_line, elapsed_ms
from shutdown import ABORT
from write_deadline import WriteDeadline

_MAX_HEAD_BYTES = 16 * 1024  # a whole request head (Node's and h11's default)
_MAX_LINE_BYTES = 8 * 1024  # one line of it (nginx's and Apache's)
_MAX_HEADERS = 100  # (Apache's)
H11_BUFFER_BYTES = 1024 * 1024  # h11's own bound on unparsed bytes: a backstop well above ours, so ours answers
_LINGER_SECONDS = 5.0  # after refusing a request whose body is still arriving: drop what follows this long at most
_LINGER_BYTES = 16 * 1024 * 1024  # or this many bytes, then close
_HEAD_RULE = "The request head must be at most 16 KiB, each line at most 8 KiB, with at most 100 headers."
_MALFORMED = (
    "The request is not valid HTTP/1.1: check the request line, the headers and the body's framing "
    "(Content-Length or Transfer-Encoding: chunked, never both)."
)
logger = logging.getLogger("service")


class _Transport(asyncio.Transport):
    """The socket as uvicorn sees it: its `close()` goes through the protocol, which may linger first."""

    def __init__(self, transport: asyncio.Transport, close: Callable[[], None]) -> None:
        super().__init__()
        self._transport = transport
        self._close = close
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closing:
            self._transport.write(data)

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._close()

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()

    def abort(self) -> None:
        self._closing = True
        self._transport.abort()


class GuardedProtocol(WriteDeadline, AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    app: Any
    cycle: Any
    headers: list[tuple[bytes, bytes]] | None
    url: bytes
    client: tuple[str, int] | None
    transport: asyncio.Transport
    app_state: dict[str, Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._app, self.app = self.app, self._guard  # every request, pipelined ones too, is checked on its turn
        self._deadline: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        # _refused: we answered below the app; _broken: the parser failed inside a body; _lingering: half-closed,
        # dropping what arrives; _pending: a refusal waiting for the answers to earlier requests.
        self._lingering = self._refused = self._broken = False
        self._pending: ServiceError | None = None
        self._head_cycle: Any = None  # the newest request when `_head_bytes` (reads inside one head) began
        self._head_bytes = self._linger_left = 0

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._socket = transport
        super().connection_made(_Transport(transport, self._close))
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        for timer in (self._deadline, self._linger_timer):
            if timer is not None:
                timer.cancel()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            self._linger_left -= len(data)
            if self._linger_left < 0:
                self._socket.close()
            return
        if self._broken or self._pending is not None:
            return
        if self.cycle is not self._head_cycle:
            self._head_cycle, self._head_bytes = self.cycle, 0
        in_head = not self._body_arriving()
        super().data_received(data)
        if in_head and self.cycle is self._head_cycle and not self._body_arriving():
            self._head_bytes += len(data)  # a read that began and ended inside one head
        self._check_head()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes its parser refused: ours is the envelope and an access line."""
        if self._body_arriving() and not self.cycle.response_started:
            self._broken = True  # in a body the app is reading: the app answers, see `_guard`
            self.transport.pause_reading()  # until the answer is written; then what follows is dropped
            self.cycle.message_event.set()
        else:
            self._refuse(InvalidRequest(_MALFORMED))

    def on_response_complete(self) -> None:
        super().on_response_complete()  # h11 parses what was pipelined only now
        self._check_head()
        if self._pending is not None and self._idle() and not self.transport.is_closing():
            self._write_refusal(self._pending)
        self._arm()

    def shutdown(self) -> None:
        if self._lingering:
            self._socket.close()
        else:
            super().shutdown()

    async def _guard(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app behind a check of the parsed head, a body whose framing broke, and Connection: close
        on an answer given before the body arrived (the rest is then dropped, never parsed)."""
        error = _head_refusal(scope)
        if error is not None:
            await self._answer(error, scope, send)
            return

        async def checked_receive() -> Message:
            message = await receive()
            if self._broken and message.get("more_body"):
                raise InvalidRequest(_MALFORMED)
            return message

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and self.cycle.scope is scope and self._body_arriving():
                message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        scope[ABORT] = self._abort
        await self._app(scope, checked_receive, closing_send)

    async def _abort(self, always: bool) -> None:
        """End the connection at once: always, or if the answer is not all handed to the kernel (a close would wait
        on the client). The one turn of the loop lets the transport report the loss: uvicorn then sees a disconnect."""
        if always or self._socket.get_write_buffer_size():
            self.transport.abort()
            await asyncio.sleep(0)

    async def _answer(self, error: ServiceError, scope: Scope, send: Send) -> None:
        request_id, body, headers = self._envelope(error, openai=is_sdk_route(scope))
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        self._log(error, request_id, scope["method"], scope["path"])

    def _refuse(self, error: ServiceError) -> None:
        """Answer what the app never saw, after the answers to earlier requests on this connection."""
        if self._pending is None and not self.transport.is_closing():
            self._pending = error
            self.transport.pause_reading()
            if self._idle():
                self._write_refusal(error)

    def _write_refusal(self, error: ServiceError) -> None:
        request_id, body, headers = self._envelope(error, openai=False)
        head = b"HTTP/1.1 %d %s\r\n" % (error.status, HTTPStatus(error.status).phrase.encode())
        head += b"".join(b"%s: %s\r\n" % header for header in headers)
        self.transport.write(head + b"\r\n" + body)
        self.transport.close()
        self._log(error, request_id, None, None)

    def _envelope(self, error: ServiceError, *, openai: bool) -> tuple[str, bytes, list[tuple[bytes, bytes]]]:
        """A refusal's request id, body and headers; the connection closes after it."""
        self._refused = True
        request_id = uuid.uuid4().hex
        body = error.body(request_id, openai=openai)
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        return request_id, body, [*headers, (b"x-request-id", request_id.encode()), (b"connection", b"close")]

    def _log(self, error: ServiceError, request_id: str, method: str | None, path: str | None) -> None:
        """The access line RequestLog writes, for a request refused before the app saw it (before its head was
        parsed: no method or path)."""
        peer = f"{self.client[0]}:{self.client[1]}" if self.client else None
        record = Record(method, path, peer, request_id=request_id, status=error.status, error=error.type)
        record.duration_ms = elapsed_ms(self._head_started)
        logger.info("request", extra={"fields": access_line(record)})
        if (metrics := self.app_state.get("metrics")) is not None:  # METRICS=true (Service.lifespan's state)
            metrics.refused_below(record)

    def _close(self) -> None:
        """uvicorn closes: when the client may still be sending, half-close after the answer and drop what
        arrives (bounded), for a socket closed with unread bytes sends a reset that can destroy the answer."""
        if (self._refused or self._body_arriving()) and not self._socket.is_closing() and self._socket.can_write_eof():
            self._lingering = True
            self._linger_left = _LINGER_BYTES
            self._socket.resume_reading()
            self._socket.write_eof()
            self._linger_timer = asyncio.get_running_loop().call_later(_LINGER_SECONDS, self._socket.close)
        else:
            self._socket.close()

    def _check_head(self) -> None:
        """A head still arriving, over the limit: refused without waiting for its end (a complete one is
        checked by `_head_refusal`)."""
        if max(self._head_bytes, self._head_so_far()) > _MAX_HEAD_BYTES and not self.transport.is_closing():
            self._refuse(HeadersTooLarge(_HEAD_RULE))

    def _head_so_far(self) -> int:
        """The part of an incomplete head the parser holds: also one that arrived in a read with other requests."""
        conn = getattr(self, "conn", None)
        if conn is not None:  # h11 keeps an incomplete head whole in its buffer, and parses it once complete
            return len(conn.trailing_data[0]) if conn.their_state is h11.IDLE else 0
        if self.headers is None or (self.cycle is not None and self.cycle.scope["headers"] is self.headers):
            return 0  # httptools: no head begun since the newest complete one
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _body_arriving(self) -> bool:
        """The newest request's body is not all read yet (on a pipelined connection, earlier ones are)."""
        return self.cycle is not None and self.cycle.more_body and not self.cycle.disconnected

    def _idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        """Start the head deadline: at connection start, and after each response (one timer per connection)."""
        self._armed_cycle = self.cycle
        self._head_started = time.perf_counter()
        if self._deadline is not None:
            self._deadline.cancel()
        timeout = self.app_state.get("client_timeout", 15.0)
        self._deadline = asyncio.get_running_loop().call_later(timeout, self._expire)

    def _waiting_for_head(self) -> bool:
        armed = self._armed_cycle
        return self.cycle is armed and (armed is None or armed.response_complete)

    def _expire(self) -> None:
        if self._waiting_for_head() and not self.transport.is_closing():
            self.transport.close()


def _head_refusal(scope: Scope) -> ServiceError | None:
    """The parsed head against the limits (every head, also one h11 received whole), and no CL with TE."""
    headers = scope["headers"]
    names = {name for name, _ in headers}
    if b"content-length" in names and b"transfer-encoding" in names:  # RFC 9112 6.1: a smuggling setup
        return InvalidRequest(_MALFORMED)
    query = scope["query_string"]
    lines = [len(scope["method"]) + len(scope["raw_path"]) + (len(query) + 1 if query else 0) + 10]
    lines += [len(name) + len(value) + 2 for name, value in headers]
    if len(headers) > _MAX_HEADERS or max(lines) > _MAX_LINE_BYTES or sum(lines) + 2 * len(lines) + 2 > _MAX_HEAD_BYTES:
        return HeadersTooLarge(_HEAD_RULE)
    return None
