"""`python app.py`: settings, logging and uvicorn, with the two things uvicorn does not do by configuration.

1. uvicorn leaves HTTP/1.1 framing limits to the server around it: `framing.GuardedProtocol` closes a connection
   whose request head is not complete within CLIENT_TIMEOUT, answers 431 to any head over 16 KiB, a line over
   8 KiB or 100 headers (pipelined ones too), answers malformed HTTP and Content-Length with Transfer-Encoding
   with our envelope and an access line, and closes cleanly (no reset) after refusing a body still arriving.
2. After a graceful shutdown on SIGTERM, uvicorn re-raises the signal to itself (exit 143); `_Server`
   exits 0 instead, and ignores a repeated SIGTERM while the interpreter winds down after the drain.
   SIGHUP reloads the keys and secrets' files (reloading.py, installed by the app's lifespan; with WORKERS > 1
   the parent sends it on to each worker, workers.py); until then, from app.py's first line, it is ignored.
   At SHUTDOWN_TIMEOUT (or at a second Ctrl-C) it ends the requests still running with 503 shutting_down
   (shutdown.py) before uvicorn's own cancellation, a second later, would; an answer its client is not taking
   is cut then by aborting the connection (`framing.GuardedProtocol._abort`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import signal
import socket
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, Protocol

import uvicorn
from starlette.applications import Starlette

import logging_config
from config import Settings, SettingsError, load_settings
from framing import H11_BUFFER_BYTES, GuardedProtocol
from shutdown import Requests

logger = logging.getLogger("service")


class AppFactory(Protocol):
    """app.create_app, passed in by app.py: this module is below it, so it never imports app."""

    def __call__(self, settings: Settings, *, reload_on_hup: bool = ...) -> Starlette: ...


class _Server(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        on_exit: Callable[[], None],
        *,
        requests: Requests,
        deadline: float,
    ) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self._requests = requests
        self._deadline = deadline
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ended = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)
        if self.force_exit and self._loop is not None:  # a second Ctrl-C: stop waiting for the deadline
            self._loop.call_soon_threadsafe(self._end_requests)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        timer = self._loop.call_later(self._deadline, self._end_requests)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()
        if self.force_exit:  # after a second Ctrl-C uvicorn neither ends the requests nor shuts the app down
            self._end_requests()
            await self._requests.wait_ended(5.0)
            await self.lifespan.shutdown()

    def _end_requests(self) -> None:
        if not self._ended and self._requests.tasks:
            self._ended = True
            count = self._requests.end_all()
            logger.warning("shutdown: %d request(s) still running were ended with 503 shutting_down", count)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        handled = (signal.SIGINT, signal.SIGTERM)  # SIGHUP: the lifespan's reload (reloading.py)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
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
        http=GuardedProtocol,
        h11_max_incomplete_event_size=H11_BUFFER_BYTES,
        log_config=log_config,
        access_log=False,
        server_header=False,
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=settings.forwarded_allow_ips or None,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout) + 1,  # the app ends its requests first
    )


def configure_from_environment() -> tuple[Settings, dict[str, Any]]:
    """Read the settings and set up logging once at start-up; an invalid value ends the process with one line."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        raise SystemExit(logging_config.fatal_line(f"configuration error: {exc}", fmt=exc.log_format)) from None
    log_config = logging_config.configure(level=settings.log_level, fmt=settings.log_format, secrets=settings.secrets())
    return settings, log_config


@functools.cache
def app_from_environment(create_app: AppFactory) -> Starlette:
    """`app:app` for `python -m uvicorn` and for each worker: settings and logging set up on first use."""
    return create_app(configure_from_environment()[0], reload_on_hup=True)


def main(create_app: AppFactory) -> None:
    """`python app.py`; with WORKERS > 1 each worker builds its app from the import string "app:app" instead."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the reload takes it (reloading.py; workers.py in the parent)
    settings, log_config = configure_from_environment()
    if settings.workers > 1:  # each worker builds its own app from "app:app"
        from workers import Workers  # imported only when used: uvicorn's supervisor costs ~2 MB

        config = uvicorn_config(settings, "app:app", log_config)
        shared: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        if settings.metrics:  # one private directory where every worker's metrics meet (metrics.py)
            import metrics

            shared = metrics.shared_directory()
        with shared:
            Workers(config, sockets=[config.bind_socket()]).run()
    else:
        app = create_app(settings, reload_on_hup=True)
        config = uvicorn_config(settings, app, log_config)
        service = app.state.service
        on_exit = functools.partial(setattr, service, "draining", True)
        _Server(config, on_exit, requests=service.requests, deadline=settings.shutdown_timeout).run()
