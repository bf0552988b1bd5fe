"""A fake Groq server on 127.0.0.1 that speaks Groq's wire format (see ../shared/groq-wire.md).

The real groq SDK talks to it over a socket. What it answers is chosen per request by the `model`
in the body (`fake.behaviours[model]`, else `fake.default`); everything it receives is recorded in
`fake.received`, how each stream ended in `fake.stream_ends`, and each request whose client closed
the connection before the answer in `fake.closed_early`.
Run as a script (`python tests/fake_groq.py --port 9000`) it serves the benchmark's models too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any

API_KEY = "gsk_fake_test_key_0123456789"
CHAT_PATH = "/openai/v1/chat/completions"
MODELS_PATH = "/openai/v1/models"
STATS_PATH = "/fake/stats"  # not Groq's: how many connections the fake has accepted
MODELS = ["openai/gpt-oss-20b", "openai/gpt-oss-120b", "qwen/qwen3.6-27b"]


@dataclass
class Behaviour:
    status: int = 200
    error: dict[str, Any] | None = None  # the inner Groq error object for a non-200
    headers: dict[str, str] = field(default_factory=dict)
    raw_body: bytes | None = None  # sent verbatim instead of a completion
    content: str = "Hello from the fake Groq server."
    chunks: int | None = None  # stream this many generated pieces instead of `content` split in words
    chunks_per_write: int = 1
    delay: float = 0.0  # before the response head
    chunk_delay: float = 0.0  # between writes of a stream
    stall_after: int | None = None  # stop sending (socket stays open) after N content chunks
    drop_after: int | None = None  # close the socket after N content chunks
    error_event_after: int | None = None  # send an SSE error event after N content chunks
    fail_times: int | None = None  # a non-200 status: fail this many times, then succeed (None: always)
    usage: bool = True
    finish_reason: str = "stop"
    tool_call: dict[str, Any] | None = None  # {"name": ..., "arguments": "..."}: answer with a tool call
    message_extra: dict[str, Any] = field(default_factory=dict)  # more fields in the answer's message
    # A reasoning model: its reasoning goes out when asked (include_reasoning or reasoning_format "parsed"), as
    # message.reasoning, or in a stream as delta.reasoning chunks right after the first chunk, before the content.
    reasoning: str | None = None
    reasoning_tokens: int | None = None  # reported as usage.completion_tokens_details.reasoning_tokens
    content_delay: float = 0.0  # in a stream, the wait before the first content chunk (the model thinking)
    content_gate: threading.Event | None = None  # setting it ends content_delay early
    reasoning_unasked: bool = False  # gpt-oss's default: reasoning sent even when the request did not ask
    hold: threading.Event | None = None  # answer only once this is set (waits at most 30 s)
    raw_events: list[bytes] | None = None  # a stream sends these (raw SSE bytes, one write each) instead
    models_body: bytes | None = None  # on `fake.default`: sent verbatim for GET /openai/v1/models (and /{model})
    hang_up: bool = False  # close the connection without answering (the client sees Groq as unreachable)

    def pieces(self) -> list[str]:
        if self.chunks is not None:
            return [f"t{i} " for i in range(self.chunks)]
        words = self.content.split(" ")
        return [w + " " for w in words[:-1]] + [words[-1]]


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


class FakeGroq:
    def __init__(self, api_key: str = API_KEY) -> None:
        self.api_key = api_key
        self.default = Behaviour()
        self.behaviours: dict[str, Behaviour] = {}
        self.received: list[Received] = []
        self.stream_ends: list[tuple[str, float]] = []  # ("completed" | "client_closed", monotonic time)
        self.stream_ended = threading.Event()
        self.content_waits: list[str] = []  # how each content_delay ended: "gate", "timeout" or "client_closed"
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0  # accepted, for the benchmark's count of upstream connections opened
        self.models_delay = 0.0  # before the answer to GET /openai/v1/models
        self.closed_early: list[tuple[str, float]] = []  # (path, monotonic time) of a client gone before its answer
        self.open_keys: dict[int, str] = {}  # each open connection's latest Authorization header, by connection

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def chat_requests(self) -> list[Received]:
        return [r for r in self.received if r.path == CHAT_PATH]

    def start(self, port: int = 0) -> FakeGroq:
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(port), self._loop).result(5)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            await self._server.wait_closed()
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _listen(self, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._connection, "127.0.0.1", port, limit=1 << 20)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *lines = head.decode("latin-1").split("\r\n")
                method, path, _ = request_line.split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines if ln)}
                raw = await reader.readexactly(int(headers.get("content-length", "0")))
                body = json.loads(raw) if raw else None
                self.received.append(Received(method, path, headers, body))
                self.open_keys[id(writer)] = headers.get("authorization", "")
                if not await self._respond(method, path, headers, body, reader, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self.open_keys.pop(id(writer), None)
            writer.close()

    async def _respond(
        self, method: str, path: str, headers: dict[str, str], body: Any, reader: Any, writer: Any
    ) -> bool:
        if (method, path) == ("GET", STATS_PATH):
            return self._send_json(writer, 200, {"connections": self.connections})
        if headers.get("authorization") != f"Bearer {self.api_key}":
            error = {"message": "Invalid API Key", "type": "invalid_request_error", "code": "invalid_api_key"}
            return self._send_json(writer, 401, {"error": error})
        if method == "GET" and path.startswith(MODELS_PATH) and self.default.models_body is not None:
            return self._send(writer, 200, self.default.models_body, "application/json")
        if (method, path) == ("GET", MODELS_PATH):
            if self.models_delay and await self._closed_during(path, self.models_delay, reader):
                return False
            return self._send_json(writer, 200, {"object": "list", "data": [_model(m) for m in MODELS]})
        if method == "GET" and path.startswith(MODELS_PATH + "/"):  # GET /openai/v1/models/{model}
            model = urllib.parse.unquote(path.removeprefix(MODELS_PATH + "/"))
            if model in MODELS:
                return self._send_json(writer, 200, _model(model))
            return self._send_json(writer, 404, {"error": groq_error(404, model).error})
        if (method, path) != ("POST", CHAT_PATH):
            error = {"message": "Unknown request URL", "type": "invalid_request_error", "code": "unknown_url"}
            return self._send_json(writer, 404, {"error": error})
        behaviour = self.behaviours.get(str(body.get("model")), self.default)
        if behaviour.delay and await self._closed_during(path, behaviour.delay, reader):
            return False
        if behaviour.hold is not None:
            await _held(behaviour.hold)
        if behaviour.hang_up:
            writer.transport.abort()
            return False
        extra = behaviour.headers
        if behaviour.raw_body is not None:
            return self._send(writer, behaviour.status, behaviour.raw_body, "application/json", extra)
        if behaviour.status != 200 and behaviour.fail_times != 0:
            if behaviour.fail_times is not None:
                behaviour.fail_times -= 1
            error = behaviour.error or {"message": "fake failure", "type": "internal_server_error"}
            return self._send_json(writer, behaviour.status, {"error": error}, extra)
        if body.get("stream"):
            return await self._stream(body, behaviour, reader, writer)
        return self._send_json(writer, 200, _completion(body, behaviour), extra)

    def _send_json(self, writer: Any, status: int, payload: Any, extra: dict[str, str] | None = None) -> bool:
        trailing = b"\n" if status >= 400 else b""
        return self._send(
            writer, status, json.dumps(payload, separators=(",", ":")).encode() + trailing, "application/json", extra
        )

    def _send(self, writer: Any, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> bool:
        head = [f"HTTP/1.1 {status} X", f"content-type: {ctype}", f"content-length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in {**RATE_HEADERS, **(extra or {})}.items()]
        writer.write("\r\n".join(head).encode() + b"\r\n\r\n" + body)
        return True

    async def _stream(self, body: dict[str, Any], b: Behaviour, reader: Any, writer: Any) -> bool:
        head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in {**RATE_HEADERS, **b.headers}.items()) + "\r\n"
        writer.write(head.encode())
        closed = asyncio.ensure_future(reader.read(1))  # the client closing its end shows up as EOF here
        events = list(_stream_events(body, b) if b.raw_events is None else b.raw_events)
        sent_content = 0
        i = 0
        try:
            while i < len(events):
                if sent_content in (b.stall_after, b.drop_after, b.error_event_after) and 0 < i < len(events) - 2:
                    if sent_content == b.drop_after:
                        writer.transport.abort()
                        return self._ended("dropped")
                    if sent_content == b.error_event_after:
                        error = {"message": "Service Unavailable", "type": "internal_server_error", "code": "503"}
                        _write_chunk(writer, b"data: " + json.dumps({"error": error}).encode() + b"\n\n")
                        _write_chunk(writer, b"")
                        return self._ended("error_event")
                    await asyncio.wait({closed})
                    return self._ended("client_closed")
                batch = events[i : i + b.chunks_per_write]
                i += len(batch)
                content = sum(1 for e in batch if b'"content":"' in e and b'"content":""' not in e)
                if content and not sent_content and b.content_delay and await self._hold_content(b, closed):
                    return self._ended("client_closed")
                sent_content += content
                _write_chunk(writer, b"".join(batch))
                await writer.drain()
                if closed.done():
                    return self._ended("client_closed")
                if b.chunk_delay:
                    await asyncio.wait({closed}, timeout=b.chunk_delay)
            if await _stop_watching(closed):  # before the last chunk, after which the next request may come
                return self._ended("client_closed")
            _write_chunk(writer, b"")
            await writer.drain()
            return self._ended("completed")
        except ConnectionError:
            return self._ended("client_closed")
        finally:
            closed.cancel()

    def _ended(self, how: str) -> bool:
        """Record how a stream ended; returns whether its connection stays open: after a whole stream, as with Groq.

        Closing it instead, unannounced (no `Connection: close`), races the client's next request on it: that
        request, sent before the close arrives, is reset unread (a failed call, `upstream_unreachable`)."""
        self.stream_ends.append((how, time.monotonic()))
        self.stream_ended.set()
        return how == "completed"

    async def _hold_content(self, b: Behaviour, closed: asyncio.Future[bytes]) -> bool:
        """Hold the first content chunk for `content_delay` or until the gate is set; True if the client left."""
        deadline, how = time.monotonic() + b.content_delay, "timeout"
        while time.monotonic() < deadline:
            if closed.done() or (b.content_gate is not None and b.content_gate.is_set()):
                how = "client_closed" if closed.done() else "gate"
                break
            await asyncio.wait({closed}, timeout=0.01)
        self.content_waits.append(how)
        return how == "client_closed"

    async def _closed_during(self, path: str, seconds: float, reader: asyncio.StreamReader) -> bool:
        """Wait `seconds` before answering, unless the client closes the connection first (then recorded)."""
        read = asyncio.ensure_future(reader.read(1))  # EOF (b"") or a reset when the client closes
        await asyncio.wait({read}, timeout=seconds)
        read.cancel()
        await asyncio.wait({read})  # settled before the connection's next read
        closed = read.done() and not read.cancelled() and (read.exception() is not None or read.result() == b"")
        if closed:
            self.closed_early.append((path, time.monotonic()))
        return closed


_REQ = "req_01kh52ndshfr2azv0xe6tnv4fx"
RATE_HEADERS = {
    "x-request-id": _REQ,
    "x-ratelimit-limit-requests": "14400",
    "x-ratelimit-limit-tokens": "18000",
    "x-ratelimit-remaining-requests": "14399",
    "x-ratelimit-remaining-tokens": "17997",
    "x-ratelimit-reset-requests": "6s",
    "x-ratelimit-reset-tokens": "7.66s",
}


def _model(model: str) -> dict[str, Any]:
    """One of Groq's model objects, as GET /openai/v1/models lists it and GET /openai/v1/models/{model} answers."""
    owner = model.split("/")[0] if "/" in model else "fake"
    return {
        "id": model,
        "object": "model",
        "created": 1,
        "owned_by": owner,
        "active": True,
        "context_window": 131072,
        "public_apps": None,
        "max_completion_tokens": 65536,
    }


