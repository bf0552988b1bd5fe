"""Who may call, over real sockets: proxy headers never make a loopback peer, Host and Origin checks without
tokens (DNS rebinding), ALLOWED_HOSTS, no slash redirect, and request ids echoed as sent."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from conftest import CLIENT_TOKEN, Service, groq_env
from fake_groq import API_KEY, FakeGroq
from test_chat import PROMPT

LOOPBACK_ONLY = (
    "Only loopback clients may call this service: set SERVICE_API_KEYS (or SERVICE_KEYS_FILE) to serve"
    " non-loopback clients."
)
BAD_HOST = (
    "The Host header must be localhost, 127.0.0.1 or [::1] (any port), or a host in ALLOWED_HOSTS: this service"
    " refuses requests addressed to other names, such as a web page's domain that resolves here. The operator can"
    " add a name to ALLOWED_HOSTS."
)
BAD_ORIGIN = (
    "Requests from web pages on other origins are refused while the service answers loopback clients only;"
    " the operator can allow an origin in CORS_ORIGINS."
)
TOKEN = {"authorization": f"Bearer {CLIENT_TOKEN}"}


def _envelope(response: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == error_type and error["request_id"] == response.headers["x-request-id"]
    assert set(error) <= {"type", "message", "request_id", "code"}  # `code` on the SDK routes
    return error


def _refused(service: Service, response: httpx.Response, status: int, error_type: str, message: str) -> None:
    """The envelope with its id, and the one access line saying why."""
    assert _envelope(response, status, error_type)["message"] == message
    deadline = time.monotonic() + 5  # the line is written just after the response
    while not (lines := [x for x in service.access_lines() if x["request_id"] == response.headers["x-request-id"]]):
        assert time.monotonic() < deadline, "no access line"
        time.sleep(0.01)
    [line] = lines
    assert line["status"] == status and line["error"] == error_type


@pytest.mark.parametrize(
    "headers",
    [
        {"x-forwarded-for": "127.0.0.1"},
        {"x-forwarded-for": "::1"},
        {"x-real-ip": "127.0.0.1"},
        {"forwarded": "for=127.0.0.1"},
        {"X-Forwarded-For": ""},
    ],
)
def test_a_relayed_request_is_never_loopback_without_tokens(
    service: Service, fake: FakeGroq, headers: dict[str, str]
) -> None:
    response = service.client.post("/chat", json=PROMPT, headers=headers)
    _refused(service, response, 401, "unauthorized", LOOPBACK_ONLY)
    assert fake.received == []
    assert service.client.get("/healthz", headers=headers).status_code == 200  # open paths stay open
    assert service.client.post("/chat", json=PROMPT).status_code == 200  # the same peer, not relayed


def test_a_proxy_on_the_same_box_does_not_make_its_clients_loopback(fake: FakeGroq, start_service: Any) -> None:
    service = start_service(groq_env(fake, FORWARDED_ALLOW_IPS="127.0.0.1"))
    response = service.client.post("/chat", json=PROMPT, headers={"x-forwarded-for": "127.0.0.1"})
    _refused(service, response, 401, "unauthorized", LOOPBACK_ONLY)
    assert fake.received == []


def test_with_tokens_a_relayed_request_with_a_token_is_served(fake: FakeGroq, start_service: Any) -> None:
    service = start_service(groq_env(fake, SERVICE_API_KEYS=CLIENT_TOKEN, FORWARDED_ALLOW_IPS="*"))
    response = service.client.post("/chat", json=PROMPT, headers={**TOKEN, "x-forwarded-for": "203.0.113.9"})
    assert response.status_code == 200
    assert service.access_lines(1)[0]["client"].startswith("203.0.113.9:")


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/chat/"), ("GET", "/healthz/"), ("GET", "/v1/models/"), ("POST", "/v1/chat/completions/")],
)
def test_a_trailing_slash_is_404_never_a_redirect(service: Service, method: str, path: str) -> None:
    response = service.client.request(method, path, json=PROMPT, headers={"host": "127.0.0.1:1"})
    _envelope(response, 404, "not_found")
    assert "location" not in response.headers


def test_without_tokens_loopback_hosts_are_served(service: Service) -> None:
    for host in ("localhost", "localhost:8000", "LocalHost:1", "127.0.0.1", "127.0.0.2:80", "[::1]", "[::1]:80"):
        assert service.client.post("/chat", json=PROMPT, headers={"host": host}).status_code == 200, host
        assert service.client.get("/healthz", headers={"host": host}).status_code == 200, host


@pytest.mark.parametrize(
    "host",
    [
        "rebind.attacker.example:8000",
        "localhost.attacker.example",
        "127.0.0.1.nip.io",
        "10.0.0.5:8000",
        "[::2]",
        "localhost:80:80",
        "",
    ],
)
def test_without_tokens_any_other_host_is_refused(service: Service, fake: FakeGroq, host: str) -> None:
    """Every path: a page on a rebinding domain could otherwise read /healthz's default model and /readyz."""
    for path in ("/chat", "/healthz", "/", "/readyz", "/v1/models"):
        method = "POST" if path == "/chat" else "GET"
        response = service.client.request(method, path, json=PROMPT, headers={"host": host})
        _refused(service, response, 400, "invalid_request", BAD_HOST)
    assert fake.received == []


