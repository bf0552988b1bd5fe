"""What a request holds is released however it ends: a client that leaves, one that stops reading,
a response that fails to start; and the idle deadline counts Groq's silence only. Real sockets throughout."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

import httpx
import pytest
from conftest import Service, groq_env
from fake_groq import Behaviour, FakeGroq
from starlette.requests import ClientDisconnect
from starlette.types import Message
from test_chat import PROMPT

import streaming
from app import create_app
from config import load_settings
from record import Record

pytestmark = pytest.mark.both_transports  # every test here runs on httpx and on aiohttp

MESSAGES = [{"role": "user", "content": "Say hello"}]
# 6 MB in 1,500 pieces: more than all the buffers between the service and a client (Linux lets a socket's
# send buffer grow to 4 MB), so a client that stops reading makes the service's writes wait.
BIG = " ".join(["x" * 4000] * 1500)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _request(
    port: int, method: str, path: str, body: dict[str, Any] | None, rcvbuf: int | None = None
) -> socket.socket:
    """A raw HTTP/1.1 request on its own socket (optionally with a small receive buffer); the answer is not read."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    data = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    sock.sendall(head.encode() + data)
    return sock


def _read_to_end(sock: socket.socket, seconds: float = 10) -> bytes:
    """Everything until the server closes (EOF or reset), asserting that it does within `seconds`."""
    chunks, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    else:
        raise AssertionError("the server did not close the connection")
    return b"".join(chunks)


