"""A client that accepts no bytes for CLIENT_TIMEOUT while our writes wait on it is dropped.

`WriteDeadline` is a mixin for the uvicorn HTTP protocol (framing.GuardedProtocol): the connection is aborted,
which ends the request as a disconnect (the slot is freed and the upstream request closed), and its access line
says `error: "client_timeout"`. pacing.py makes a large body wait on the client's reading piece by piece, so
the deadline also covers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import struct
import termios
from typing import Any

from record import RECORD, Record


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
        record: Record | None = self.cycle.scope.get(RECORD) if self.cycle is not None else None
        if record is not None:
            record.error, record.disconnected = "client_timeout", True
        self.transport.abort()

    def _stop(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
