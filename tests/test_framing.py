"""HTTP/1.1 framing over raw sockets: refusals with a clean end, head limits on every head, no request smuggling.

Written for both uvicorn parsers (h11 by default, httptools when requirements-fast.txt is installed); where
they differ (httptools refuses a bare-LF head and Content-Length with Transfer-Encoding while parsing), the
expectation says so.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http import HTTPStatus
from typing import Any

import pytest
from conftest import CLIENT_TOKEN, Service, groq_env
from fake_groq import FakeGroq
from starlette.testclient import TestClient
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from app import create_app
from config import load_settings

H11 = AutoHTTPProtocol.__name__ == "H11Protocol"
HEAD_RULE = "The request head must be at most 16 KiB, each line at most 8 KiB, with at most 100 headers."
MALFORMED = (
    "The request is not valid HTTP/1.1: check the request line, the headers and the body's framing "
    "(Content-Length or Transfer-Encoding: chunked, never both)."
)
BIG = json.dumps({"prompt": "a" * (2 * 1024 * 1024)}).encode()  # twice MAX_BODY_BYTES
PROMPT = json.dumps({"prompt": "b" * 40_000}).encode()  # a body larger than any head limit, under the body limit


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _exchange(port: int, *parts: bytes, pause: float = 0.0) -> bytes:
    """Send `parts` (from a thread, so a server that stops reading cannot block us) and read to the end.

    The end must be a clean FIN: recv returning b"", never ConnectionResetError.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def send() -> None:
            for part in parts:
                try:
                    sock.sendall(part)
                except OSError:  # the server refused and stopped reading: what it answered is asserted below
                    return
                time.sleep(pause)  # only to make separate reads likely; nothing is timed

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        answer = b""
        while chunk := sock.recv(65536):  # TimeoutError or ConnectionResetError here fails the test
            answer += chunk
        sender.join(10)
    return answer


def _responses(answer: bytes) -> list[tuple[str, dict[str, str], bytes]]:
    """The responses in `answer`, each as (status line, headers, body); every one has a Content-Length."""
    found = []
    while answer:
        head, _, rest = answer.partition(b"\r\n\r\n")
        status, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        length = int(headers["content-length"])
        found.append((status, headers, rest[:length]))
        answer = rest[length:]
    return found


def _assert_envelope(response: tuple[str, dict[str, str], bytes], status: int, kind: str, message: str) -> str:
    line, headers, body = response
    assert line == f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    request_id = headers["x-request-id"]
    assert json.loads(body) == {"error": {"type": kind, "message": message, "request_id": request_id}}
    return request_id


def _assert_access_line(service: Service, request_id: str, status: int, kind: str, **known: str) -> None:
    """Exactly one access line for the request, RequestLog's shape, with the id the client received."""
    deadline = time.monotonic() + 5
    while not [line for line in service.access_lines() if line.get("request_id") == request_id]:
        assert time.monotonic() < deadline, f"no access line for {request_id}"
        time.sleep(0.01)
    [line] = [line for line in service.access_lines() if line.get("request_id") == request_id]
    assert isinstance(line.pop("duration_ms"), float) and line.pop("client").startswith("127.0.0.1:")
    del line["ts"]
    expected = {"level": "INFO", "logger": "service", "msg": "request", "request_id": request_id, **known}
    assert line == {**expected, "status": status, "error": kind}


def _assert_nothing_else_refused(service: Service) -> None:
    assert service.client.get("/healthz").status_code == 200  # still up, still serving
    text = service.log_text()
    assert "headers_too_large" not in text and '"exc"' not in text and '"level": "ERROR"' not in text


def _request(method: str, path: str, headers: str, body: bytes) -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n{headers}".encode() + b"\r\n" + body


