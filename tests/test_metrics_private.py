"""Who may read `/metrics`: only the scraper's METRICS_TOKEN (or, unset, a loopback peer), never a client token;
and that token opens nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import CLIENT_TOKEN, Service, groq_env
from fake_groq import FakeGroq
from test_chat import assert_error
from test_config_closed import _fails
from test_keys import OPS_TOKEN, digest, keys_file
from test_metrics import AUTH, MODEL, SCRAPER, SCRAPER_TOKEN, by, scrape

from config import SettingsError, load_settings

WITH_TOKEN = {"METRICS": "true", "METRICS_TOKEN": SCRAPER_TOKEN, "SERVICE_API_KEYS": CLIENT_TOKEN}
PROMPT = {"prompt": "Say hello"}
MESSAGES = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize("path", ["/metrics%0A", "/metrics%0a", "/metrics%00", "/chat%0A"])
def test_a_path_with_an_encoded_control_character_is_no_route(fake: FakeGroq, start_service: Any, path: str) -> None:
    """uvicorn decodes %0A to a newline, and Starlette's `^/metrics$` matches "/metrics\\n" too: a client token read
    every client's usage there, and "/chat\\n" reached /chat past the quota, which compares paths exactly."""
    service: Service = start_service(groq_env(fake, QUOTA_REQUESTS_PER_MINUTE="1", **WITH_TOKEN))
    for headers in (AUTH, SCRAPER):
        assert_error(
            service.client.request("POST" if "chat" in path else "GET", path, headers=headers), 404, "not_found"
        )
    assert fake.received == []  # nothing reached Groq


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (SCRAPER, 200),
        (AUTH, 401),  # a client token: it must not read the other clients' usage
        ({}, 401),  # a loopback peer is not enough once the token is set
        ({"authorization": f"Basic {SCRAPER_TOKEN}"}, 401),
        ({"authorization": f"Bearer {SCRAPER_TOKEN[:-1]}"}, 401),
        ({"authorization": f"Bearer {SCRAPER_TOKEN}x"}, 401),
        ({"authorization": f"bearer  {SCRAPER_TOKEN}"}, 200),  # the scheme in any case, as for client tokens
    ],
)
def test_with_metrics_token_only_the_scraper_reads_metrics(
    fake: FakeGroq, start_service: Any, headers: dict[str, str], status: int
) -> None:
    service: Service = start_service(groq_env(fake, **WITH_TOKEN))
    response = service.client.get("/metrics", headers=headers)
    if status == 200:
        assert response.status_code == 200 and "groq_proxy_max_concurrency" in response.text
    else:
        assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
        assert "METRICS_TOKEN" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/chat", PROMPT),
        ("POST", "/v1/chat/completions", MESSAGES),
        ("POST", "/openai/v1/chat/completions", MESSAGES),
        ("GET", "/v1/models", None),
        ("GET", "/openai/v1/models", None),
        ("GET", "/", None),
        ("GET", "/healthz", None),
        ("GET", "/readyz", None),
        ("GET", "/nowhere", None),
    ],
)
def test_the_metrics_token_opens_no_other_route(
    fake: FakeGroq, start_service: Any, method: str, path: str, body: dict[str, Any] | None
) -> None:
    service: Service = start_service(groq_env(fake, **WITH_TOKEN))
    refused = service.client.request(method, path, json=body, headers=SCRAPER)
    assert (refused.status_code, refused.json()["error"]["type"]) == (401, "unauthorized")
    assert fake.received == []  # it can never spend the Groq key
    expected = 404 if path == "/nowhere" else 200
    assert service.client.request(method, path, json=body, headers=AUTH).status_code == expected


