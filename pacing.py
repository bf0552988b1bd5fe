"""A large response body goes out in pieces, so the request lasts while the client is not reading it.

uvicorn waits on the transport's flow control at the start of each `send`, and never on the last one; cut into
pieces of its high-water mark, each piece waits while the client is not reading, and the request (and its access
line) ends only once the client has taken the answer. A client that takes nothing for CLIENT_TIMEOUT is dropped
by write_deadline.py.
"""

from __future__ import annotations

import functools

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_PIECE = 64 * 1024  # uvicorn's write high-water mark


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
