"""The groq SDK clients llm.py calls Groq through, one leased per call, over the transport UPSTREAM_TRANSPORT chose.

httpx (the default install) gets a stack of one-connection clients, here. aiohttp (the fast extra,
requirements-fast.txt) gets one shared client, in upstream_aiohttp.py, imported (with aiohttp) only then.
Either way the SDK is given our key, base URL, timeout and retries explicitly, and one TLS context.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import Any, Protocol

import anyio
import groq
import httpx

import errors
from config import Settings


class Clients(Protocol):
    def lease(self) -> contextlib.AbstractAsyncContextManager[groq.AsyncGroq]: ...

    async def aclose(self) -> None: ...


def build(settings: Settings) -> Clients:
    options: dict[str, Any] = {
        "api_key": settings.groq_api_key,
        "base_url": settings.groq_base_url,
        "timeout": settings.groq_timeout,
        "max_retries": settings.groq_max_retries,
    }
    if settings.upstream_transport == "aiohttp":
        import upstream_aiohttp  # the fast extra: imported only when chosen

        return upstream_aiohttp.SharedClient(options, settings.max_concurrency)
    return ClientStack(options, settings.max_concurrency)


class ClientStack:
    """httpx: one client per call in flight, one connection each, each made when first needed.

    One connection per pool, at most one call on it at a time, so httpcore never queues a call. Its pool is
    unfair when full: one pass hands the same idle connection to every queued call, the losers wait again,
    and a fresh arrival beats them to the next one; at saturation an unlucky call lost that race up to 64
    times (p99 3 s at c=64, issue 16). One big pool is worse still: it checks every idle connection on each
    call (90 req/s at c=64). A stack of free pools reuses the warmest connection first.
    """

    def __init__(self, options: dict[str, Any], size: int) -> None:
        self._options = options
        self._tls: ssl.SSLContext | None = None  # one CA bundle for all pools, loaded with the first: ~25 ms, 1.7 MB
        self._clients: list[groq.AsyncGroq | None] = [None] * size
        self._busy = [0] * size
        self._free = list(reversed(range(size)))  # pools with no call, the next one last

    async def aclose(self) -> None:
        for client in self._clients:
            if client is not None:
                await client.close()

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[groq.AsyncGroq]:
        # The slot is freed only after the pool, so one is always free; were it not, two calls would share one.
        shard = self._free.pop() if self._free else self._busy.index(min(self._busy))
        self._busy[shard] += 1
        try:
            yield self._clients[shard] or self._new_client(shard)
        except (groq.APIStatusError, errors.ServiceError):
            raise  # Groq answered, or we ended the stream and closed its response: the connection is sound
        except BaseException:
            # A call cut short (a client that left, a deadline, a broken connection) can leave the pool's one
            # connection marked busy in httpcore, and every later call on it would wait for GROQ_TIMEOUT: the
            # pool starts afresh instead.
            stale = self._clients[shard]
            if stale is not None and self._busy[shard] == 1:
                self._clients[shard] = None
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):  # the call's own error wins
                    await stale.close()
            raise
        finally:
            self._busy[shard] -= 1
            if not self._busy[shard]:
                self._free.append(shard)

    def _new_client(self, shard: int) -> groq.AsyncGroq:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        self._tls = self._tls or httpx.create_ssl_context()
        http_client = groq.DefaultAsyncHttpxClient(limits=limits, verify=self._tls)
        client = self._clients[shard] = groq.AsyncGroq(**self._options, http_client=http_client)
        return client
