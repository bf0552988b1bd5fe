"""`groq_proxy_quota_remaining{key, limit}`: each client's quota left, as the x-ratelimit-* headers show it."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import CLIENT_TOKEN, Service, groq_env
from fake_groq import FakeGroq
from redis_server import RedisServer
from test_keys import BATCH_TOKEN, GOOD, OPS_TOKEN, keys_file
from test_metrics import AUTH, KEY_ID, _directory_of, _workers, by, requests, scrape, wait_for
from test_quota import PROMPT, reserved, usage_tokens

GAUGE = "groq_proxy_quota_remaining"
LABELS = ("key", "limit")
TPM = 10_000


def remaining(service: Service) -> dict[tuple[str, ...], float]:
    return by(scrape(service.url), GAUGE, *LABELS)


def chat_lines(service: Service, count: int) -> list[dict[str, Any]]:
    """The access lines of /chat, once `count` are written: each is written after its request's settlement."""
    lines = wait_for(
        lambda: (
            (found := [x for x in service.access_lines() if x["path"] == "/chat"]) and len(found) >= count and found
        ),
        f"{count} access lines",
    )
    assert len(lines) == count
    return list(lines)


def test_the_gauges_follow_the_headers_at_admission_settlement_and_refusal(fake: FakeGroq, start_service: Any) -> None:
    env = groq_env(
        fake,
        METRICS="true",
        SERVICE_API_KEYS=CLIENT_TOKEN,
        QUOTA_REQUESTS_PER_MINUTE="5",
        QUOTA_TOKENS_PER_MINUTE=str(TPM),
    )
    service = start_service(env, quota_minute=600)  # a long minute: the request count cannot tick back up
    assert remaining(service) == {}  # nothing reported before a Groq-calling request
    charged = 0
    for sent in range(1, 5):
        answer = service.client.post("/chat", json=PROMPT, headers=AUTH)
        assert answer.status_code == 200
        line = chat_lines(service, sent)[-1]
        assert line["charged_tokens"] == usage_tokens(fake) != reserved(PROMPT)  # the settlement changed the count
        charged += line["charged_tokens"]
        tokens = int(answer.headers["x-ratelimit-remaining-tokens"])
        assert tokens == TPM - (charged - line["charged_tokens"]) - reserved(PROMPT)  # the reservation, at admission
        assert answer.headers["x-ratelimit-remaining-requests"] == str(5 - sent)
        assert remaining(service) == {
            (KEY_ID, "requests_per_minute"): 5 - sent,
            (KEY_ID, "tokens_per_minute"): tokens
            + reserved(PROMPT)
            - line["charged_tokens"],  # settled to Groq's usage
        }

    invalid = service.client.post("/chat", json={"prompt": ""}, headers=AUTH)  # reserves nothing: peeked headers
    assert invalid.status_code == 422
    assert int(invalid.headers["x-ratelimit-remaining-tokens"]) == TPM - charged
    assert remaining(service) == {
        (KEY_ID, "requests_per_minute"): 1,
        (KEY_ID, "tokens_per_minute"): TPM - charged,
    }

    assert service.client.post("/chat", json=PROMPT, headers=AUTH).status_code == 200
    charged += chat_lines(service, 6)[-1]["charged_tokens"]
    refused = service.client.post("/chat", json=PROMPT, headers=AUTH)
    assert refused.status_code == 429
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(refused.headers["x-ratelimit-remaining-tokens"]) == TPM - charged
    assert remaining(service) == {
        (KEY_ID, "requests_per_minute"): 0,
        (KEY_ID, "tokens_per_minute"): TPM - charged,
    }


def test_an_overloaded_request_reserves_nothing(fake: FakeGroq, start_service: Any) -> None:
    """With the one slot held, a second request is refused 503 overloaded before its admission (issue 22)."""
    fake.default.hold = threading.Event()
    env = groq_env(
        fake, METRICS="true", MAX_CONCURRENCY="1", QUOTA_REQUESTS_PER_MINUTE="5", QUOTA_TOKENS_PER_DAY="50000"
    )
    service = start_service(env, quota_minute=600)  # loopback mode: one client, `local`
    first: list[httpx.Response] = []
    holder = threading.Thread(target=lambda: first.append(httpx.post(service.url + "/chat", json=PROMPT, timeout=30)))
    holder.start()
    wait_for(lambda: fake.chat_requests(), "the held request at the fake")
    overloaded = service.client.post("/chat", json=PROMPT)
    assert overloaded.status_code == 503
    assert overloaded.headers["x-ratelimit-remaining-requests"] == "4"  # the held request's reservation only
    chat_lines(service, 1)
    held = {("local", "requests_per_minute"): 4, ("local", "tokens_per_day"): 50000 - reserved(PROMPT)}
    assert remaining(service) == held
    fake.default.hold.set()
    holder.join(30)
    assert first[0].status_code == 200
    chat_lines(service, 2)
    assert remaining(service) == {**held, ("local", "tokens_per_day"): 50000 - usage_tokens(fake)}


