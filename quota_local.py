"""The quota counts in this process: for one worker (config refuses WORKERS > 1 without REDIS_URL).

The same arithmetic as the Lua scripts of quota_redis.py (quota_lua/): GCRA for requests, tokens booked in 1/60
slices of the rolling minute, and one count per UTC day. The minute windows run on the monotonic clock, so a step of
the wall clock cannot lock a client out or free it; the day follows the UTC date. Imported only when a limit is set
without REDIS_URL.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from config import Settings
from quota_types import NEVER, Limits, Raw, Ticket


class Local:
    """The counts in this process: one worker only (config refuses WORKERS > 1 without REDIS_URL)."""

    def __init__(
        self, settings: Settings, *, clock: Callable[[], float] = time.monotonic, date: Callable[[], float] = time.time
    ) -> None:
        self._minute = settings.quota_minute
        self._day = settings.quota_day
        self._clock = clock  # seconds, for the minute windows
        self._date = date  # seconds since the epoch, for the day
        self._state: dict[str, _State] = {}

    async def admit(self, client: str, limits: Limits, cost: int, commit: bool) -> Raw:
        state = self._state.setdefault(client, _State())
        now, today = self._clock(), self._date()
        # Forgotten once past, as Redis expires its keys (the two stores then agree even after clock steps)
        state.tat = 0.0 if now > state.tat_ends else state.tat
        state.buckets = {} if now > state.minute_ends else state.buckets
        state.day_used = 0 if today > state.day_ends else state.day_used
        rpm, tpm, tpd = limits
        refused, wait = 0, 0.0
        interval = self._minute / rpm if rpm else 0.0
        if state.tat > now + self._minute:  # as the Lua script, whose clock (Redis's TIME) can step back
            state.tat, state.tat_ends = now + self._minute, now + self._minute + 1
        tat = max(state.tat, now) + (interval if commit else 0.0)
        if rpm and tat - now > self._minute + 1e-9:
            refused, wait = _worse(refused, wait, 1, tat - self._minute - now)
        width = self._minute / 60
        bucket = math.floor(now / width)
        for old in [b for b in state.buckets if b <= bucket - 60 or b > bucket]:
            del state.buckets[old]
        minute_used = sum(state.buckets.values())
        if tpm and minute_used + cost > tpm:
            refused, wait = _worse(refused, wait, 2, _minute_wait(state.buckets, minute_used + cost - tpm, width, now))
        day = math.floor(today / self._day)
        day_used = state.day_used if state.day == day else 0  # a look changes nothing, as in Redis
        if tpd and day_used + cost > tpd:
            refused, wait = _worse(refused, wait, 3, NEVER if cost > tpd else (day + 1) * self._day - today)
        if commit and not refused:
            if rpm:
                state.tat, state.tat_ends = tat, tat + 1
            if tpm:
                state.buckets[bucket] = state.buckets.get(bucket, 0) + cost
                state.minute_ends = now + self._minute + 1
                minute_used += cost
            if tpd:
                day_used += cost
                state.day, state.day_used, state.day_ends = day, day_used, (day + 1) * self._day + 1
        else:
            tat -= interval if commit else 0.0
        remaining = math.floor((self._minute - (tat - now)) / interval + 1e-9) if rpm else 0
        newest = max((b for b, used in state.buckets.items() if used), default=None)
        minute_reset = 0.0 if newest is None else (newest + 60) * width - now
        return Raw(
            refused=refused,
            wait=wait,
            requests_remaining=remaining,
            requests_reset=tat - now,
            minute_used=minute_used,
            minute_reset=minute_reset,
            day_used=day_used,
            day_reset=(day + 1) * self._day - today,
            bucket=bucket,
            day=day,
        )

    async def settle(self, ticket: Ticket, tokens: int | None, refund_request: bool) -> bool:
        state = self._state[ticket.client]
        if refund_request and ticket.limits.requests_per_minute:
            state.tat -= self._minute / ticket.limits.requests_per_minute
        delta = 0 if tokens is None else tokens - ticket.cost
        if delta and ticket.bucket in state.buckets:
            state.buckets[ticket.bucket] += delta
        if delta and state.day == ticket.day and ticket.limits.tokens_per_day:
            state.day_used += delta
        return True

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


@dataclass(slots=True)
class _State:
    tat: float = 0.0
    buckets: dict[int, int] = field(default_factory=dict)  # tokens per 1/60 of the minute
    day: int = 0
    day_used: int = 0
    tat_ends: float = 0.0  # when Redis's keys for the same counts would expire
    minute_ends: float = 0.0
    day_ends: float = 0.0


def _worse(refused: int, wait: float, limit: int, limit_wait: float) -> tuple[int, float]:
    """Keep the refusal with the longest wait (a request over a whole limit waits forever)."""
    if wait == NEVER or (refused and limit_wait != NEVER and limit_wait <= wait):
        return refused, wait
    return limit, limit_wait


def _minute_wait(buckets: dict[int, int], over: int, width: float, now: float) -> float:
    """Seconds until enough of the oldest reservations leave the rolling minute to free `over` tokens."""
    for bucket in sorted(buckets):
        over -= buckets[bucket]
        if over <= 0:
            return (bucket + 60) * width - now
    return NEVER