def _wait_for(condition: Callable[[], object], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# (method, path, body) of every route that calls Groq; the stream cases have not had their first piece yet.
ROUTES = {
    "chat": ("POST", "/chat", {"prompt": "hi", "model": "slow"}),
    "chat-stream": ("POST", "/chat", {"prompt": "hi", "model": "slow", "stream": True}),
    "sdk": ("POST", "/v1/chat/completions", {"model": "slow", "messages": MESSAGES}),
    "sdk-stream": ("POST", "/openai/v1/chat/completions", {"model": "slow", "messages": MESSAGES, "stream": True}),
    "openai-sdk": ("POST", "/openai/v1/chat/completions", {"model": "slow", "messages": MESSAGES}),
    "models": ("GET", "/v1/models", None),
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_client_that_leaves_before_the_answer_frees_its_slot_and_stops_groq(
    fake: FakeGroq, start_service: Any, route: str
) -> None:
    method, path, body = ROUTES[route]
    fake.behaviours["slow"] = Behaviour(delay=3)
    fake.models_delay = 3
    service = start_service(groq_env(fake, MAX_CONCURRENCY="1"))
    sock = _request(_port(service.url), method, path, body)
    _wait_for(lambda: fake.received)
    sock.close()
    closed_at = time.monotonic()
    _wait_for(lambda: fake.closed_early, 5)
    [(upstream_path, upstream_closed_at)] = fake.closed_early
    assert upstream_path == fake.received[0].path
    assert upstream_closed_at - closed_at < 1.0
    started = time.monotonic()
    assert service.client.post("/chat", json=PROMPT).status_code == 200  # the slot is free again
    assert time.monotonic() - started < 2.0  # long before the slow call would have ended
    left, _ = service.access_lines(2)
    assert (left["path"], left["status"], left["disconnected"]) == (path, 499, True)
    assert "error" not in left
    assert left.get("stream", False) is bool(body and body.get("stream"))
    assert [line for line in service.log_lines() if line["level"] not in ("INFO", "WARNING")] == []


@pytest.mark.parametrize("path", ["/chat", "/v1/chat/completions"])
def test_a_client_that_leaves_mid_stream_closes_groq_and_logs_what_it_saw(
    fake: FakeGroq, start_service: Any, path: str
) -> None:
    fake.default = Behaviour(chunks=2000, chunk_delay=0.02)
    service = start_service(groq_env(fake, MAX_CONCURRENCY="1"))
    body = {"prompt": "hi", "stream": True} if path == "/chat" else {"model": "m", "messages": MESSAGES, "stream": True}
    with service.client.stream("POST", path, json=body) as response:
        assert next(response.iter_lines()).startswith("data: ")
        closed_at = time.monotonic()
    assert fake.stream_ended.wait(5)
    [(how, ended_at)] = fake.stream_ends
    assert how == "client_closed" and ended_at - closed_at < 1.0
    assert service.client.post("/chat", json=PROMPT).status_code == 200
    left, _ = service.access_lines(2)
    assert (left["status"], left["disconnected"], left["stream"]) == (200, True, True)


def test_the_access_line_says_whether_the_request_streamed(service: Service) -> None:
    assert service.client.post("/chat", json={"prompt": "hi", "stream": True}).status_code == 200
    assert service.client.post("/chat", json=PROMPT).status_code == 200
    streamed, plain = service.access_lines(2)
    assert streamed["stream"] is True and "disconnected" not in streamed
    assert "stream" not in plain


@pytest.mark.slow
def test_a_client_that_leaves_frees_the_slot_of_python_app_py(fake: FakeGroq, start_process: Any) -> None:
    fake.behaviours["slow"] = Behaviour(delay=3)
    proc = start_process(groq_env(fake, MAX_CONCURRENCY="1"))
    sock = _request(proc.port, "POST", "/chat", {"prompt": "hi", "model": "slow"})
    _wait_for(lambda: fake.received)
    sock.close()
    closed_at = time.monotonic()
    _wait_for(lambda: fake.closed_early, 5)
    assert fake.closed_early[0][1] - closed_at < 1.0
    assert httpx.post(proc.url + "/chat", json=PROMPT, timeout=10).status_code == 200
    assert proc.stop() == 0
    left = next(line for line in proc.json_lines() if line["msg"] == "request" and line["path"] == "/chat")
    assert (left["status"], left["disconnected"]) == (499, True)
    assert [line for line in proc.json_lines() if line["level"] not in ("INFO", "WARNING")] == []


@pytest.mark.parametrize("stream", [True, False])
def test_clients_that_stop_reading_are_dropped_after_client_timeout(
    fake: FakeGroq, start_service: Any, stream: bool
) -> None:
    fake.default = Behaviour(content=BIG, chunks_per_write=20, stall_after=1479)  # Groq's stream still open at the drop
    service = start_service(groq_env(fake, MAX_CONCURRENCY="4", CLIENT_TIMEOUT="1"))
    body = {"prompt": "Write a lot " * 2000, "stream": stream}
    stalled = [_request(_port(service.url), "POST", "/chat", body, rcvbuf=4096) for _ in range(4)]
    for sock in stalled:
        assert len(sock.recv(40)) > 0  # then never read again, never close
    _wait_for(lambda: len([line for line in service.access_lines() if line.get("error") == "client_timeout"]) == 4)
    lines = service.access_lines(4)
    assert [(line["status"], line["error"], line["disconnected"]) for line in lines] == [
        (200, "client_timeout", True)
    ] * 4
    if stream:
        _wait_for(lambda: len(fake.stream_ends) == 4, 5)
        assert {how for how, _ in fake.stream_ends} == {"client_closed"}
    for sock in stalled:
        data = _read_to_end(sock, 5)  # the server dropped the connection
        assert len(data) < len(BIG)
        sock.close()
    fake.default = Behaviour()
    assert service.client.post("/chat", json={**PROMPT, "stream": stream}).status_code == 200


def test_a_slow_reader_that_keeps_reading_gets_the_whole_answer(fake: FakeGroq, start_service: Any) -> None:
    """The idle deadline counts Groq's silence, not the time our client takes to read (and the write
    deadline leaves a client that pauses for less than CLIENT_TIMEOUT alone)."""
    fake.default = Behaviour(content=BIG, chunks_per_write=20)
    service = start_service(groq_env(fake, GROQ_STREAM_IDLE_TIMEOUT="0.3", CLIENT_TIMEOUT="5"))
    sock = _request(_port(service.url), "POST", "/chat", {"prompt": "hi", "stream": True}, rcvbuf=4096)
    first = sock.recv(40)
    time.sleep(1.0)  # the client pauses reading for longer than GROQ_STREAM_IDLE_TIMEOUT, while Groq has more
    data = first + _read_to_end(sock, 30)
    sock.close()
    assert b"event: error" not in data
    assert data.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    [access] = service.access_lines(1)
    assert access["status"] == 200 and "error" not in access and "disconnected" not in access


def _asgi_request(path: str, body: dict[str, Any]) -> tuple[dict[str, Any], Callable[[], Any]]:
    """The scope and receive of an ASGI 2.4 server (whose `send` raises OSError once the client is gone)."""
    data = json.dumps(body).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    messages = [{"type": "http.request", "body": data, "more_body": False}]

    async def receive() -> Message:
        if messages:
            return messages.pop()
        await asyncio.Event().wait()  # the client stays
        raise AssertionError("unreachable")

    return scope, receive


def test_a_stream_whose_response_fails_to_start_frees_its_slot(
    fake: FakeGroq, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service")
    fake.default = Behaviour(chunks=2000, chunk_delay=0.02)
    app = create_app(load_settings(groq_env(fake, MAX_CONCURRENCY="1")))
    sent: list[Message] = []

    async def gone(message: Message) -> None:
        raise OSError("the client went away")

    async def collect(message: Message) -> None:
        sent.append(message)

    async def run() -> None:
        async with app.router.lifespan_context(app):
            await app(*_asgi_request("/chat", {"prompt": "hi", "stream": True}), gone)
            fake.default = Behaviour()
            await app(*_asgi_request("/chat", PROMPT), collect)

    asyncio.run(run())
    assert [how for how, _ in fake.stream_ends] == ["client_closed"]
    failed, answered = [r.fields for r in caplog.records if r.getMessage() == "request"]  # type: ignore[attr-defined]
    assert (failed["status"], failed["disconnected"], failed["stream"]) == (499, True, True)
    assert answered["status"] == 200
    assert sent[0]["status"] == 200  # not 503: the first request's slot was freed
    assert json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["content"] == "Hello from the fake Groq server."


async def _no_disconnect() -> Message:
    """`receive` for a client that stays: it never sends another message."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def test_the_slot_is_freed_when_closing_the_upstream_raises() -> None:
    released: list[bool] = []

    async def pieces() -> AsyncGenerator[str]:
        try:
            yield "one"
            yield "two"
        finally:
            raise RuntimeError("closing the upstream failed")

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            raise OSError("the client went away")

    async def run() -> None:
        response = await streaming.start(
            pieces(),
            str.encode,
            lambda error: b"",
            Record("POST", "/chat", None),
            lambda: released.append(True),
            _no_disconnect,
        )
        scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
        with pytest.raises((RuntimeError, ClientDisconnect)):
            await response(scope, _no_disconnect, send)

    asyncio.run(run())
    assert released == [True]


def test_the_slot_is_freed_and_the_upstream_closed_when_the_answer_cannot_be_built() -> None:
    released: list[bool] = []
    closed: list[bool] = []

    async def pieces() -> AsyncGenerator[str]:
        try:
            yield "one"
            yield "two"
        finally:
            closed.append(True)

    async def run() -> None:
        head = [("x-ratelimit-reset-tokens", "5\u20acs")]  # a header no response head can carry: not Latin-1
        with pytest.raises(UnicodeEncodeError):
            await streaming.start(
                pieces(),
                str.encode,
                lambda error: b"",
                Record("POST", "/chat", None),
                lambda: released.append(True),
                _no_disconnect,
                head,
            )
        assert (released, closed) == ([True], [True])  # at once, not when the loop finalizes the generator

    asyncio.run(run())


@pytest.mark.slow
def test_readyz_says_not_ready_once_python_app_py_gets_sigterm(fake: FakeGroq, start_process: Any) -> None:
    for _ in range(3):  # SIGTERM is acted on at uvicorn's next 0.1 s tick: a request must land before it
        proc = start_process(groq_env(fake))
        with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as sock:
            ask = b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            sock.sendall(ask)
            ready = b""
            while not ready.endswith((b'{"status":"ready"}', b'{"status": "ready"}', b"closed")):
                ready += sock.recv(65536) or b"closed"
            assert ready.startswith(b"HTTP/1.1 200 ")
            proc.send_signal(signal.SIGTERM)
            sock.sendall(ask)
            answer = _read_to_end(sock)
        assert proc.wait() == 0
        if answer:
            break
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ")
    assert json.loads(body) == {"status": "not_ready", "reason": "shutting down"}
