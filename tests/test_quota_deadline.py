"""REDIS_TIMEOUT's deadline (quota_deadline.py): it starts once the pool hands a call a connection, through a
redis-py hook these tests keep honest, and a busy loop's time is not counted against Redis."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis.asyncio
from redis_server import RedisServer

import errors
import quota_deadline
import quota_redis
from config import load_settings
from quota_types import Limits

LIMITS = Limits(0, 1_000_000, 0)


def test_a_hung_redis_is_cut_at_the_deadline_not_at_the_backstop(redis_server: RedisServer) -> None:
    """The pool's hook really starts the deadline: a redis-py that stopped calling `ensure_connection` would leave
    only the backstop, which starts it after max(1 s, 4 x 0.1 s) + 0.1 s, and fail here."""
    settings = load_settings({"REDIS_URL": redis_server.url, "QUOTA_REQUESTS_PER_MINUTE": "1", "REDIS_TIMEOUT": "0.1"})

    async def scenario() -> tuple[float, float]:
        store = quota_redis.Shared(settings)
        await store.admit("local", LIMITS, 10, True)  # a connection in the pool
        redis_server.pause()
        try:
            times = []
            for _ in range(2):  # the one in the pool, then a new one (the first was closed: its reply is owed)
                started = time.monotonic()
                with pytest.raises(errors.QuotaUnavailable):
                    await store.admit("local", LIMITS, 10, True)
                times.append(time.monotonic() - started)
        finally:
            redis_server.resume()
            await store.aclose()
        return times[0], times[1]

    kept, new = asyncio.run(scenario())
    assert 0.1 <= kept < 0.9 and 0.1 <= new < 0.9, (kept, new)


def test_the_pool_outside_a_quota_call_needs_no_deadline(redis_server: RedisServer) -> None:
    async def ping() -> Any:
        pool = quota_deadline.Pool.from_url(redis_server.url)
        try:
            return await redis.asyncio.Redis(connection_pool=pool).ping()
        finally:
            await pool.aclose()

    assert asyncio.run(ping()) is True  # no LookupError
