"""Requests still running at the shutdown deadline end with 503 `shutting_down`, not a cut connection.

When SHUTDOWN_TIMEOUT has passed, uvicorn cancels every request task still running, and after a second
Ctrl-C `asyncio.run` cancels them as it closes the loop; either way uvicorn would log a traceback and
answer a plain-text 500. `python app.py` cancels them itself at the deadline (`Requests.end_all`, called by
server.py), a second before uvicorn would. `EndOnShutdown` turns the cancellation of its request's task,
whoever sent it, into the 503 envelope or, for a stream already started, one last error event, and puts
`error: shutting_down` on the access line. An answer that cannot be finished (a plain one under way, or a last send
not taken within `_SEND_SECONDS`) aborts the connection (`scope[ABORT]`): uvicorn sees a disconnect, logs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from envelope import chat_error_event, error_response, is_sdk_route, openai_error_event
from errors import ShuttingDown
from record import RECORD, Record

ABORT = "service.abort"  # scope key: `await scope[ABORT](always)` aborts the connection (framing.py sets it)
_SEND_SECONDS = 0.5  # for the last answer: well before uvicorn cancels the request, a second after the deadline


class Requests:
    """The tasks of the HTTP requests in flight."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    def end_all(self) -> int:
        """Cancel every request in flight; each answers `shutting_down`. Returns how many there were."""
        for task in self.tasks:
            task.cancel("shutting_down")
        return len(self.tasks)

    async def wait_ended(self, timeout: float) -> None:
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout)


class EndOnShutdown:
    """Pure ASGI middleware, inside RequestLog and Paced: answers a cancelled request with `shutting_down`."""

    def __init__(self, app: ASGIApp, requests: Requests) -> None:
        self.app = app
        self._requests = requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        if scope["type"] != "http" or task is None:
            return await self.app(scope, receive, send)
        started: list[bool] = []  # [is an event stream], once the response has started

        async def watched_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers", ())
                started.append(any(k.lower() == b"content-type" and b"event-stream" in v for k, v in headers))
            await send(message)

        self._requests.tasks.add(task)
        try:
            await self.app(scope, receive, watched_send)
        except asyncio.CancelledError:
            if not task.cancelling():
                raise  # not a cancellation of this request: not ours to answer
            while task.uncancel():
                pass
            await _answer(scope, receive, send, started)
        finally:
            self._requests.tasks.discard(task)


async def _answer(scope: Scope, receive: Receive, send: Send, started: list[bool]) -> None:
    error = ShuttingDown("The service is shutting down and this request ran past SHUTDOWN_TIMEOUT; retry it.")
    record: Record = scope[RECORD]
    record.error = error.type
    record.disconnected = False
    completed = False
    # The client may be gone (OSError) or not reading (TimeoutError); uvicorn may cancel us after all.
    with contextlib.suppress(OSError, TimeoutError, asyncio.CancelledError):
        async with asyncio.timeout(_SEND_SECONDS):
            if not started:
                await error_response(error, scope)(scope, receive, send)
                completed = True
            elif started[0]:
                event = openai_error_event if is_sdk_route(scope) else chat_error_event
                await send({"type": "http.response.body", "body": event(error), "more_body": False})
                completed = True
    if ABORT in scope:
        await scope[ABORT](not completed)
