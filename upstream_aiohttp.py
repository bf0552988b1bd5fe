"""UPSTREAM_TRANSPORT=aiohttp (the fast extra): every call to Groq through one SDK client on the SDK's aiohttp
transport, `groq.DefaultAioHttpClient`, about a third less CPU per call than httpx at 16-64 calls in flight.

Why one client is enough here, where httpx needs a stack of them (upstream_clients.py): aiohttp's connector hands
a call an idle connection or opens one, up to MAX_CONCURRENCY connections, and the app never has more calls in
flight (a call's slot is freed only once its upstream response is closed), so no call waits for a connection;
one that would waits in aiohttp's first-come queue (and goes back to its front if a new arrival took the freed
connection), never behind an unbounded number of later calls as in httpcore's pool. A call cut short closes its
own connection (aiohttp never reuses one whose answer was not read to the end), so nothing is left busy and no
client needs rebuilding; idle connections are kept for 5 s, like httpx's.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import groq
import httpx


class SharedClient:
    def __init__(self, options: dict[str, Any], size: int) -> None:
        self._options = options
        self._size = size
        self._client: groq.AsyncGroq | None = None  # made when first needed, with the CA bundle (~25 ms, 1.7 MB)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[groq.AsyncGroq]:
        yield self._client or self._new_client()

    def _new_client(self) -> groq.AsyncGroq:
        limits = httpx.Limits(max_connections=self._size, max_keepalive_connections=self._size)
        http_client = _AioHttpClient(limits=limits, verify=httpx.create_ssl_context())
        self._client = groq.AsyncGroq(**self._options, http_client=http_client)
        return self._client


class _AioHttpClient(groq.DefaultAioHttpClient):
    async def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        try:
            return await super().send(request, **kwargs)
        except httpx.ConnectTimeout as exc:
            # httpx-aiohttp maps every aiohttp connection error (refused, reset, closed before the answer) to
            # ConnectTimeout; httpx raises ConnectError (no connection: the request was never sent, charged 0)
            # or RemoteProtocolError (Groq closed it after the request went out: it may have generated), as
            # groq_wire.mapped_errors and the quota's charging table expect. Only a real timeout stays one.
            if isinstance(exc.__cause__, TimeoutError):
                raise
            if isinstance(exc.__cause__, aiohttp.ClientConnectorError):  # refused, DNS, TLS: never sent
                raise httpx.ConnectError(str(exc), request=request) from exc.__cause__
            raise httpx.RemoteProtocolError(str(exc), request=request) from exc.__cause__