def _write_chunk(writer: Any, data: bytes) -> None:
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))


def _usage(body: dict[str, Any], completion_tokens: int) -> dict[str, Any]:
    prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", [])) + 9
    return {
        "queue_time": 0.04,
        "prompt_tokens": prompt,
        "prompt_time": 0.002,
        "completion_tokens": completion_tokens,
        "completion_time": 0.2,
        "total_tokens": prompt + completion_tokens,
        "total_time": 0.202,
    }


def _completion(body: dict[str, Any], b: Behaviour) -> dict[str, Any]:
    pieces = b.pieces()
    message: dict[str, Any] = {"role": "assistant", "content": "".join(pieces)}
    finish = b.finish_reason
    if b.tool_call:
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_fake1", "type": "function", "function": dict(b.tool_call)}],
        }
        finish = "tool_calls"
    if b.reasoning is not None and (b.reasoning_unasked or _asks_reasoning(body)):
        message["reasoning"] = b.reasoning
    message.update(b.message_extra)
    out: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": _usage(body, len(pieces)),
        "usage_breakdown": None,
        "system_fingerprint": "fp_f8b414701e",
        "x_groq": {"id": _REQ, "seed": 167346302},
        "service_tier": "on_demand",
    }
    _add_reasoning_tokens(out["usage"], b)
    if not b.usage:
        del out["usage"]
    return out


