"""Metrics fixes: keys-file clients by name, no Groq operation for a request Groq never saw, Groq's 498 not a
refusal, and requests refused below the app (framing.py) counted like every other request."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from conftest import CLIENT_TOKEN, Service, free_port, groq_env
from fake_groq import Behaviour, FakeGroq
from test_chat import assert_error
from test_keys import BATCH_TOKEN, OPS_TOKEN, digest, keys_file
from test_metrics import AUTH, GEN_AI, HTTP, MODEL, OPERATION, by, scrape

TOKENS = ("key", "gen_ai_token_type", "gen_ai_response_model")
OPERATIONS = "gen_ai_client_operation_duration_seconds_count"
REFUSED = "groq_proxy_refused_total"
REQUESTS = "http_server_request_duration_seconds_count"
NAMED = f"""
[[keys]]
name = "ops"
sha256 = "{digest(OPS_TOKEN)}"

[[keys]]
name = "batch"
sha256 = "{digest(BATCH_TOKEN)}"
"""


@pytest.fixture
def service_with_metrics(fake: FakeGroq, start_service: Any) -> Service:
    return start_service(groq_env(fake, METRICS="true"))  # loopback-only mode: the test's client may scrape


def test_keys_file_clients_are_counted_by_their_name(fake: FakeGroq, start_service: Any, tmp_path: Path) -> None:
    service = start_service(groq_env(fake, METRICS="true", SERVICE_KEYS_FILE=keys_file(tmp_path, NAMED)))
    for token in (OPS_TOKEN, OPS_TOKEN, BATCH_TOKEN):
        answer = service.client.post(
            "/chat", json={"prompt": "Say hello"}, headers={"authorization": f"Bearer {token}"}
        )
        assert answer.status_code == 200
    lines = [line for line in service.access_lines(at_least=3) if line["path"] == "/chat"]
    assert [line["key"] for line in lines] == ["ops", "ops", "batch"]
    model = lines[0]["model"]
    spent = {name: [line for line in lines if line["key"] == name] for name in ("ops", "batch")}
    expected = {
        (name, kind, model): sum(line[field] for line in mine)
        for name, mine in spent.items()
        for kind, field in (("input", "prompt_tokens"), ("output", "completion_tokens"))
    }
    assert all(value > 0 for value in expected.values())
    samples = scrape(service.url)  # no METRICS_TOKEN: the loopback peer may scrape
    assert by(samples, "groq_proxy_tokens_total", *TOKENS) == expected


def test_quota_store_down_is_a_refusal_and_no_groq_operation(fake: FakeGroq, start_service: Any) -> None:
    env = groq_env(
        fake,
        METRICS="true",
        SERVICE_API_KEYS=CLIENT_TOKEN,
        REDIS_URL=f"redis://127.0.0.1:{free_port()}",  # nothing listens there
        QUOTA_REQUESTS_PER_MINUTE="5",
        QUOTA_FAIL_MODE="closed",
    )
    service = start_service(env)
    assert_error(service.client.post("/chat", json={"prompt": "Say hello"}, headers=AUTH), 503, "quota_unavailable")
    assert fake.chat_requests() == []
    samples = scrape(service.url)
    assert by(samples, OPERATIONS, *OPERATION) == {}
    assert by(samples, REFUSED, "reason") == {("quota_unavailable",): 1}
    assert by(samples, REQUESTS, *HTTP) == {("POST", "/chat", "503"): 1}


def test_groq_busy_is_a_groq_operation_not_a_refusal(fake: FakeGroq, service_with_metrics: Service) -> None:
    fake.default = Behaviour(status=498, error={"message": "Flex tier capacity exceeded", "type": "capacity_exceeded"})
    assert_error(service_with_metrics.client.post("/chat", json={"prompt": "Say hello"}), 503, "upstream_busy")
    samples = scrape(service_with_metrics.url)
    assert by(samples, REFUSED, "reason") == {}
    assert by(samples, OPERATIONS, *OPERATION) == {(*GEN_AI, MODEL, "upstream_busy"): 1}


def _refused(url: str, request: bytes) -> bytes:
    """Send raw bytes, read the answer to the end (framing.py closes the connection after a refusal)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_requests_refused_below_the_app_are_counted(service_with_metrics: Service) -> None:
    url = service_with_metrics.url
    huge = b"GET /nowhere HTTP/1.1\r\nhost: x\r\n" + b"x-big: " + b"a" * 7000 + b"\r\n"
    huge += b"x-more: " + b"b" * 7000 + b"\r\nx-last: " + b"c" * 7000 + b"\r\n"  # 21 KB, its head never ending
    assert _refused(url, huge).startswith(b"HTTP/1.1 431 ")
    many = b"POST /chat HTTP/1.1\r\nhost: x\r\n" + b"".join(b"x-%d: 1\r\n" % i for i in range(101)) + b"\r\n"
    assert _refused(url, many).startswith(b"HTTP/1.1 431 ")
    assert _refused(url, b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    lines = service_with_metrics.access_lines(at_least=3)
    assert sorted(line["error"] for line in lines) == ["headers_too_large", "headers_too_large", "invalid_request"]
    samples = scrape(url)
    assert by(samples, REFUSED, "reason") == {("headers_too_large",): 2, ("invalid_request",): 1}
    assert by(samples, REQUESTS, *HTTP) == {
        ("_OTHER", "other", "431"): 1,  # refused while its head was arriving: no method or path yet
        ("POST", "/chat", "431"): 1,  # a complete head with too many headers
        ("_OTHER", "other", "400"): 1,
        # the scrape itself is counted once it has answered
    }
    assert by(scrape(url), REQUESTS, *HTTP)[("GET", "/metrics", "200")] == 1
