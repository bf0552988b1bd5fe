"""`python app.py`: settings, logging and uvicorn, with the two things uvicorn does not do by configuration.

1. uvicorn leaves HTTP/1.1 framing limits to the server around it: `framing.GuardedProtocol` closes a connection
   whose request head is not complete within CLIENT_TIMEOUT, answers 431 to any head over 16 KiB, a line over
   8 KiB or 100 headers (pipelined ones too), answers malformed HTTP and Content-Length with Transfer-Encoding
   with our envelope and an access line, and closes cleanly (no reset) after refusing a body still arriving.
2. After a graceful shutdown on SIGTERM, uvicorn re-raises the signal to itself (exit 143); `_Server`
   exits 0 instead, and ignores a repeated SIGTERM while the interpreter winds down after the drain.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import uvicorn

from app import configure_from_environment, create_app
from config import Settings
from framing import H11_BUFFER_BYTES, GuardedProtocol

logger = logging.getLogger("service")


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
        http=GuardedProtocol,
        h11_max_incomplete_event_size=H11_BUFFER_BYTES,
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
        Multiprocess(config, sockets=[config.bind_socket()]).run()
    else:
        app = create_app(settings)
        config = uvicorn_config(settings, app, log_config)
        _Server(config, on_exit=lambda: setattr(app.state.service, "draining", True)).run()
