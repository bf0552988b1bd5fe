"""REDIS_TIMEOUT's deadline for one Redis call (quota_redis.py), and the pool hook that starts it.

Dependency on redis-py behaviour beyond its documentation (the one place that lists it): `Pool` overrides
`BlockingConnectionPool.ensure_connection`, public in redis-py 8.1.0 but not documented as a hook, which the
client calls once the pool has handed a command a connection, before connecting. Should an upgrade stop calling
it, `Deadline`'s backstop starts it anyway once the pool's own wait is over (max(1 s, 4 x REDIS_TIMEOUT) +
REDIS_TIMEOUT after the call began), so no call hangs, and test_quota_deadline.py fails.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from typing import Any, cast

import redis.asyncio

_STEPS = 20  # a busy loop runs one step per turn: a new connection with AUTH, SELECT and a NOSCRIPT takes 8


class Deadline:
    """REDIS_TIMEOUT for one call once the pool hands it a connection (`Pool`), in `_STEPS` steps, each armed when
    the last ran, so time the loop ran late (busy with other requests: 40 parsing large bodies can keep it busy
    past the whole deadline) is not counted: a call is cut after REDIS_TIMEOUT and at least `_STEPS` loop turns.
    A reply that arrived in the last step, not yet read when it runs out, took that long by this count: late."""

    __slots__ = ("_step", "_steps", "_task", "_timer", "expired", "started")

    def __init__(self, seconds: float, backstop: float) -> None:
        """`backstop`: when to start anyway, should the pool's hook not run (past the pool's own wait for one)."""
        self._step = seconds / _STEPS
        self._steps = _STEPS
        self._task = cast("asyncio.Task[Any]", asyncio.current_task())  # Redis is only called from tasks
        self._timer: asyncio.Handle = asyncio.get_running_loop().call_later(backstop, self.start)
        self.started = self.expired = False

    def start(self) -> None:
        if not self.started:  # once per call: after a NOSCRIPT, redis-py asks the pool again
            self.started = True
            self._timer.cancel()  # the backstop
            self._next(asyncio.get_running_loop())

    def _next(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._steps:
            self._steps -= 1
            self._timer = loop.call_later(self._step, self._next, loop)
        else:
            self.expired = True
            self._task.cancel()

    async def bounded(self, call: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await call()
        except asyncio.CancelledError:
            if self.expired and not self._task.uncancel():
                raise TimeoutError("Redis did not answer within REDIS_TIMEOUT") from None
            raise
        finally:
            self._timer.cancel()


DEADLINE: contextvars.ContextVar[Deadline] = contextvars.ContextVar("quota_redis_deadline")


class Pool(redis.asyncio.BlockingConnectionPool):
    """redis-py's pool; a call's deadline starts once it has a connection, before connecting (Redis's time too)."""

    async def ensure_connection(self, connection: Any) -> None:
        deadline = DEADLINE.get(None)  # set by `Shared._call`; a call from elsewhere has none
        if deadline is not None:
            deadline.start()
        await super().ensure_connection(connection)
