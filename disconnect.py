"""An upstream call lasts only while the client is still connected.

`while_connected(receive, call)`: the body has been read by then, so the next ASGI message can only be
`http.disconnect`; the call runs as a task next to a watch on `receive()`, and a disconnect cancels it, which
closes the upstream request (Groq stops generating) and raises `ClientDisconnect` (the access line says
`disconnected: true`, status 499 when no response had started). Streams use it for their first piece; after
that Starlette's own disconnect listener ends the relay.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import ClientDisconnect
from starlette.types import Receive

T = TypeVar("T")


async def while_connected(receive: Receive, call: Awaitable[T]) -> T:
    """`await call`, unless the client disconnects first: then the call is cancelled and ClientDisconnect raised."""
    work = asyncio.ensure_future(call)
    watch = asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            await asyncio.wait((work,))  # the upstream response is closed before the slot is freed
    if work.cancelled():
        raise ClientDisconnect()
    return work.result()


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass  # a body the route did not read (GET /v1/models) is discarded