TOO_LARGE = "The body must be at most 1048576 bytes (MAX_BODY_BYTES)."
JSON = "Content-Type: application/json\r\n"
UNAUTHORIZED = "A valid service token is required: send Authorization: Bearer <token>."
NOT_FOUND = "No route matches this path; the endpoints are listed in the README."
NOT_JSON = "Send the body as JSON with Content-Type: application/json."
NO_KEY = "GROQ_API_KEY is not set; the operator must set it before /chat can answer."
EARLY_REFUSALS = [  # (settings, method, path, headers, status, type, message)
    pytest.param({}, "POST", "/chat", JSON, 413, "payload_too_large", TOO_LARGE, id="413"),
    pytest.param(
        {}, "POST", "/chat", JSON + "Connection: close\r\n", 413, "payload_too_large", TOO_LARGE, id="413-close"
    ),
    pytest.param(
        {},
        "POST",
        "/chat",
        JSON + "Transfer-Encoding: chunked\r\n",
        413,
        "payload_too_large",
        TOO_LARGE,
        id="413-chunked",
    ),
    pytest.param(
        {"SERVICE_API_KEYS": CLIENT_TOKEN}, "POST", "/chat", JSON, 401, "unauthorized", UNAUTHORIZED, id="401"
    ),
    pytest.param({}, "POST", "/nowhere", JSON, 404, "not_found", NOT_FOUND, id="404"),
    pytest.param(
        {}, "PUT", "/chat", JSON, 405, "method_not_allowed", "This method is not allowed here; use POST.", id="405"
    ),
    pytest.param(
        {}, "POST", "/chat", "Content-Type: text/plain\r\n", 415, "unsupported_media_type", NOT_JSON, id="415"
    ),
    pytest.param({"GROQ_API_KEY": ""}, "POST", "/chat", JSON, 503, "not_configured", NO_KEY, id="503"),
]


@pytest.mark.parametrize(("env", "method", "path", "headers", "status", "kind", "message"), EARLY_REFUSALS)
def test_an_answer_before_the_body_arrived_is_read_and_then_the_connection_ends_cleanly(
    fake: FakeGroq,
    start_service: Any,
    env: dict[str, str],
    method: str,
    path: str,
    headers: str,
    status: int,
    kind: str,
    message: str,
) -> None:
    """A 2 MB body the service refuses before reading it: one answer, then FIN, never a 431 or a reset."""
    service = start_service(groq_env(fake, **env))
    if "chunked" in headers:
        pieces = [b"%x\r\n%s\r\n" % (len(BIG[i : i + 65536]), BIG[i : i + 65536]) for i in range(0, len(BIG), 65536)]
        parts = [_request(method, path, headers, b""), *pieces, b"0\r\n\r\n"]
    else:
        parts = [_request(method, path, f"{headers}Content-Length: {len(BIG)}\r\n", b""), BIG]
    [response] = _responses(_exchange(_port(service.url), *parts))
    request_id = _assert_envelope(response, status, kind, message)
    _assert_access_line(service, request_id, status, kind, method=method, path=path)
    assert len(service.access_lines()) == 1
    _assert_nothing_else_refused(service)
    assert fake.received == []


@pytest.mark.parametrize(
    "parts",
    [
        pytest.param([_request("POST", "/chat", f"{JSON}Content-Length: {len(PROMPT)}\r\n", PROMPT)], id="one-read"),
        pytest.param(
            [_request("POST", "/chat", f"{JSON}Content-Length: {len(PROMPT)}\r\n", b"")[:-1], b"\n" + PROMPT],
            id="terminator-split-across-reads",
        ),
        pytest.param(
            [
                _request("POST", "/chat", f"{JSON}Content-Length: {len(PROMPT)}\r\n", b""),
                PROMPT[:20_000],
                PROMPT[20_000:],
            ],
            id="body-in-later-reads",
        ),
    ],
)
def test_the_head_limit_counts_head_bytes_only(service: Service, parts: list[bytes]) -> None:
    parts[0] = parts[0].replace(b"Host: localhost\r\n", b"Host: localhost\r\nConnection: close\r\n")
    [(line, _, body)] = _responses(_exchange(_port(service.url), *parts, pause=0.05))
    assert line == "HTTP/1.1 200 OK" and json.loads(body)["content"] == "Hello from the fake Groq server."
    _assert_nothing_else_refused(service)


