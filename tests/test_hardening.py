"""Safe by default: who may call, limits, overload, slow clients, CORS, content in logs, shutdown, canaries."""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from conftest import CLIENT_TOKEN, Service, groq_env
from fake_groq import API_KEY, Behaviour, FakeGroq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_chat import PROMPT, assert_error

OTHER_TOKEN = "svc_second_token_for_rotation_01"


@pytest.fixture
def guarded(fake: FakeGroq, start_service: Any) -> Service:
    service: Service = start_service(groq_env(fake, SERVICE_API_KEYS=f"{CLIENT_TOKEN}, {OTHER_TOKEN}"))
    return service


UNAUTHORIZED_HEADERS = [
    {},
    {"authorization": "Bearer wrong-token"},
    {"authorization": f"Bearer {CLIENT_TOKEN[:-1]}"},
    {"authorization": f"Bearer {CLIENT_TOKEN}x"},
    {"authorization": f"Basic {CLIENT_TOKEN}"},
    {"authorization": CLIENT_TOKEN},
    {"authorization": "Bearer"},
    {"x-api-key": CLIENT_TOKEN},
]


@pytest.mark.parametrize("headers", UNAUTHORIZED_HEADERS)
def test_chat_needs_a_valid_token(guarded: Service, fake: FakeGroq, headers: dict[str, str]) -> None:
    response = guarded.client.post("/chat", json=PROMPT, headers=headers)
    error = assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"
    assert error["message"] == "A valid service token is required: send Authorization: Bearer <token>."
    assert fake.received == []


@pytest.mark.parametrize("query", [f"token={CLIENT_TOKEN}", f"api_key={CLIENT_TOKEN}", f"access_token={CLIENT_TOKEN}"])
def test_a_token_in_the_query_string_is_ignored(guarded: Service, query: str) -> None:
    assert_error(guarded.client.post(f"/chat?{query}", json=PROMPT), 401, "unauthorized")


