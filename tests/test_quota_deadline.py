"""REDIS_TIMEOUT's deadline (quota_deadline.py): it starts once the pool hands a call a connection, through a
redis-py hook these tests keep honest, and a busy loop's time is not counted against Redis."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
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


@contextlib.asynccontextmanager
async def loop_held(seconds: float) -> AsyncIterator[list[int]]:
    """A task that holds the event loop `seconds` at a time, running nothing else meanwhile (as parsing a large
    body does), until the block ends. What it yields counts its turns."""
    turns = [0]
    running = True

    async def hog() -> None:
        while running:
            time.sleep(seconds)
            turns[0] += 1
            await asyncio.sleep(0)

    busy = asyncio.create_task(hog())
    try:
        yield turns
    finally:
        running = False
        await busy


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


def test_the_wait_for_a_connection_is_not_counted_in_the_deadline(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """One connection, 30 admissions at once, a loop busy 10 ms at a time, REDIS_TIMEOUT=0.05: each admission
    waits its turn for the connection far past 0.05 s. Counted, or past the pool's own wait (1 s) `overloaded`,
    never `quota_unavailable` nor an outage (with the deadline started before the wait: 3 counted, 27 failed)."""
    caplog.set_level(logging.WARNING, logger="service")
    env = {"REDIS_URL": redis_server.url, "QUOTA_REQUESTS_PER_MINUTE": "1", "REDIS_TIMEOUT": "0.05"}
    settings = load_settings({**env, "MAX_CONCURRENCY": "1"})

    async def scenario() -> list[str]:
        store = quota_redis.Shared(settings)
        try:
            async with loop_held(0.01):
                calls = [store.admit("local", LIMITS, 1, True) for _ in range(30)]
                answers = await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await store.aclose()
        return [a.type if isinstance(a, errors.ServiceError) else type(a).__name__ for a in answers]

    outcomes = asyncio.run(scenario())
    assert set(outcomes) <= {"Raw", "overloaded"} and "Raw" in outcomes, outcomes
    assert not [r.getMessage() for r in caplog.records if r.getMessage().startswith("Redis is")]


def test_a_hung_redis_on_a_busy_loop_is_given_twenty_steps_of_it(redis_server: RedisServer) -> None:
    """A loop busy 10 ms at a time (past each 5 ms step) runs at most one step of the deadline per turn, mostly
    one every other turn (a step armed after the busy task ran is not due at the next): a hung Redis is given up on
    after 20 steps, about 40 turns (ten steps: about 23), so a call that needs a dozen turns (a new connection
    with a password and a database: AUTH, SELECT, NOSCRIPT, the script loaded) stays far from a false timeout."""
    password = RedisServer(password="quota-pw").start()
    url = password.url.removesuffix("/0") + "/1"
    settings = load_settings({"REDIS_URL": url, "QUOTA_REQUESTS_PER_MINUTE": "1", "REDIS_TIMEOUT": "0.1"})

    async def scenario() -> tuple[str, int]:
        store = quota_redis.Shared(settings)
        try:
            async with loop_held(0.01) as turns:
                first = await store.admit("local", LIMITS, 10, True)
                password.pause()
                before = turns[0]
                with pytest.raises(errors.QuotaUnavailable):
                    await store.admit("local", LIMITS, 10, True)
                return type(first).__name__, turns[0] - before
        finally:
            password.resume()
            await store.aclose()

    try:
        first, turns = asyncio.run(scenario())
    finally:
        password.stop()
    assert first == "Raw" and turns >= 30, (first, turns)
