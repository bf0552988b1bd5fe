"""The quota counts in Redis (REDIS_URL), shared by every worker and replica. Imported only when REDIS_URL is set.

One Lua script per admission and one per settlement (quota_lua/admit.lua and settle.lua, read at import), each
atomic, through redis-py's documented asyncio client: a `BlockingConnectionPool` (at most min(MAX_CONCURRENCY, 64)
connections) and `register_script` (which reloads a script Redis lost). A client's keys share one hash tag (one
Redis Cluster slot); the time is Redis's `TIME`. REDIS_TIMEOUT bounds what Redis takes, not this process: see
`quota_deadline`. A call past it gets QUOTA_FAIL_MODE's answer; an outage (one warning line; with `closed`,
`/readyz` 503) is declared on a connection error, an answer that cannot be used, or `_LATE_IN_A_ROW` calls in a row
past the deadline, and ends with the next reply.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

import errors
from config import Settings
from quota_deadline import DEADLINE, Deadline, Pool
from quota_types import NEVER, Limits, Raw, Ticket

logger = logging.getLogger("service")
_LATE_IN_A_ROW = 3  # calls in a row past REDIS_TIMEOUT that declare an outage: one slow reply does not
_BUSY = object()
_FAILED = object()

_SCRIPTS = Path(__file__).resolve().parent / "quota_lua"  # shipped beside this module (Dockerfile, .dockerignore)
_ADMIT = (_SCRIPTS / "admit.lua").read_text()
_SETTLE = (_SCRIPTS / "settle.lua").read_text()


class Shared:
    """The two scripts over redis-py's pool; every call under its own REDIS_TIMEOUT deadline (`Deadline`)."""

    def __init__(self, settings: Settings) -> None:
        assert settings.redis_url is not None
        self._timeout = settings.redis_timeout
        self._wait = max(1.0, 4 * self._timeout)  # for a free connection: past it, 503 overloaded
        # No redis-py retries, socket or connect timeouts (a busy loop would fire them): `Deadline` bounds every
        # call, connecting included. No CLIENT SETINFO, RESP2 (no HELLO): no round trip beyond AUTH/SELECT.
        self._pool = Pool.from_url(
            settings.redis_url,
            max_connections=min(settings.max_concurrency, 64),
            timeout=self._wait,
            socket_timeout=None,  # redis-py's default, 5 s, would cost a task per send
            retry=Retry(NoBackoff(), 0),
            driver_info=None,
            protocol=2,
        )
        self._client = redis.asyncio.Redis(connection_pool=self._pool)
        self._admit_script = self._client.register_script(_ADMIT)
        self._settle_script = self._client.register_script(_SETTLE)
        self._open = settings.quota_fail_mode == "open"
        self._minute = round(settings.quota_minute * 1e6)  # microseconds, as the scripts count
        self._day = round(settings.quota_day * 1e6)
        self._down = False  # an outage declared
        self._late = 0  # calls in a row past the deadline
        self._settling: set[asyncio.Task[bool]] = set()  # settlements under way, which aclose lets finish

    async def admit(self, client: str, limits: Limits, cost: int, commit: bool) -> Raw | None:
        args = [" ".join(map(str, (*limits, cost, self._minute, self._day, int(commit))))]

        async def admission() -> Raw:
            return _raw(await self._admit_script(keys=_keys(client), args=args))

        raw = await self._call(admission)
        if raw is _BUSY:
            raise errors.Overloaded("Too many requests wait for the quota store; retry in a second.", retry_after="1")
        if raw is _FAILED:
            if self._open:
                return None
            raise errors.QuotaUnavailable("The quota store (Redis) cannot be reached, so requests cannot be counted.")
        return raw  # type: ignore[no-any-return]

    async def settle(self, ticket: Ticket, tokens: int | None, refund_request: bool) -> bool:
        """True once Redis booked it (else the reservation stands); in a task the request's cancellation cannot cut."""
        rpm, tpm, tpd = ticket.limits
        back = self._minute // rpm if refund_request and rpm else 0
        delta = 0 if tokens is None or not (tpm or tpd) else tokens - ticket.cost
        if not delta and not back:
            return True
        settlement = asyncio.get_running_loop().create_task(
            self._settle(ticket.client, [delta, ticket.bucket, ticket.day, back])
        )
        self._settling.add(settlement)
        settlement.add_done_callback(self._settling.discard)
        return await asyncio.shield(settlement)

    async def ready(self) -> bool:
        return self._open or await self._call(self._client.ping) is not _FAILED

    async def aclose(self) -> None:
        # the settlements under way finish first (each within its deadline), for requests the shutdown ended
        await asyncio.gather(*self._settling)
        await self._client.aclose()
        await self._pool.aclose()

    async def _settle(self, client: str, args: list[int]) -> bool:
        async def settlement() -> bool:
            try:
                await self._settle_script(keys=_keys(client), args=args)
            except ResponseError as refused:  # an OOM, say: Redis is there, but did not book it
                logger.warning("Redis refused a settlement (%s): its reservation stands", refused)
                return False
            return True

        booked = await self._call(settlement)
        if booked is _BUSY:
            logger.warning("No Redis connection was free for a settlement: its reservation stands")
        return booked is True

    async def _call(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """The call's result; _BUSY when no connection was free in time, _FAILED when Redis failed this call."""
        deadline = Deadline(self._timeout, backstop=self._wait + self._timeout)  # the pool's wait is over by then
        token = DEADLINE.set(deadline)
        try:
            result = await deadline.bounded(call)
        except Exception as exc:  # any error type (a redis-py upgrade's too) takes the fail mode: never a 500
            if not deadline.started and isinstance(exc, redis.exceptions.ConnectionError):
                return _BUSY  # the pool's own wait ran out: this process's load, not Redis
            self._failed(exc)
            return _FAILED
        finally:
            DEADLINE.reset(token)
        self._late = 0
        if self._down:
            self._down = False
            logger.warning("Redis is reachable again: requests are counted")
        return result

    def _failed(self, exc: Exception) -> None:
        if type(exc) is TimeoutError:  # past the deadline (`Deadline`): an outage only when it keeps happening
            self._late += 1
            if self._late < _LATE_IN_A_ROW:
                return
        if not self._down:
            self._down = True
            then = "requests pass uncounted" if self._open else "Groq-calling routes answer 503 quota_unavailable"
            logger.warning("Redis is unreachable (%s): %s until it is back", type(exc).__name__, then)


def _raw(reply: object) -> Raw:
    """The admission script's reply: ten whole numbers, else ValueError (`inf`, `1e+15`, too few or too many)."""
    if not isinstance(reply, bytes):
        raise ValueError(f"the admission script answered {type(reply).__name__}")
    refused, wait, left, reset, minute_used, minute_reset, day_used, day_reset, bucket, day = map(int, reply.split())
    return Raw(
        refused,
        _seconds(wait),
        left,
        _seconds(reset),
        minute_used,
        _seconds(minute_reset),
        day_used,
        _seconds(day_reset),
        bucket,
        day,
    )


def _seconds(ms: int) -> float:
    return ms / 1000 if ms >= 0 else NEVER  # the script's -1


def _keys(client: str) -> list[str]:
    return [f"quota:{{{client}}}:{part}" for part in ("r", "m", "d")]
