"""The quota counts in Redis (REDIS_URL), shared by every worker and replica. Imported only when REDIS_URL is set.

One Lua script per admission and one per settlement, each atomic; a client's keys share one hash tag, so they
live on one Redis Cluster slot; the time is Redis's `TIME`, not each replica's clock. Every call has the
REDIS_TIMEOUT deadline; a failure is QUOTA_FAIL_MODE's answer and one warning line per outage, which the next
reply read ends (a connection found closed is replaced by a new one).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import redis.asyncio
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

import errors
from config import Settings
from quota import Limits, Raw, Ticket

logger = logging.getLogger("service")

# ARGV[1], one string: requests per minute, tokens per minute, tokens per day (0: unlimited), cost, minute and day
# lengths (µs), 1 to book (0 to look only). Returns one string: refused limit (0 none, 1 requests, 2 tokens per
# minute, 3 per day), wait (-1: never, the request alone is over the limit), requests remaining, requests reset,
# minute used, minute reset, day used, day reset (times in ms), bucket, day.
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
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
if commit then tat = tat + interval end
if rpm > 0 and tat - now > minute + 1 then worse(1, tat - minute - now) end
local width = minute / 60
local bucket = math.floor(now / width)
local entries = redis.call('HGETALL', KEYS[2])
local buckets, used = {}, 0
for i = 1, #entries, 2 do
  local b, n = tonumber(entries[i]), tonumber(entries[i + 1])
  if b <= bucket - 60 then redis.call('HDEL', KEYS[2], entries[i])
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
    """The two scripts over a stack of connections of its own (redis-py's `Connection`, without its pool, whose
    per-command checks, retry wrapper and argument encoding cost more than the exchange itself). A settlement
    is written and not waited for: its reply is read before that connection's next command, so it costs a write
    instead of a round trip (Redis runs a connection's commands in order: it is booked before anything sent
    after it on that connection). bench/run.py's quota rows measure what this saves."""

    def __init__(self, settings: Settings) -> None:
        assert settings.redis_url is not None
        timeout = settings.redis_timeout
        # No socket_timeout (redis-py's is 5 s, with a task per send): every call runs under asyncio.timeout. No
        # CLIENT SETINFO, RESP2 (no HELLO): a new connection costs no round trip beyond the URL's AUTH/SELECT.
        redis_url, no_retry = settings.redis_url, Retry(NoBackoff(), 0)
        pool = redis.asyncio.ConnectionPool.from_url(
            redis_url, socket_timeout=None, socket_connect_timeout=timeout, retry=no_retry, driver_info=None, protocol=2
        )
        self._connection_class, self._connection_kwargs = pool.connection_class, pool.connection_kwargs
        self._idle: list[_Line] = []  # last in, first out: one busy connection stays warm
        self._lines: set[_Line] = set()  # every connection open, idle or in use, for aclose
        self._in_use = asyncio.Semaphore(min(settings.max_concurrency, 64))  # so at most that many are open
        self._closed = False
        self._timeout = timeout
        self._open = settings.quota_fail_mode == "open"
        self._minute = round(settings.quota_minute * 1e6)
        self._day = round(settings.quota_day * 1e6)
        self._down = False

    async def admit(self, client: str, limits: Limits, cost: int, commit: bool) -> Raw | None:
        args = " ".join(map(str, (*limits, cost, self._minute, self._day, int(commit))))
        raw: Raw | None = await self._call(lambda: self._admit(_keys(client), args))
        if raw is None:
            if self._open:
                return None
            raise errors.QuotaUnavailable("The quota store (Redis) cannot be reached, so requests cannot be counted.")
        return raw

    async def settle(self, ticket: Ticket, tokens: int | None, refund_request: bool) -> bool:
        """False when it could not be written: the reservation stands. Redis's reply (an OOM: a warning) comes later."""
        rpm, tpm, tpd = ticket.limits
        back = self._minute // rpm if refund_request and rpm else 0
        delta = 0 if tokens is None or not (tpm or tpd) else tokens - ticket.cost
        if not delta and not back:
            return True
        command = _pack(b"EVAL", _SETTLE_BYTES, b"3", *_keys(ticket.client), delta, ticket.bucket, ticket.day, back)
        with anyio.CancelScope(shield=True):  # a cancelled request still pays
            written = await self._call(lambda: self._exchange(command, wait=False), confirms=False)
        return written is not None

    async def ready(self) -> bool:
        return self._open or await self._call(lambda: self._exchange(_PING, wait=True)) is not None

    async def aclose(self) -> None:
        """Close every connection, those in use too; a call still running then fails like Redis gone."""
        self._closed = True
        lines, self._idle = list(self._lines), []
        for line in lines:
            await _drop(line, self._lines)

    async def _admit(self, keys: list[bytes], args: str) -> Raw:
        try:
            reply = await self._exchange(_pack(b"EVALSHA", _ADMIT_SHA, b"3", *keys, args), wait=True)
        except NoScriptError:  # a Redis that restarted or flushed its scripts: send it whole, which loads it
            reply = await self._exchange(_pack(b"EVAL", _ADMIT_BYTES, b"3", *keys, args), wait=True)
        return _raw(reply)

    async def _exchange(self, command: bytes, *, wait: bool) -> bytes:
        """Send on an idle connection, or on a new one when none is idle or Redis closed the idle one; read
        this command's reply when `wait`, else leave it owed (a settlement)."""
        async with self._in_use:
            if self._closed:  # shutting down: no new connection
                raise redis.exceptions.ConnectionError("the quota store is closed")
            line = self._idle.pop() if self._idle else None
            if line is not None and not await self._usable(line):
                line = None
            if line is None:
                line = _Line(self._connection_class(**self._connection_kwargs))
                self._lines.add(line)
            try:
                await line.connection.send_packed_command(command, check_health=False)
                reply = await _read(line.connection) if wait else b""
            except BaseException:
                await _drop(line, self._lines)
                raise
            line.unread += not wait
            if self._closed:
                await _drop(line, self._lines)
            else:
                self._idle.append(line)  # in step: every reply is read or counted as owed
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def _usable(self, line: _Line) -> bool:
        """Read the settlement replies owed on an idle connection; False (and it is closed) when Redis closed it
        (a restart, CLIENT KILL, its idle timeout) or it is out of step: the command then goes on a new one."""
        connection = line.connection
        try:
            while line.unread and connection.is_connected:
                if isinstance(settled := await _read(connection), ResponseError):
                    logger.warning("Redis refused a settlement (%s): its reservation stands", settled)
                line.unread -= 1
            if connection.is_connected and not await connection.can_read():  # True at EOF or with stray data
                return True
        except (RedisError, OSError, ValueError):
            pass
        except BaseException:
            await _drop(line, self._lines)
            raise
        if line.unread:
            logger.warning("Redis closed a connection with %d settlements unanswered (maybe lost)", line.unread)
        await _drop(line, self._lines)
        return False

    async def _call(self, call: Callable[[], Awaitable[Any]], *, confirms: bool = True) -> Any:
        """The result; None when Redis is down, slow or unreadable. Only a reply read (`confirms`) ends an outage."""
        try:
            async with asyncio.timeout(self._timeout):
                result = await call()
        except (RedisError, OSError, TimeoutError, ValueError) as exc:
            if not self._down and not self._closed:
                self._down = True
                then = "requests pass uncounted" if self._open else "Groq-calling routes answer 503 quota_unavailable"
                logger.warning("Redis is unreachable (%s): %s until it is back", type(exc).__name__, then)
            return None
        if self._down and confirms:
            self._down = False
            logger.warning("Redis is reachable again: requests are counted")
        return result


