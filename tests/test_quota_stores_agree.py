"""The two quota stores agree: the same random admissions, settlements, refunds and clock steps run through the
in-process store and through the Lua scripts on a real redis-server (its wall clock stood still and stepped by
tests/clock.py), and give the same figures at every step; every key Redis holds always has a TTL."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clock import ShiftedClock
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from redis_server import RedisServer

import quota_local
import quota_redis
from config import load_settings
from quota_types import Limits, Raw, Ticket

START = 1_796_687_880.0  # 2026-12-07 23:58:00 UTC: two minutes before a UTC day ends
STEPS = [1, 2, 5, 30, 59, 60, 61, 119, 3600, 86_400]
CLIENTS = ("alice", "bob")


@pytest.fixture(scope="module")
def shifted_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, ShiftedClock]]:
    clock = ShiftedClock(Path(tmp_path_factory.mktemp("clock")))
    clock.stand_at(START)
    server = RedisServer(env=clock.env()).start()
    yield server, clock
    server.stop()


limits_strategy = st.builds(
    Limits,
    st.sampled_from([0, 1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30, 60]),  # whole seconds between requests
    st.sampled_from([0, 100, 1000, 5000]),
    st.sampled_from([0, 300, 3000, 20000]),
).filter(any)
operation = st.one_of(
    st.tuples(st.just("admit"), st.sampled_from(CLIENTS), st.integers(0, 2500), st.booleans()),
    st.tuples(st.just("settle"), st.integers(0, 50), st.one_of(st.none(), st.integers(0, 3000)), st.booleans()),
    st.tuples(st.just("step"), st.sampled_from(STEPS), st.sampled_from([1, 1, 1, -1])),
)


def figures(raw: Raw | None) -> tuple[Any, ...] | None:
    """What a client sees, in whole milliseconds (Redis's resolution)."""
    if raw is None:
        return None
    times = (raw.wait, raw.requests_reset, raw.minute_reset, raw.day_reset)
    return (raw.refused, raw.requests_remaining, raw.minute_used, raw.day_used, *(round(t * 1000) for t in times))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limits=limits_strategy, operations=st.lists(operation, min_size=1, max_size=40))
@example(  # the clock an hour back: the arrival time clamped, the tokens booked "ahead" forgotten
    limits=Limits(60, 1000, 0),
    operations=[("admit", "alice", 10, True), ("step", 3600, -1), ("admit", "alice", 10, True)],
)
def test_the_in_process_store_and_the_lua_scripts_agree(
    shifted_redis: tuple[RedisServer, ShiftedClock], limits: Limits, operations: list[tuple[Any, ...]]
) -> None:
    server, clock = shifted_redis
    server.client().flushall()
    asyncio.run(_run(server, clock, limits, operations))


async def _run(server: RedisServer, clock: ShiftedClock, limits: Limits, operations: list[tuple[Any, ...]]) -> None:
    now = START
    clock.stand_at(now)
    base = load_settings({"REDIS_URL": server.url, "QUOTA_REQUESTS_PER_MINUTE": "1"})
    local = quota_local.Local(base, clock=lambda: now, date=lambda: now)
    shared = quota_redis.Shared(dataclasses.replace(base, redis_timeout=5.0))
    tickets: list[tuple[Ticket, Ticket]] = []
    inspect = server.client()
    try:
        for step, op in enumerate(operations):
            if op[0] == "admit":
                _, client, cost, commit = op
                here = await local.admit(client, limits, cost, commit)
                there = await shared.admit(client, limits, cost, commit)
                assert there is not None
                assert figures(here) == figures(there), (step, op)
                assert (here.bucket, here.day) == (there.bucket, there.day)
                if commit and not here.refused:
                    mine = Ticket(client, limits, cost, here.bucket, here.day)
                    tickets.append((mine, Ticket(client, limits, cost, there.bucket, there.day)))
            elif op[0] == "settle" and tickets:
                _, index, tokens, refund = op
                mine, theirs = tickets.pop(index % len(tickets))
                assert await local.settle(mine, tokens, refund) is True
                assert await shared.settle(theirs, tokens, refund) is True
                for client in CLIENTS:  # what each sees after it
                    assert figures(await local.admit(client, limits, 0, False)) == figures(
                        await shared.admit(client, limits, 0, False)
                    ), (step, op)
            elif op[0] == "step":
                _, seconds, sign = op
                now += sign * seconds
                clock.stand_at(now)
                for client in CLIENTS:
                    assert figures(await local.admit(client, limits, 0, False)) == figures(
                        await shared.admit(client, limits, 0, False)
                    ), (step, op)
            for key in inspect.keys("quota:*"):
                assert inspect.pttl(key) >= 0, (key, step, op)  # a TTL (-1: none): no key outlives its window
    finally:
        await shared.aclose()
