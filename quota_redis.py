"""The quota counts in Redis (REDIS_URL), shared by every worker and replica. Imported only when REDIS_URL is set.

One Lua script per admission and one per settlement, each atomic, through redis-py's documented asyncio client:
a `BlockingConnectionPool` (at most min(MAX_CONCURRENCY, 64) connections) and `register_script` (which reloads
a script Redis lost). A client's keys share one hash tag (one Redis Cluster slot); the time is Redis's `TIME`.
REDIS_TIMEOUT bounds what Redis takes, not this process: see `quota_deadline`. A call past it gets QUOTA_FAIL_MODE's
answer; an outage (one warning line; with `closed`, `/readyz` 503) is declared on a connection error, an answer
that cannot be used, or `_LATE_IN_A_ROW` calls in a row past the deadline, and ends with the next reply.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

import errors
from config import Settings
from quota_deadline import DEADLINE, Deadline, Pool
from quota_types import Limits, Raw, Ticket

logger = logging.getLogger("service")
_LATE_IN_A_ROW = 3  # calls in a row past REDIS_TIMEOUT that declare an outage: one slow reply does not
_BUSY, _FAILED = object(), object()

_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local a = {}
for v in string.gmatch(ARGV[1], '%S+') do a[#a + 1] = tonumber(v) end
local rpm, tpm, tpd, cost, minute, daylen, commit = a[1], a[2], a[3], a[4], a[5], a[6], a[7] == 1
local refused, wait = 0, 0
local function worse(limit, w)
  if wait == -1 or (refused > 0 and w ~= -1 and w <= wait) then return end
  refused, wait = limit, w
end
local interval = 0
if rpm > 0 then interval = minute / rpm end
-- TIME can step back: an arrival time past now + the window is clamped (as if the burst was just used)
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat > now + minute then
  tat = now + minute
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil(minute / 1000) + 1000)
end
tat = math.max(tat, now)
if commit then tat = tat + interval end
if rpm > 0 and tat - now > minute + 1 then worse(1, tat - minute - now) end
local width = minute / 60
local bucket = math.floor(now / width)
local entries = redis.call('HGETALL', KEYS[2])
local buckets, used = {}, 0
for i = 1, #entries, 2 do
  local b, n = tonumber(entries[i]), tonumber(entries[i + 1])
  if b <= bucket - 60 or b > bucket then redis.call('HDEL', KEYS[2], entries[i])  -- or stamped in the future
  else table.insert(buckets, {b, n}); used = used + n end
end
if tpm > 0 and used + cost > tpm then
  table.sort(buckets, function(a, b) return a[1] < b[1] end)
  local over, w = used + cost - tpm, -1
  for _, e in ipairs(buckets) do
    over = over - e[2]
    if over <= 0 then w = (e[1] + 60) * width - now; break end
  end
  worse(2, w)
end
local day = math.floor(now / daylen)
local stored = redis.call('HMGET', KEYS[3], 'day', 'used')
local day_used = 0
if tonumber(stored[1]) == day then day_used = tonumber(stored[2]) end
if tpd > 0 and day_used + cost > tpd then
  if cost > tpd then worse(3, -1) else worse(3, (day + 1) * daylen - now) end
end
if commit and refused == 0 then
  if rpm > 0 then
    redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
  end
  if tpm > 0 then
    redis.call('HINCRBY', KEYS[2], string.format('%.0f', bucket), string.format('%.0f', cost))
    redis.call('PEXPIRE', KEYS[2], math.ceil(minute / 1000) + 1000)
    used = used + cost
    table.insert(buckets, {bucket, cost})
  end
  if tpd > 0 then
    day_used = day_used + cost
    redis.call('HSET', KEYS[3], 'day', string.format('%.0f', day), 'used', string.format('%.0f', day_used))
    redis.call('PEXPIRE', KEYS[3], math.ceil(((day + 1) * daylen - now) / 1000) + 1000)
  end
elseif commit then
  tat = tat - interval
end
local remaining = 0
if rpm > 0 then remaining = math.floor((minute - (tat - now)) / interval + 1e-6) end
local minute_reset = 0
for _, e in ipairs(buckets) do
  if e[2] ~= 0 then minute_reset = math.max(minute_reset, (e[1] + 60) * width - now) end
end
local function ms(us) if us < 0 then return '-1' end return string.format('%.0f', math.ceil(us / 1000)) end
local function n(x) return string.format('%.0f', x) end  -- tostring writes 1e+15 from 1e14 up
return table.concat({n(refused), ms(wait), n(remaining), ms(tat - now), n(used), ms(minute_reset), n(day_used),
  ms((day + 1) * daylen - now), n(bucket), n(day)}, ' ')
"""

# ARGV: the tokens to add (usage minus reservation), the reservation's bucket and day, microseconds to give
# back to the requests limit (0: none).
_SETTLE = """
local back = tonumber(ARGV[4])
if back > 0 then
  local tat = redis.call('GET', KEYS[1])
  if tat then redis.call('SET', KEYS[1], string.format('%.0f', tonumber(tat) - back), 'KEEPTTL') end
end
local delta = tonumber(ARGV[1])
if delta ~= 0 then
  if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then redis.call('HINCRBY', KEYS[2], ARGV[2], delta) end
  if redis.call('HGET', KEYS[3], 'day') == ARGV[3] then redis.call('HINCRBY', KEYS[3], 'used', delta) end
end
return 1
"""


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
        self._minute, self._day = round(settings.quota_minute * 1e6), round(settings.quota_day * 1e6)
        self._down, self._late = False, 0  # an outage declared; calls in a row past the deadline
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
    s = [x / 1000 if x >= 0 else -1.0 for x in (wait, reset, minute_reset, day_reset)]
    return Raw(refused, s[0], left, s[1], minute_used, s[2], day_used, s[3], bucket, day)


def _keys(client: str) -> list[str]:
    return [f"quota:{{{client}}}:{part}" for part in ("r", "m", "d")]