@pytest.mark.parametrize("host", ["a/?x=", "evil/#", "127.0.0.1:1/healthz?", "localhost/../healthz"])
def test_crafted_host_headers_do_not_open_protected_routes(guarded: Service, host: str) -> None:
    with socket.create_connection(("127.0.0.1", int(guarded.url.rsplit(":", 1)[1])), timeout=5) as sock:
        body = json.dumps(PROMPT).encode()
        head = (
            f"POST /chat HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        )
        sock.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 401") or answer.startswith(b"HTTP/1.1 400"), answer[:100]


@pytest.mark.parametrize("token", [CLIENT_TOKEN, OTHER_TOKEN])
def test_each_configured_token_works_and_is_logged_as_a_fingerprint(
    guarded: Service, fake: FakeGroq, token: str
) -> None:
    response = guarded.client.post("/chat", json=PROMPT, headers={"authorization": f"bearer {token}"})
    assert response.status_code == 200
    [access] = guarded.access_lines(1)
    assert access["key_id"] == hashlib.sha256(token.encode()).hexdigest()[:8]
    [sent] = fake.chat_requests()
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"
    assert token not in json.dumps(sent.headers) + json.dumps(sent.body)
    assert token not in guarded.log_text()


def test_open_routes_stay_open_with_tokens(guarded: Service) -> None:
    for path in ("/", "/healthz", "/readyz"):
        assert guarded.client.get(path).status_code == 200
    assert_error(guarded.client.get("/anything-else"), 401, "unauthorized")


def test_without_tokens_only_loopback_peers_may_call(fake: FakeGroq, start_service: Any) -> None:
    """A non-loopback peer cannot be made on this machine honestly (127.0.0.2 is loopback too), so a trusted
    proxy reports one: uvicorn's proxy-header support turns X-Forwarded-For into the peer we decide on."""
    service = start_service(groq_env(fake, FORWARDED_ALLOW_IPS="127.0.0.1"))
    remote = {"x-forwarded-for": "203.0.113.9"}
    error = assert_error(service.client.post("/chat", json=PROMPT, headers=remote), 401, "unauthorized")
    assert "SERVICE_API_KEYS" in error["message"]
    assert service.client.get("/healthz", headers=remote).status_code == 200
    for loopback in ("127.0.0.1", "127.0.0.2", "::1"):  # relayed by a proxy: never loopback (issue 10)
        assert service.client.post("/chat", json=PROMPT, headers={"x-forwarded-for": loopback}).status_code == 401
    assert [line["client"].split(":")[0] for line in service.access_lines(5)][:1] == ["203.0.113.9"]
    assert [w["msg"] for w in service.log_lines() if "SERVICE_API_KEYS" in w["msg"]] == [
        "SERVICE_API_KEYS is not set: only /, /healthz and /readyz answer non-loopback clients"
    ]


def test_forwarded_for_is_not_trusted_by_default(guarded: Service) -> None:
    headers = {"x-forwarded-for": "203.0.113.9", "authorization": f"Bearer {CLIENT_TOKEN}"}
    response = guarded.client.post("/chat", json=PROMPT, headers=headers)
    assert response.status_code == 200  # the peer is still the loopback socket
    assert guarded.access_lines(1)[0]["client"].startswith("127.0.0.1:")


@pytest.mark.parametrize("chunked", [False, True])
def test_body_over_the_limit_is_413_and_never_sent(fake: FakeGroq, start_service: Any, chunked: bool) -> None:
    service = start_service(groq_env(fake, MAX_BODY_BYTES="1000"))
    body = json.dumps({"prompt": "a" * 5000}).encode()
    content: Any = iter([body[i : i + 100] for i in range(0, len(body), 100)]) if chunked else body
    response = service.client.post("/chat", content=content, headers={"content-type": "application/json"})
    assert_error(response, 413, "payload_too_large")
    assert fake.received == []
    ok = json.dumps({"prompt": "a" * 900})
    assert service.client.post("/chat", content=ok, headers={"content-type": "application/json"}).status_code == 200


@pytest.mark.parametrize(
    ("content", "media_type"),
    [
        ({"prompt": "hi"}, "form"),
        ({"prompt": "hi"}, "multipart"),
    ],
)
def test_form_and_multipart_bodies_are_415(service: Service, fake: FakeGroq, content: Any, media_type: str) -> None:
    if media_type == "form":
        response = service.client.post("/chat", data=content)
    else:
        response = service.client.post("/chat", files={"prompt": ("p.txt", b"hi")})
    assert_error(response, 415, "unsupported_media_type")
    assert fake.received == []


@pytest.mark.parametrize("field", ["api_base", "base_url", "api_key", "extra_headers", "extra_body", "headers"])
def test_fields_that_could_steer_the_upstream_are_refused(service: Service, fake: FakeGroq, field: str) -> None:
    body = {"prompt": "hi", field: {"Authorization": "Bearer x"} if "headers" in field else "http://evil.example"}
    error = assert_error(service.client.post("/chat", json=body), 422, "validation_error")
    assert [d["field"] for d in error["details"]] == [field]
    assert fake.received == []


def test_allowed_models_are_enforced(fake: FakeGroq, start_service: Any) -> None:
    service = start_service(groq_env(fake, ALLOWED_MODELS="openai/gpt-oss-20b,openai/gpt-oss-120b"))
    error = assert_error(
        service.client.post("/chat", json={**PROMPT, "model": "qwen/qwen3.6-27b"}), 422, "validation_error"
    )
    assert "openai/gpt-oss-20b, openai/gpt-oss-120b" in error["details"][0]["message"]
    assert service.client.post("/chat", json={**PROMPT, "model": "openai/gpt-oss-120b"}).status_code == 200
    assert len(fake.chat_requests()) == 1


def test_overload_answers_the_excess_at_once(fake: FakeGroq, start_service: Any) -> None:
    cap, extra = 4, 10
    hold = threading.Event()  # the admitted calls stay at Groq until every excess request has its answer
    fake.default = Behaviour(hold=hold)
    service = start_service(groq_env(fake, MAX_CONCURRENCY=str(cap)))
    with ThreadPoolExecutor(cap + extra) as pool:
        try:
            admitted = [pool.submit(httpx.post, service.url + "/chat", json=PROMPT, timeout=30) for _ in range(cap)]
            deadline = time.monotonic() + 10
            while len(fake.chat_requests()) < cap:
                assert time.monotonic() < deadline, "the admitted calls did not reach Groq"
                time.sleep(0.01)
            excess = [pool.submit(httpx.post, service.url + "/chat", json=PROMPT, timeout=30) for _ in range(extra)]
            refused = [f.result() for f in excess]
            assert not any(f.done() for f in admitted), "an admitted call ended before the excess was refused"
        finally:
            hold.set()
        accepted = [f.result() for f in admitted]
    assert [r.status_code for r in accepted] == [200] * cap
    for response in refused:
        assert_error(response, 503, "overloaded")
        assert response.headers["retry-after"] == "1"
    assert len(fake.chat_requests()) == cap
    assert service.app.state.service.in_flight == 0


def _port(service: Service) -> int:
    return int(service.url.rsplit(":", 1)[1])


def _closed_within(sock: socket.socket, seconds: float) -> bytes:
    """What the server sent before closing, asserting it closed within `seconds`."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for {seconds}s") from None
    return data


def test_malformed_http_gets_the_json_envelope(service: Service) -> None:
    with socket.create_connection(("127.0.0.1", _port(service))) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        answer = _closed_within(sock, 5)
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400 ") and b"x-request-id: " in head
    assert json.loads(body)["error"]["type"] == "invalid_request"
    assert service.client.get("/healthz").status_code == 200


def test_slow_header_and_slow_body_clients_are_dropped(fake: FakeGroq, start_service: Any) -> None:
    service = start_service(groq_env(fake, CLIENT_TIMEOUT="0.5"))
    with socket.create_connection(("127.0.0.1", _port(service))) as slow_head:
        slow_head.sendall(b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        assert _closed_within(slow_head, 5) == b""
    with socket.create_connection(("127.0.0.1", _port(service))) as idle:
        assert _closed_within(idle, 5) == b""
    with socket.create_connection(("127.0.0.1", _port(service))) as slow_body:
        slow_body.sendall(
            b"POST /chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        answer = _closed_within(slow_body, 5)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        assert b'"request_timeout"' in answer
    assert fake.received == []


def test_many_slow_clients_do_not_block_a_normal_request(fake: FakeGroq, start_service: Any) -> None:
    service = start_service(groq_env(fake))
    slow = [socket.create_connection(("127.0.0.1", _port(service))) for _ in range(50)]
    try:
        for sock in slow:
            sock.sendall(b"POST /chat HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        assert service.client.post("/chat", json=PROMPT).status_code == 200
        assert time.monotonic() - started < 2  # a generous bound: the request was not queued behind them
    finally:
        for sock in slow:
            sock.close()


@pytest.mark.parametrize(
    "headers",
    [
        b"X-Big: " + b"a" * 100_000 + b"\r\n",
        b"".join(b"X-H%d: v\r\n" % i for i in range(5000)),
    ],
)
def test_oversized_headers_are_431_and_the_server_stays_up(service: Service, headers: bytes) -> None:
    with socket.create_connection(("127.0.0.1", _port(service))) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        answer = _closed_within(sock, 5)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]
    head, body = answer.split(b"\r\n\r\n", 1)
    assert b"x-request-id: " in head and json.loads(body)["error"]["type"] == "headers_too_large"
    assert service.client.get("/healthz").status_code == 200


def test_control_characters_in_requests_never_split_a_log_line(fake: FakeGroq, start_service: Any) -> None:
    service = start_service(groq_env(fake, LOG_PROMPTS="true"))
    evil = 'line1\r\nFAKE {"level": "ERROR"}\x1b[2J\x1b]0;pwned\x07\u2028end'
    service.client.post("/chat", json={"prompt": evil})
    service.client.get("/chat%0d%0aFAKE%1b[31m", headers={"x-request-id": "a\x1bb", "user-agent": "\x1b[31mred"})
    service.client.post("/chat", json={"prompt": "x", "model": evil})
    service.access_lines(3)
    for line in service.log_text().splitlines():
        json.loads(line)
        assert "\x1b" not in line and "\r" not in line and "\u2028" not in line


def test_log_prompts_adds_content_but_never_secrets(fake: FakeGroq, start_service: Any) -> None:
    service = start_service(groq_env(fake, LOG_PROMPTS="true", SERVICE_API_KEYS=CLIENT_TOKEN))
    auth = {"authorization": f"Bearer {CLIENT_TOKEN}"}
    body = {"prompt": f"my key is {API_KEY} and token {CLIENT_TOKEN}", "system_prompt": "Be brief"}
    assert service.client.post("/chat", json=body, headers=auth).status_code == 200
    fake.default = Behaviour(chunks=3)
    assert service.client.post("/chat", json={"prompt": "stream me", "stream": True}, headers=auth).status_code == 200
    plain, streamed = service.access_lines(2)
    assert plain["messages"] == [
        {"role": "system", "content": "Be brief"},
        {"role": "user", "content": "my key is [redacted] and token [redacted]"},
    ]
    assert plain["completion"] == "Hello from the fake Groq server."
    assert streamed["messages"] == [{"role": "user", "content": "stream me"}]
    assert streamed["completion"] == "t0 t1 t2 "
    assert API_KEY not in service.log_text() and CLIENT_TOKEN not in service.log_text()


def test_cors_is_off_unless_configured(service: Service) -> None:
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST"}
    response = service.client.options("/chat", headers=preflight)
    assert not any(h.startswith("access-control-") for h in response.headers)
    response = service.client.post("/chat", json=PROMPT, headers={"origin": "https://app.example"})
    assert not any(h.startswith("access-control-") for h in response.headers)


def test_cors_allows_only_configured_origins(fake: FakeGroq, start_service: Any) -> None:
    service = start_service(groq_env(fake, CORS_ORIGINS="https://app.example"))
    preflight = {
        "origin": "https://app.example",
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type",
    }
    response = service.client.options("/chat", headers=preflight)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    assert set(response.headers["access-control-allow-methods"].split(", ")) == {"GET", "POST"}
    assert "access-control-allow-credentials" not in response.headers
    foreign = service.client.post("/chat", json=PROMPT, headers={"origin": "https://evil.example"})
    assert foreign.status_code == 400 and "access-control-allow-origin" not in foreign.headers
    foreign_preflight = service.client.options("/chat", headers={**preflight, "origin": "https://evil.example"})
    assert "access-control-allow-origin" not in foreign_preflight.headers
    assert foreign_preflight.status_code == 400
    error = foreign_preflight.json()["error"]
    assert error["type"] == "invalid_request" and "origin" in error["message"] and "evil" not in error["message"]
    assert error["request_id"] == foreign_preflight.headers["x-request-id"]
    wrong_method = service.client.options("/chat", headers={**preflight, "access-control-request-method": "DELETE"})
    assert wrong_method.status_code == 400 and "method" in wrong_method.json()["error"]["message"]


def test_cors_wildcard_never_allows_credentials(fake: FakeGroq, start_service: Any) -> None:
    service = start_service(groq_env(fake, CORS_ORIGINS="*"))
    response = service.client.post("/chat", json=PROMPT, headers={"origin": "https://any.example", "cookie": "a=b"})
    assert response.headers["access-control-allow-origin"] in ("*", "https://any.example")
    assert "access-control-allow-credentials" not in response.headers


def test_sigterm_lets_a_slow_request_finish_and_exits_zero(fake: FakeGroq, start_process: Any) -> None:
    hold = threading.Event()  # Groq answers only once the service has begun its shutdown
    fake.default = Behaviour(hold=hold)
    proc = start_process(groq_env(fake))
    result: dict[str, httpx.Response] = {}
    request = threading.Thread(target=lambda: result.update(r=httpx.post(proc.url + "/chat", json=PROMPT, timeout=30)))
    request.start()
    deadline = time.monotonic() + 10
    while not fake.chat_requests():
        assert time.monotonic() < deadline, "the request did not reach Groq"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    while not any('"Shutting down"' in line for line in proc.lines):
        assert time.monotonic() < deadline + 10, "SIGTERM did not start the shutdown"
        time.sleep(0.01)
    assert "r" not in result
    hold.set()
    request.join(30)
    assert result["r"].status_code == 200
    assert proc.wait() == 0  # on its own, after the one signal
    with pytest.raises(httpx.ConnectError):
        httpx.get(proc.url + "/")


def test_sigterm_repeated_until_exit_still_exits_zero(fake: FakeGroq, start_process: Any) -> None:
    proc = start_process(groq_env(fake))
    deadline = time.monotonic() + 30
    while proc.proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        time.sleep(0.005)
    assert proc.wait() == 0


def test_canary_secrets_never_leak(fake: FakeGroq, start_service: Any) -> None:
    """Every case above, with recognisable fake secrets: neither shows up in any response or log line."""
    service = start_service(
        groq_env(fake, SERVICE_API_KEYS=CLIENT_TOKEN, LOG_LEVEL="DEBUG", LOG_PROMPTS="true", MAX_BODY_BYTES="5000")
    )
    good = {"authorization": f"Bearer {CLIENT_TOKEN}"}
    seen: list[str] = []
    cases: list[tuple[str, str, dict[str, str], Any]] = [
        ("post", "/chat", good, {"prompt": API_KEY}),
        ("post", "/chat", good, {"prompt": CLIENT_TOKEN, "stream": True}),
        ("post", "/chat", good, {"prompt": "x", "api_key": API_KEY, "extra_headers": {"authorization": CLIENT_TOKEN}}),
        ("post", "/chat", good, {"prompt": "x" * 6000}),
        ("post", f"/chat?token={CLIENT_TOKEN}", {}, PROMPT),
        ("post", "/chat", {"authorization": f"Bearer {CLIENT_TOKEN[:-1]}"}, PROMPT),
        ("get", "/healthz", good, None),
        ("get", "/readyz", good, None),
        ("post", "/chat", {**good, "x-request-id": CLIENT_TOKEN}, {"prompt": "x", "model": "fail/401"}),
    ]
    fake.behaviours["fail/401"] = Behaviour(status=401, error={"message": f"Invalid API Key {API_KEY}", "type": "x"})
    for method, path, headers, body in cases:
        response = service.client.request(method, path, headers=headers, json=body)
        if headers.get("x-request-id") != CLIENT_TOKEN:  # an id is echoed to its sender (issue 11); logs stay masked
            seen.append(response.text + json.dumps(dict(response.headers)))
    service.access_lines(len(cases))
    for text in [*seen, service.log_text()]:
        assert API_KEY not in text and CLIENT_TOKEN not in text
    for sent in fake.received:  # (a prompt that holds the token is forwarded: it is the client's content)
        assert CLIENT_TOKEN not in json.dumps(sent.headers)


@pytest.fixture(scope="module")
def fuzz_guarded() -> Any:
    fake = FakeGroq().start()
    service = Service(groq_env(fake, SERVICE_API_KEYS=CLIENT_TOKEN, MAX_BODY_BYTES="2000"))
    yield service
    service.stop()
    fake.stop()


header_values = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.binary(max_size=3000)
    | st.builds(lambda d: json.dumps(d).encode(), st.dictionaries(st.text(max_size=10), st.text(max_size=20))),
    headers=st.dictionaries(
        st.sampled_from(
            ["authorization", "content-type", "x-request-id", "origin", "content-encoding", "x-forwarded-for", "host"]
        ),
        header_values,
        max_size=4,
    ),
    path=st.sampled_from(["/chat", "/", "/healthz", "/readyz", "/x", "/chat/"]),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
)
def test_arbitrary_requests_never_get_a_500(
    fuzz_guarded: Service, body: bytes, headers: dict[str, str], path: str, method: str
) -> None:
    try:
        response = fuzz_guarded.client.request(method, path, content=body, headers=headers)
    except httpx.LocalProtocolError:
        return  # httpx itself refuses to send such a header value
    assert response.status_code != 500
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/json"
        assert set(response.json()["error"]) <= {"type", "message", "request_id", "details"}
    assert fuzz_guarded.client.get("/healthz").status_code == 200
