"""`python app.py`: settings, logging and uvicorn, with the two things uvicorn does not do by configuration.

1. A client that opens a connection and never finishes its request head holds it forever: uvicorn
   only times out idle keep-alive connections. And h11 only bounds a head that arrives in pieces.
   `_GuardedProtocol` closes a connection that has not delivered a complete head within
   CLIENT_TIMEOUT, answers 431 to a head over 32 KiB or 100 lines, and answers malformed HTTP with our envelope.
2. After a graceful shutdown on SIGTERM, uvicorn re-raises the signal to itself (exit 143); `_Server`
   exits 0 instead, and ignores a repeated SIGTERM while the interpreter winds down after the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import uuid
from collections.abc import Callable, Iterator
from http import HTTPStatus
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from app import configure_from_environment, create_app
from config import Settings
from errors import HeadersTooLarge, InvalidRequest, ServiceError

_MAX_HEAD_BYTES = 32 * 1024
_MAX_HEAD_LINES = 100
logger = logging.getLogger("service")


class _GuardedProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    cycle: Any
    transport: asyncio.Transport
    app_state: dict[str, Any]

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._deadline is not None:
            self._deadline.cancel()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._waiting_for_head(self._armed_cycle):
            end = data.find(b"\r\n\r\n")
            stop = len(data) if end < 0 else end
            self._head_bytes += stop
            self._head_lines += data.count(b"\n", 0, stop)
            if self._head_bytes > _MAX_HEAD_BYTES or self._head_lines > _MAX_HEAD_LINES:
                logger.warning("request head over %d bytes or %d lines refused", _MAX_HEAD_BYTES, _MAX_HEAD_LINES)
                self._refuse(HeadersTooLarge("The request head must be at most 32 KiB and 100 headers."))
                return
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        self._refuse(InvalidRequest("The request is not valid HTTP/1.1."))

    def _refuse(self, error: ServiceError) -> None:
        request_id = uuid.uuid4().hex
        body = error.body(request_id)
        head = f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\ncontent-type: application/json\r\n"
        head += f"content-length: {len(body)}\r\nx-request-id: {request_id}\r\nconnection: close\r\n\r\n"
        self.transport.write(head.encode() + body)
        self.transport.close()

    def _arm(self) -> None:
        """Start the head deadline: at connection start, and after each response (one timer per connection)."""
        self._armed_cycle = self.cycle
        self._head_bytes = self._head_lines = 0
        if self._deadline is not None:
            self._deadline.cancel()
        timeout = self.app_state.get("client_timeout", 15.0)
        self._deadline = asyncio.get_running_loop().call_later(timeout, self._expire)

    def _waiting_for_head(self, armed: Any) -> bool:
        return self.cycle is armed and (armed is None or armed.response_complete)

    def _expire(self) -> None:
        if self._waiting_for_head(self._armed_cycle) and not self.transport.is_closing():
            self.transport.close()


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None] = lambda: None) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, signal.SIG_IGN if self.should_exit else handler)


def uvicorn_config(settings: Settings, app: Any, log_config: dict[str, Any] | None) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        http=_GuardedProtocol,
        log_config=log_config,
        access_log=False,
        server_header=False,
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=settings.forwarded_allow_ips or None,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout),
    )


def main() -> None:
    settings, log_config = configure_from_environment()
    if settings.workers > 1:  # each worker builds its own app from "app:app"
        from uvicorn.supervisors import Multiprocess  # imported only when used: it costs ~2 MB

        config = uvicorn_config(settings, "app:app", log_config)
        shared: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        if settings.metrics:  # one private directory where every worker's metrics meet (metrics.py)
            import metrics

            shared = metrics.shared_directory()
        with shared:
            Multiprocess(config, sockets=[config.bind_socket()]).run()
    else:
        app = create_app(settings)
        config = uvicorn_config(settings, app, log_config)
        _Server(config, on_exit=lambda: setattr(app.state.service, "draining", True)).run()