def test_a_request_refunded_by_the_service_is_reported_back(start_service: Any) -> None:
    """Without GROQ_API_KEY, a model list is admitted, then answers 503 not_configured and is refunded in full."""
    service = start_service({"METRICS": "true", "QUOTA_REQUESTS_PER_MINUTE": "5"}, quota_minute=600)
    answer = service.client.get("/v1/models")
    assert (answer.status_code, answer.headers["x-ratelimit-remaining-requests"]) == (503, "4")  # as admitted
    assert wait_for(lambda: remaining(service) == {("local", "requests_per_minute"): 5}, "the refund reported")


def test_configured_names_label_the_clients_and_their_own_limits(
    fake: FakeGroq, start_service: Any, tmp_path: Path
) -> None:
    """Clients of SERVICE_KEYS_FILE by name; `ops` has its own requests_per_minute (2), `batch` the default (5)."""
    env = groq_env(fake, METRICS="true", SERVICE_KEYS_FILE=keys_file(tmp_path, GOOD), QUOTA_REQUESTS_PER_MINUTE="5")
    service = start_service(env, quota_minute=600)
    for token in (OPS_TOKEN, BATCH_TOKEN, BATCH_TOKEN):
        assert (
            service.client.post("/chat", json=PROMPT, headers={"authorization": f"Bearer {token}"}).status_code == 200
        )
    chat_lines(service, 3)
    assert remaining(service) == {("ops", "requests_per_minute"): 1, ("batch", "requests_per_minute"): 3}


def test_no_quota_no_series(fake: FakeGroq, start_service: Any) -> None:
    service = start_service(groq_env(fake, METRICS="true", SERVICE_API_KEYS=CLIENT_TOKEN))
    assert service.client.post("/chat", json=PROMPT, headers=AUTH).status_code == 200
    chat_lines(service, 1)
    samples = scrape(service.url)
    assert GAUGE not in samples and "http_server_request_duration_seconds_count" in samples


@pytest.mark.slow
def test_every_worker_shows_the_latest_figure_of_the_shared_quota(
    fake: FakeGroq,
    start_process: Any,
    redis_server: RedisServer,
) -> None:
    tpd = 1_000_000
    env = groq_env(
        fake,
        METRICS="true",
        WORKERS="2",
        REDIS_URL=redis_server.url,
        SERVICE_API_KEYS=CLIENT_TOKEN,
        QUOTA_TOKENS_PER_MINUTE=str(TPM * 10),
        QUOTA_TOKENS_PER_DAY=str(tpd),
    )
    proc = start_process(env)
    pid = proc.proc.pid
    workers = wait_for(lambda: len(_workers(pid)) == 2 and _workers(pid), "two workers")
    directory = _directory_of(workers[0])
    sent = 0
    while sent < 4 or not all((directory / f"histogram_{w}.db").exists() for w in workers):  # both answered
        assert sent < 200, "one worker answered every request"
        headers = {**AUTH, "connection": "close"}
        answer = httpx.post(proc.url + "/chat", json={"prompt": "Say hello", "max_tokens": 50}, headers=headers)
        assert answer.status_code == 200
        sent += 1
        wait_for(lambda n=sent: len(requests(proc)) == n, "the access line")  # settled: the next one comes after
    charged = sum(line["charged_tokens"] for line in requests(proc))
    last = requests(proc)[-1]
    assert int(answer.headers["x-ratelimit-remaining-tokens"]) == TPM * 10 - (charged - last["charged_tokens"]) - (
        reserved({"prompt": "Say hello", "max_tokens": 50})
    )
    expected = {(KEY_ID, "tokens_per_minute"): TPM * 10 - charged, (KEY_ID, "tokens_per_day"): tpd - charged}
    for _ in range(6):
        assert by(scrape(proc.url, {"connection": "close"}), GAUGE, *LABELS) == expected
    assert proc.stop() == 0