def _stream_events(body: dict[str, Any], b: Behaviour) -> list[bytes]:
    base = {
        "id": f"chatcmpl-{uuid.uuid4()}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body.get("model"),
        "system_fingerprint": "fp_f8b414701e",
    }

    def event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        chunk = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

    pieces = b.pieces()
    events = [event({"role": "assistant", "content": ""}, x_groq={"id": _REQ, "seed": 1535227698})]
    finish = b.finish_reason
    if b.tool_call:
        call = {
            "index": 0,
            "id": "call_fake1",
            "type": "function",
            "function": {"name": b.tool_call["name"], "arguments": ""},
        }
        events.append(event({"tool_calls": [call]}))
        events.append(event({"tool_calls": [{"index": 0, "function": {"arguments": b.tool_call["arguments"]}}]}))
        finish, pieces = "tool_calls", []
    if b.reasoning is not None and (b.reasoning_unasked or _asks_reasoning(body)):
        events += [event({"reasoning": p}) for p in _words(b.reasoning)]
    events += [event({"content": p}) for p in pieces]
    usage = _usage(body, len(pieces))
    _add_reasoning_tokens(usage, b)
    final_extra: dict[str, Any] = {"x_groq": {"id": _REQ, "usage": usage}, "usage": usage} if b.usage else {}
    events.append(event({}, finish, **final_extra))
    if b.usage and (body.get("stream_options") or {}).get("include_usage"):
        events.append(b"data: " + json.dumps({**base, "choices": [], "usage": usage}).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def _asks_reasoning(body: dict[str, Any]) -> bool:
    return body.get("include_reasoning") is True or body.get("reasoning_format") == "parsed"


def _words(text: str) -> list[str]:
    words = text.split(" ")
    return [w + " " for w in words[:-1]] + [words[-1]]


def _add_reasoning_tokens(usage: dict[str, Any], b: Behaviour) -> None:
    if b.reasoning_tokens is not None:
        usage["completion_tokens"] += b.reasoning_tokens
        usage["total_tokens"] += b.reasoning_tokens
        usage["completion_tokens_details"] = {"reasoning_tokens": b.reasoning_tokens}


def groq_error(status: int, model: str = "openai/gpt-oss-120b", **kwargs: Any) -> Behaviour:
    """A model that Groq answers with `status`, in Groq's body and headers for it (groq-wire.md §5, §6)."""
    error, headers = _GROQ_ERRORS[status]
    body = {k: v.replace("{model}", model) if isinstance(v, str) else v for k, v in error.items()}
    return Behaviour(status=status, error=body, headers={**headers, **kwargs.pop("headers", {})}, **kwargs)


_LIMIT_TEXT = (
    "Rate limit reached for model `{model}` in organization `org_01fake` service tier `on_demand` on tokens per"
    " minute (TPM): Limit 15000, Used 11972, Requested 4351. Please try again in 5.289s. Visit"
    " https://console.groq.com/docs/rate-limits for more information."
)
_GROQ_ERRORS: dict[int, tuple[dict[str, Any], dict[str, str]]] = {
    400: (
        {
            "message": "The model `{model}` has been decommissioned and is no longer supported.",
            "type": "invalid_request_error",
            "code": "model_decommissioned",
        },
        {},
    ),
    401: ({"message": "Invalid API Key", "type": "invalid_request_error", "code": "invalid_api_key"}, {}),
    403: ({"message": "Permission denied for model `{model}`.", "type": "permission_error"}, {}),
    404: (
        {
            "message": "The model `{model}` does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "code": "model_not_found",
        },
        {},
    ),
    413: (
        {
            "message": "Request too large for model `{model}` in organization `org_01fake` service tier `on_demand`"
            " on tokens per minute (TPM): Limit 6000, Requested 10338, please reduce your message size and try again.",
            "type": "tokens",
            "code": "rate_limit_exceeded",
        },
        {},
    ),
    422: (
        {"message": "The model produced an invalid response; retry your request.", "type": "invalid_request_error"},
        {},
    ),
    429: (  # with the x-ratelimit-* of the minute's tokens spent, as Groq sends them on its 429 (§6)
        {"message": _LIMIT_TEXT, "type": "tokens", "code": "rate_limit_exceeded"},
        {
            "retry-after": "6",
            "x-ratelimit-limit-tokens": "15000",
            "x-ratelimit-remaining-tokens": "3028",
            "x-ratelimit-reset-tokens": "5.289s",
        },
    ),
    498: (
        {
            "message": "Flex tier capacity exceeded for model `{model}`; try again later.",
            "type": "capacity_exceeded",
            "code": "capacity_exceeded",
        },
        {},
    ),
    408: ({"message": "Request Timeout", "type": "invalid_request_error"}, {}),
    409: ({"message": "Conflict", "type": "invalid_request_error"}, {}),
    500: ({"message": "Internal Server Error", "type": "internal_server_error"}, {}),
    502: ({"message": "Bad Gateway", "type": "internal_server_error"}, {}),
    503: ({"message": "Service Unavailable", "type": "internal_server_error", "code": "service_unavailable"}, {}),
    504: ({"message": "Gateway Timeout", "type": "internal_server_error"}, {}),
    520: ({"message": "Unknown Error", "type": "internal_server_error"}, {}),  # a CDN in front of Groq
}


BENCH_MODELS = {
    "bench/delay50": Behaviour(delay=0.05),
    "bench/stream": Behaviour(chunks=2000, chunk_delay=0.01, chunks_per_write=10),  # ~1,000 tokens/s, like Groq
}


def main() -> None:
    parser = argparse.ArgumentParser(description="Fake Groq server for the benchmark")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--stream-chunks", type=int, default=2000, help="content chunks per bench/stream answer")
    args = parser.parse_args()
    fake = FakeGroq()
    fake.behaviours = dict(BENCH_MODELS)
    fake.behaviours["bench/stream"].chunks = args.stream_chunks
    fake.received = _Discard()
    fake.start(args.port)
    print(fake.port, flush=True)
    threading.Event().wait()


class _Discard(list):  # type: ignore[type-arg]
    """The benchmark sends many requests; keeping them all would grow memory."""

    def append(self, item: Any) -> None:
        pass


async def _held(event: threading.Event, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not event.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


async def _stop_watching(read: asyncio.Future[bytes]) -> bool:
    """Cancel a `reader.read(1)` watch, settled, so it takes no byte of a next request; True if the client closed."""
    read.cancel()
    await asyncio.wait({read})
    return not read.cancelled() and (read.exception() is not None or read.result() == b"")


if __name__ == "__main__":
    main()