def test_a_head_ending_in_bare_line_feeds_is_not_taken_for_a_long_head(service: Service) -> None:
    head = "POST /chat HTTP/1.1\nHost: localhost\nContent-Type: application/json\nConnection: close\nContent-Length: "
    head += str(len(PROMPT))
    [response] = _responses(_exchange(_port(service.url), head.encode() + b"\n\n" + PROMPT))
    if H11:  # h11 accepts bare LF line ends, as RFC 9112 2.2 allows
        assert response[0] == "HTTP/1.1 200 OK"
    else:  # llhttp refuses them: a malformed request, never a head too large
        _assert_access_line(
            service, _assert_envelope(response, 400, "invalid_request", MALFORMED), 400, "invalid_request"
        )
    _assert_nothing_else_refused(service)


ONE_LONG_LINE = "X-Big: " + "a" * (9 * 1024) + "\r\n"  # over 8 KiB, in a head under 16 KiB
HEAD_OVER_16K = "".join(f"X-Part-{i}: {'p' * 5800}\r\n" for i in range(3))  # each line under 8 KiB, 17 KiB in all


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        pytest.param("/healthz", ONE_LONG_LINE, id="one-9KiB-line"),
        pytest.param("/healthz", "X-Big: " + "a" * 20 * 1024 + "\r\n", id="one-20KiB-value"),
        pytest.param("/healthz", HEAD_OVER_16K, id="17KiB-head"),
        pytest.param("/healthz", "".join(f"X-H{i}: v\r\n" for i in range(101)), id="101-headers"),
        pytest.param("/healthz?q=" + "q" * 9 * 1024, "", id="9KiB-request-line"),
    ],
)
def test_a_head_over_the_limits_is_431_and_the_service_stays_up(service: Service, path: str, headers: str) -> None:
    [response] = _responses(_exchange(_port(service.url), _request("GET", path, headers, b"")))
    request_id = _assert_envelope(response, 431, "headers_too_large", HEAD_RULE)
    _assert_access_line(service, request_id, 431, "headers_too_large", method="GET", path="/healthz")
    assert service.client.get("/healthz").status_code == 200


def test_a_head_within_the_limits_is_served(service: Service) -> None:
    headers = "".join(f"X-Part-{i}: {'p' * 7000}\r\n" for i in range(2))  # 7 KiB lines, 14 KiB in all
    [(line, _, _)] = _responses(
        _exchange(_port(service.url), _request("GET", "/healthz", headers + "Connection: close\r\n", b""))
    )
    assert line == "HTTP/1.1 200 OK"


