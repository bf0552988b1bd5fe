"""The request body: JSON only, its size counted as it arrives and bounded, within a deadline; and memory given back.

Nothing is parsed before the media type and the size are known to be acceptable, so no form parser ever runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import re
import sys
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request

import errors

BODY_BYTES = "service.body_bytes"  # scope key: the body's size as it arrived, the quota's prompt estimate
_JSON = "application/json"
_CONTENT_LENGTH = re.compile(r"[0-9]{1,20}")  # as h11 reads it; httptools allows up to 2**64
MAX_JSON_DEPTH = 64  # levels of objects and lists in a free-form JSON value (tool parameters; validation.py)
_PARSE_DEPTH = 10_000  # the recursion limit for a body too deep for the default one (see `_loads`)
_MMAP_BYTES = 512 * 1024  # M_MMAP_THRESHOLD as `return_freed_memory` sets it; also the body size that trims
_libc: ctypes.CDLL | None = None  # glibc, once `return_freed_memory` has set its thresholds


async def read_json(request: Request, *, limit: int, timeout: float) -> dict[str, Any]:
    """The body as a JSON object: media type and size checked before parsing, size counted as it arrives."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != _JSON:
        raise errors.UnsupportedMediaType("Send the body as JSON with Content-Type: application/json.")
    length = request.headers.get("content-length")
    if length is not None and not _CONTENT_LENGTH.fullmatch(length):  # int() refuses over 4,300 digits
        raise errors.InvalidRequest("Content-Length must be the body's size in bytes: at most 20 digits.")
    size = limit + 1 if length and int(length) > limit else 0  # then refused unread
    chunks: list[bytes] = []
    if size <= limit:
        try:
            async with asyncio.timeout(timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        break
                    chunks.append(chunk)
        except TimeoutError:
            raise errors.RequestTimeout(
                "The body did not arrive within CLIENT_TIMEOUT seconds; send it promptly."
            ) from None
    if size > limit:
        raise errors.PayloadTooLarge(f"The body must be at most {limit} bytes (MAX_BODY_BYTES).")
    request.scope[BODY_BYTES] = size
    try:
        body = _loads(b"".join(chunks))
    except ValueError:
        raise errors.InvalidJSON("The body is not valid JSON; send one UTF-8 JSON object.") from None
    if not isinstance(body, dict):
        raise errors.InvalidJSON('The body must be a JSON object, e.g. {"prompt": "Hello"}.')
    return body


def _loads(data: bytes) -> Any:
    """json.loads; a body too deep for the default recursion limit (~1,000 levels) is parsed once more under
    _PARSE_DEPTH, so that validation can name the field that nests too deep. Nothing awaits in between, so no other
    request runs under the raised limit; 10,000 levels of json's C scanner fit well within an 8 MB stack."""
    with contextlib.suppress(RecursionError):
        return json.loads(data)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, _PARSE_DEPTH))
    try:
        return json.loads(data)
    except RecursionError:
        message = f"body nests lists and objects more than about {_PARSE_DEPTH:,} levels deep"
        raise errors.ValidationError(
            f"The {message}; free-form values (tool parameters, schemas) may nest at most {MAX_JSON_DEPTH} levels.",
            details=({"field": "body", "message": message},),
        ) from None
    finally:
        sys.setrecursionlimit(limit)


def return_freed_memory() -> None:
    """Fix glibc's malloc thresholds (issue 11). By default each large block freed raises them (up to 32 MiB, and
    twice that may stay unreturned at the heap top), so one burst of 1 MiB bodies, each parsed into ~10 MiB of
    objects, left RSS tens of MB higher for good; with fixed thresholds, blocks over 512 KiB go back when freed,
    and at most 1 MiB stays at the heap top. Not lower: asyncio reads each socket into a 256 KiB buffer, which
    would then cost an mmap, a page fault and an munmap on every read (6-9% of the CPU per /chat, bench/run.py)."""
    global _libc
    with contextlib.suppress(OSError, AttributeError, TypeError):  # not glibc: nothing to do
        libc = ctypes.CDLL(None)
        libc.mallopt(-1, 1024 * 1024)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, _MMAP_BYTES)  # M_MMAP_THRESHOLD
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        _libc = libc


def give_back(scope: Mapping[str, Any]) -> None:
    """Once a request whose body was at least 512 KiB is done: glibc's malloc_trim(0), which returns the free pages
    inside the heap as well as at its top. A burst of such bodies arrives in socket reads of up to 256 KiB, below
    the mmap threshold, interleaved with answers still waiting for their clients; the thresholds alone return
    only the heap's top, so 20 bodies of 1 MiB left 7-9 MB of freed pages in RSS for good. It costs 30-300 µs
    (more when there is more to return), against milliseconds to read and parse such a body."""
    if _libc is not None and scope.get(BODY_BYTES, 0) >= _MMAP_BYTES:
        _libc.malloc_trim(0)
