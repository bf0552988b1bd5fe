"""How long a request may hold what it holds: bounded by the client's presence, and by its reading.

Two rules, each in one place:

1. `while_connected(receive, call)`: an upstream call lasts only while the client is still connected.
   The body has been read by then, so the next ASGI message can only be `http.disconnect`; the call
   runs as a task next to a watch on `receive()`, and a disconnect cancels it, which closes the
   upstream request (Groq stops generating) and raises `ClientDisconnect` (the access line says
   `disconnected: true`, status 499 when no response had started). Streams use it for their first piece;
   after that Starlette's own disconnect listener ends the relay.
2. `WriteDeadline`: a client that accepts no bytes for CLIENT_TIMEOUT while our writes wait on it is
   dropped (the connection is aborted, which ends the request as a disconnect: the slot is freed and
   the upstream request closed) and its access line says `error: "client_timeout"`.
   uvicorn waits on the transport's flow control at the start of each `send`, and never on the
   last one, so `Paced` cuts a large body into pieces: each then waits while the client is not
   reading, and the request (and its access line) ends only once the client has taken the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import struct
import termios
from collections.abc import Awaitable
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from middleware import LOG_FIELDS

_PIECE = 64 * 1024  # uvicorn's write high-water mark
T = TypeVar("T")


async def while_connected(receive: Receive, call: Awaitable[T]) -> T:
    """`await call`, unless the client disconnects first: then the call is cancelled and ClientDisconnect raised."""
    work = asyncio.ensure_future(call)
    watch = asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            await asyncio.wait((work,))  # the upstream response is closed before the slot is freed
    if work.cancelled():
        raise ClientDisconnect()
    return work.result()


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass  # a body the route did not read (GET /v1/models) is discarded


class Paced:
    """Pure ASGI middleware: every response body goes out through `send_paced`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, functools.partial(send_paced, send) if scope["type"] == "http" else send)


async def send_paced(send: Send, message: Message) -> None:
    """Send a large body in pieces of uvicorn's high-water mark, so each waits on the client's reading."""
    body = message.get("body", b"")
    if message["type"] != "http.response.body" or len(body) <= _PIECE:
        await send(message)
        return
    more = message.get("more_body", False)
    for start in range(0, len(body), _PIECE):
        last = start + _PIECE >= len(body)
        await send({"type": "http.response.body", "body": body[start : start + _PIECE], "more_body": more or not last})


class WriteDeadline:
    """Mixin for the uvicorn HTTP protocol: while the transport's buffer is over the high-water mark, or
    holds the end of a finished answer, check every CLIENT_TIMEOUT that the client took some of it; if it
    took none, abort the connection (closing it would wait for the buffer to drain, which may be never)."""

    transport: asyncio.Transport
    app_state: dict[str, Any]
    cycle: Any
    _stall: asyncio.TimerHandle | None = None

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        self._stop()
        self._check(None)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if self._stall is None:
            self._check(None)

    def resume_writing(self) -> None:
        super().resume_writing()  # type: ignore[misc]
        self._stop()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop()
        super().connection_lost(exc)  # type: ignore[misc]
        # A send waiting on flow control returns, and then sees the disconnect (uvicorn does not wake it).
        super().resume_writing()  # type: ignore[misc]

    def _check(self, before: int | None) -> None:
        if not self.transport.get_write_buffer_size():  # all handed to the kernel: nothing waits on this client
            self._stall = None
            return
        left = self._unacknowledged()
        if before is not None and left >= before:
            self._drop()
            return
        timeout = self.app_state.get("client_timeout", 15.0)
        self._stall = asyncio.get_running_loop().call_later(timeout, self._check, left)

    def _unacknowledged(self) -> int:
        """Bytes the client has not taken yet: our buffer plus the kernel's send queue (which grows into
        megabytes while the client reads nothing, so our buffer alone shrinking is no sign of a reader)."""
        left = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError):
            left += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        return left

    def _drop(self) -> None:
        self._stall = None
        fields = self.cycle.scope.get(LOG_FIELDS) if self.cycle is not None else None
        if fields is not None:
            fields["error"], fields["disconnected"] = "client_timeout", True
        self.transport.abort()

    def _stop(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