def test_a_head_that_never_ends_is_refused_once_over_the_limit(service: Service) -> None:
    """Refused while it is still arriving (no parser ever sees it complete), and the rest is dropped."""
    endless = [b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n", *[b"X-Filler: " + b"f" * 4000 + b"\r\n"] * 50]
    [response] = _responses(_exchange(_port(service.url), *endless, pause=0.01))
    _assert_access_line(
        service, _assert_envelope(response, 431, "headers_too_large", HEAD_RULE), 431, "headers_too_large"
    )
    assert service.client.get("/healthz").status_code == 200


PIPELINED_HEAD = "".join(f"X-H{i:04}: v\r\n" for i in range(2000))  # 2,000 headers, 26 KB


@pytest.mark.parametrize(
    "second",
    [
        pytest.param(
            _request("POST", "/chat", f"{JSON}Content-Length: 16\r\n{PIPELINED_HEAD}", b'{"prompt": "hi"}'),
            id="2000-headers",
        ),
        pytest.param(_request("GET", "/healthz", "X-Big: " + "a" * 20 * 1024 + "\r\n", b""), id="20KiB-value"),
        pytest.param(
            f"POST /chat HTTP/1.1\r\nHost: localhost\r\n{PIPELINED_HEAD}".encode(), id="incomplete-2000-headers"
        ),
    ],
)
def test_a_head_pipelined_behind_another_is_bounded_too(service: Service, fake: FakeGroq, second: bytes) -> None:
    first = _request("GET", "/healthz", "", b"")
    ok, refused = _responses(_exchange(_port(service.url), first + second))
    assert ok[0] == "HTTP/1.1 200 OK" and json.loads(ok[2])["status"] == "ok"
    request_id = _assert_envelope(refused, 431, "headers_too_large", HEAD_RULE)
    known = (
        {}
        if b"\r\n\r\n" not in second
        else {"method": second.split(b" ")[0].decode(), "path": second.split(b" ")[1].decode()}
    )
    _assert_access_line(service, request_id, 431, "headers_too_large", **known)
    assert fake.received == []


def test_content_length_with_transfer_encoding_is_refused_and_the_connection_closed(
    service: Service, fake: FakeGroq
) -> None:
    """RFC 9112 6.1: either framing could be the one a proxy in front used, so neither is trusted; whatever
    follows (here a pipelined request a length-framing proxy would have seen as body) is never parsed."""
    body = b'{"prompt": "hi"}'
    smuggled = _request("GET", "/healthz", "", b"")
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    request = _request(
        "POST", "/chat", f"{JSON}Content-Length: {len(chunked)}\r\nTransfer-Encoding: chunked\r\n", chunked
    )
    [response] = _responses(_exchange(_port(service.url), request + smuggled))
    request_id = _assert_envelope(response, 400, "invalid_request", MALFORMED)
    known = {"method": "POST", "path": "/chat"} if H11 else {}  # llhttp refuses it while parsing the head
    _assert_access_line(service, request_id, 400, "invalid_request", **known)
    assert len(service.access_lines()) == 1 and fake.received == []


def test_a_malformed_chunked_body_is_answered_and_logged_with_one_request_id(service: Service, fake: FakeGroq) -> None:
    head = _request("POST", "/chat", f"{JSON}Transfer-Encoding: chunked\r\nX-Request-ID: client-id-7\r\n", b"")
    [response] = _responses(_exchange(_port(service.url), head, b'5\r\n{"pro\r\nZZ\r\n', pause=0.05))
    assert _assert_envelope(response, 400, "invalid_request", MALFORMED) == "client-id-7"
    _assert_access_line(service, "client-id-7", 400, "invalid_request", method="POST", path="/chat")
    assert len(service.access_lines()) == 1 and "disconnected" not in service.log_text()
    assert fake.received == []


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(b"NOT HTTP AT ALL\r\n\r\n", id="request-line"),
        pytest.param(_request("POST", "/chat", f"{JSON}Content-Length: {'9' * 5000}\r\n", b""), id="5000-digit-length"),
        pytest.param(_request("POST", "/chat", f"{JSON}Content-Length: {'1' * 4301}\r\n", b""), id="4301-digit-length"),
    ],
)
def test_malformed_http_gets_the_envelope_and_one_access_line(service: Service, request_bytes: bytes) -> None:
    [response] = _responses(_exchange(_port(service.url), request_bytes))
    request_id = _assert_envelope(response, 400, "invalid_request", MALFORMED)
    _assert_access_line(service, request_id, 400, "invalid_request")
    assert len(service.access_lines()) == 1
    assert service.client.get("/healthz").status_code == 200
    assert '"exc"' not in service.log_text()


def test_a_huge_but_short_content_length_is_413(service: Service) -> None:
    request = _request("POST", "/chat", f"{JSON}Content-Length: {'9' * 19}\r\n", b'{"prompt": "hi"}')
    [response] = _responses(_exchange(_port(service.url), request))
    request_id = _assert_envelope(response, 413, "payload_too_large", TOO_LARGE)
    _assert_access_line(service, request_id, 413, "payload_too_large", method="POST", path="/chat")
    _assert_nothing_else_refused(service)