def test_allowed_hosts_adds_names_without_tokens(fake: FakeGroq, start_service: Any) -> None:
    service = start_service(groq_env(fake, ALLOWED_HOSTS="api.example.com, *.corp.example"))
    for host in ("api.example.com", "API.example.com:8443", "a.corp.example", "b.a.corp.example:1", "localhost"):
        assert service.client.post("/chat", json=PROMPT, headers={"host": host}).status_code == 200, host
    for host in ("corp.example", "example.com", "api.example.com.evil"):
        _refused(service, service.client.get("/healthz", headers={"host": host}), 400, "invalid_request", BAD_HOST)


def test_with_tokens_the_host_is_checked_only_when_allowed_hosts_is_set(fake: FakeGroq, start_service: Any) -> None:
    open_hosts = start_service(groq_env(fake, SERVICE_API_KEYS=CLIENT_TOKEN))
    assert open_hosts.client.post("/chat", json=PROMPT, headers={**TOKEN, "host": "proxy.example"}).status_code == 200
    named = start_service(groq_env(fake, SERVICE_API_KEYS=CLIENT_TOKEN, ALLOWED_HOSTS="proxy.example"))
    assert named.client.post("/chat", json=PROMPT, headers={**TOKEN, "host": "proxy.example:443"}).status_code == 200
    assert named.client.get("/healthz", headers={"host": "localhost:8000"}).status_code == 200
    response = named.client.post("/chat", json=PROMPT, headers={**TOKEN, "host": "other.example"})
    _refused(named, response, 400, "invalid_request", BAD_HOST)


def test_without_tokens_loopback_origins_are_served(service: Service) -> None:
    for origin in ("http://localhost:3000", "http://127.0.0.1:5173", "https://[::1]", "HTTP://LOCALHOST"):
        assert service.client.post("/chat", json=PROMPT, headers={"origin": origin}).status_code == 200, origin


def test_without_tokens_a_foreign_origin_is_refused(service: Service, fake: FakeGroq) -> None:
    for origin in (
        "https://evil.example",
        "null",
        "http://localhost.evil.example",
        "http://localhost:3000/x",
        "file://",
    ):
        response = service.client.post("/chat", json=PROMPT, headers={"origin": origin})
        _refused(service, response, 400, "invalid_request", BAD_ORIGIN)
    assert fake.received == []


def test_an_origin_in_cors_origins_is_served_without_tokens(fake: FakeGroq, start_service: Any) -> None:
    service = start_service(groq_env(fake, CORS_ORIGINS="https://app.example"))
    response = service.client.post("/chat", json=PROMPT, headers={"origin": "https://app.example"})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    refused = service.client.post("/chat", json=PROMPT, headers={"origin": "https://other.example"})
    _refused(service, refused, 400, "invalid_request", BAD_ORIGIN)


def test_with_tokens_the_origin_is_left_to_cors(fake: FakeGroq, start_service: Any) -> None:
    service = start_service(groq_env(fake, SERVICE_API_KEYS=CLIENT_TOKEN))
    response = service.client.post("/chat", json=PROMPT, headers={**TOKEN, "origin": "https://evil.example"})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


@pytest.mark.parametrize("request_id", [API_KEY, CLIENT_TOKEN, "plain-id-1"])
def test_a_well_formed_request_id_is_echoed_even_when_it_equals_a_secret(
    fake: FakeGroq, start_service: Any, request_id: str
) -> None:
    service = start_service(groq_env(fake, SERVICE_API_KEYS=CLIENT_TOKEN))
    healthz = service.client.get("/healthz", headers={"x-request-id": request_id})
    assert healthz.headers["x-request-id"] == request_id
    refused = service.client.post("/chat", json=PROMPT, headers={"x-request-id": request_id})
    assert refused.headers["x-request-id"] == request_id
    assert json.loads(refused.text)["error"]["request_id"] == request_id
    lines = service.access_lines(2)
    masked = "[redacted]" if request_id in (API_KEY, CLIENT_TOKEN) else request_id
    assert [line["request_id"] for line in lines] == [masked, masked]
    assert API_KEY not in service.log_text() and CLIENT_TOKEN not in service.log_text()