def test_keys_file_clients_cannot_read_metrics(fake: FakeGroq, start_service: Any, tmp_path: Path) -> None:
    named = keys_file(tmp_path, f'[[keys]]\nname = "ops"\nsha256 = "{digest(OPS_TOKEN)}"\n')
    env = groq_env(fake, METRICS="true", METRICS_TOKEN=SCRAPER_TOKEN, SERVICE_KEYS_FILE=named)
    service: Service = start_service(env)
    ops = {"authorization": f"Bearer {OPS_TOKEN}"}
    assert service.client.post("/chat", json=PROMPT, headers=ops).status_code == 200
    assert_error(service.client.get("/metrics", headers=ops), 401, "unauthorized")
    tokens = by(
        scrape(service.url, SCRAPER), "groq_proxy_tokens_total", "key", "gen_ai_token_type", "gen_ai_response_model"
    )
    assert {key for key, _, _ in tokens} == {"ops"}


@pytest.mark.parametrize(
    ("env", "headers", "status"),
    [
        ({}, {}, 200),  # a loopback peer, tokens configured for the other routes
        ({}, AUTH, 200),  # the peer decides; the client's token plays no part
        ({}, {"x-forwarded-for": "127.0.0.1"}, 401),  # relayed by a proxy: someone else's request
        ({}, {"x-real-ip": "127.0.0.1"}, 401),
        ({}, {"forwarded": "for=127.0.0.1"}, 401),
        ({"FORWARDED_ALLOW_IPS": "127.0.0.1"}, {**AUTH, "x-forwarded-for": "203.0.113.9"}, 401),  # nor a token
        ({}, {"host": "rebound.example"}, 401),  # a web page on a name that resolves here (DNS rebinding)
        ({"ALLOWED_HOSTS": "rebound.example"}, {"host": "rebound.example"}, 200),
        ({}, {"host": "[::1]:8000"}, 200),
    ],
)
def test_without_metrics_token_only_loopback_peers_read_metrics(
    fake: FakeGroq, start_service: Any, env: dict[str, str], headers: dict[str, str], status: int
) -> None:
    service: Service = start_service(groq_env(fake, METRICS="true", SERVICE_API_KEYS=CLIENT_TOKEN, **env))
    response = service.client.get("/metrics", headers=headers)
    if status == 200:
        assert response.status_code == 200 and "groq_proxy_max_concurrency" in response.text
    else:
        assert_error(response, 401, "unauthorized")
        assert "METRICS_TOKEN" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"METRICS_TOKEN": "short_token_1"}, "METRICS_TOKEN must be at least 16 characters"),
        ({"METRICS_TOKEN": SCRAPER_TOKEN + "\n"}, "METRICS_TOKEN must be printable ASCII"),
        ({"METRICS_TOKEN": "two words token 0123"}, "METRICS_TOKEN must be printable ASCII"),
        ({"METRICS_TOKEN": CLIENT_TOKEN}, "METRICS_TOKEN must differ from every client token"),
        ({"METRICS_TOKEN": SCRAPER_TOKEN, "METRICS": "false"}, "METRICS_TOKEN is set but METRICS is not true"),
    ],
)
def test_a_bad_metrics_token_fails_at_start_up(env: dict[str, str], message: str) -> None:
    environ = {"METRICS": "true", "SERVICE_API_KEYS": f"other_client_token_0123,{CLIENT_TOKEN}", **env}
    with pytest.raises(SettingsError) as raised:
        load_settings(environ)
    assert str(raised.value).startswith(message)
    assert environ["METRICS_TOKEN"].strip() not in str(raised.value)


def test_the_metrics_token_may_not_be_a_keys_file_token(tmp_path: Path) -> None:
    named = keys_file(tmp_path, f'[[keys]]\nname = "ops"\nsha256 = "{digest(OPS_TOKEN)}"\n')
    with pytest.raises(SettingsError, match=r"^METRICS_TOKEN must differ from every client token"):
        load_settings({"METRICS": "true", "METRICS_TOKEN": OPS_TOKEN, "SERVICE_KEYS_FILE": named})


def test_a_short_metrics_token_stops_the_process_in_one_line(start_process: Any) -> None:
    line = _fails(start_process, {"METRICS": "true", "METRICS_TOKEN": "tok_short_1"})
    assert line["msg"].startswith("configuration error: METRICS_TOKEN must be at least 16 characters")