class _Line:
    __slots__ = ("connection", "unread")

    def __init__(self, connection: AbstractConnection) -> None:
        self.connection = connection
        self.unread = 0  # settlement replies not read yet


async def _drop(line: _Line, lines: set[_Line]) -> None:
    lines.discard(line)
    with contextlib.suppress(Exception):
        await line.connection.disconnect(nowait=True)


async def _read(connection: AbstractConnection) -> bytes | ResponseError:
    """The next reply; an error reply (a script's error, NOSCRIPT) as a value: the connection is still usable."""
    try:
        reply: bytes = await connection.read_response(disable_decoding=True)
    except ResponseError as exc:
        return exc
    return reply


def _pack(*args: bytes | str | int) -> bytes:
    """One command in Redis's protocol (RESP): an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


_ADMIT_BYTES, _SETTLE_BYTES = _ADMIT.encode(), _SETTLE.encode()
_ADMIT_SHA = hashlib.sha1(_ADMIT_BYTES, usedforsecurity=False).hexdigest().encode()
_PING = _pack(b"PING")


def _raw(reply: object) -> Raw:
    """The admission script's reply: ten whole numbers, else ValueError (`inf`, `1e+15`, too few or too many)."""
    if not isinstance(reply, bytes):
        raise ValueError(f"the admission script answered {type(reply).__name__}")
    refused, wait, left, reset, minute_used, minute_reset, day_used, day_reset, bucket, day = map(int, reply.split())
    s = [x / 1000 if x >= 0 else -1.0 for x in (wait, reset, minute_reset, day_reset)]
    return Raw(refused, s[0], left, s[1], minute_used, s[2], day_used, s[3], bucket, day)


def _keys(client: str) -> list[bytes]:
    return [f"quota:{{{client}}}:{part}".encode() for part in ("r", "m", "d")]