def test_python_app_py_refuses_cleanly_and_stays_up(fake: FakeGroq, start_process: Any) -> None:
    proc = start_process(groq_env(fake))
    port = proc.port
    big = [_request("POST", "/chat", f"{JSON}Content-Length: {len(BIG)}\r\n", b""), BIG]
    [too_large] = _responses(_exchange(port, *big))
    too_large_id = _assert_envelope(too_large, 413, "payload_too_large", TOO_LARGE)
    pipelined = _request("GET", "/healthz", "", b"") + _request("GET", "/healthz", PIPELINED_HEAD, b"")
    ok, refused = _responses(_exchange(port, pipelined))
    assert ok[0] == "HTTP/1.1 200 OK"
    refused_id = _assert_envelope(refused, 431, "headers_too_large", HEAD_RULE)
    assert proc.proc.poll() is None
    assert proc.stop() == 0
    lines = proc.json_lines()
    access = {line["request_id"]: line for line in lines if line["msg"] == "request"}
    assert (access[too_large_id]["status"], access[too_large_id]["error"]) == (413, "payload_too_large")
    assert (access[refused_id]["status"], access[refused_id]["error"]) == (431, "headers_too_large")
    assert len([line for line in lines if line["msg"] == "request" and line["status"] >= 400]) == 2
    assert not any("exc" in line or line["level"] == "ERROR" for line in lines)


@pytest.mark.parametrize(
    ("length", "status", "kind", "message"),
    [
        ("9" * 5000, 400, "invalid_request", "Content-Length must be the body's size in bytes: at most 20 digits."),
        ("1" * 4301, 400, "invalid_request", "Content-Length must be the body's size in bytes: at most 20 digits."),
        ("9" * 20, 413, "payload_too_large", TOO_LARGE),
    ],
)
def test_the_app_itself_reads_any_content_length_safely(
    fake: FakeGroq, length: str, status: int, kind: str, message: str
) -> None:
    """Behind an ASGI server that does not check Content-Length (Starlette's TestClient is one), the app gets
    whatever the client sent: int() refuses over 4,300 digits, so the app must not ask it to."""
    app = create_app(load_settings(groq_env(fake)))
    with TestClient(app, base_url="http://localhost", client=("127.0.0.1", 50000)) as client:
        headers = {"content-type": "application/json", "content-length": length}
        response = client.post("/chat", content=b'{"prompt": "hi"}', headers=headers)
    assert response.status_code == status
    request_id = response.headers["x-request-id"]
    assert response.json() == {"error": {"type": kind, "message": message, "request_id": request_id}}
    assert fake.received == []


def test_a_stop_does_not_wait_for_a_connection_being_drained(service: Service) -> None:
    with socket.create_connection(("127.0.0.1", _port(service.url)), timeout=10) as sock:
        sock.sendall(_request("POST", "/chat", f"{JSON}Content-Length: {len(BIG)}\r\n", BIG[:100_000]))
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        _assert_envelope(_responses(answer)[0], 413, "payload_too_large", TOO_LARGE)
        service.stop()  # the client has neither finished its body nor closed: the service drops it at once
    assert "Waiting for connections to close" not in service.log_text()


def test_a_client_that_keeps_sending_after_the_answer_is_cut_off(service: Service) -> None:
    """What follows a refusal is dropped up to 16 MiB; past that the service closes the socket for good."""
    chunk = b"x" * 65536
    with socket.create_connection(("127.0.0.1", _port(service.url)), timeout=10) as sock:
        sock.sendall(_request("POST", "/chat", f"{JSON}Content-Length: {64 * 1024 * 1024}\r\n", b""))
        failed: list[OSError] = []

        def send() -> None:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # far more than 16 MiB could take, and the end is asserted
                try:
                    sock.sendall(chunk)
                except OSError as exc:
                    failed.append(exc)
                    return

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        answer = b""
        while data := sock.recv(65536):
            answer += data
        sender.join(20)
    _assert_envelope(_responses(answer)[0], 413, "payload_too_large", TOO_LARGE)
    assert len(failed) == 1 and isinstance(failed[0], BrokenPipeError | ConnectionResetError)
    assert service.client.get("/healthz").status_code == 200
