"""Pure ASGI middleware: the request id, the request's record and its one access line; and CORS in the envelope.

Who may call (Keyring, Authorize) is in access.py. The whole stack, and its order, is declared in app.py.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import body
import logging_config
from envelope import error_response
from errors import InvalidRequest, ServiceError
from record import RECORD, Record, access_line, elapsed_ms

logger = logging.getLogger("service")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


class RequestLog:
    """Request id, the request's record, the one access line per request, and the last-resort 500."""

    def __init__(self, app: ASGIApp, observe: Callable[[Scope], Callable[[], None]] | None = None) -> None:
        self.app = app
        self._observe = observe  # METRICS=true: called as a request starts; what it returns, with the final record

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"").decode("latin-1")
        # Echoed even when it equals a secret: the client sent it, and the log formatter masks secrets.
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        token = logging_config.REQUEST_ID.set(request_id)
        client = scope.get("client")
        peer = f"{client[0]}:{client[1]}" if client else None
        record = scope[RECORD] = Record(scope["method"], scope["path"], peer, request_id=request_id)
        finished = self._observe(scope) if self._observe else None
        id_header = (b"x-request-id", request_id.encode())
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal response_started
            starting = message["type"] == "http.response.start"
            if starting:
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)
            if starting:  # a status counts once the server took it (a send can fail when the client has gone)
                response_started = True
                record.status = message["status"]

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            record.disconnected = True
            if not response_started:
                record.status = 499  # nginx's "client closed request": the client saw no status
        except Exception as exc:
            error = exc if isinstance(exc, ServiceError) else ServiceError()
            if not isinstance(exc, ServiceError):
                logger.exception("unhandled error")
            record.error = error.type
            if not response_started:
                await error_response(error, scope)(scope, receive, send_with_id)
        finally:
            record.duration_ms = elapsed_ms(started)
            if finished is not None:  # before the line, so whoever sees the line sees its metrics
                finished()
            logger.info("request", extra={"fields": access_line(record)})
            logging_config.REQUEST_ID.reset(token)
            body.give_back(scope)  # after the line: the handler and its objects are gone by now


class Cors(CORSMiddleware):
    """Starlette's CORS, with a refused preflight answered in the envelope instead of plain text."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 400:
            refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")
            error = InvalidRequest(f"This cross-origin request is not allowed ({refused}); see CORS_ORIGINS.")
            response = Response(error.body(logging_config.REQUEST_ID.get() or ""), 400, media_type="application/json")
        return response
