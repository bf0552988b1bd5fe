"""Quota bookkeeping that must not be fooled: what a request reserves, what Groq's usage may settle, Redis replies."""

from __future__ import annotations

import json
import math
import threading
from typing import Any

import httpx
import pytest
from conftest import groq_env
from fake_groq import Behaviour, FakeGroq
from redis_server import RedisServer
from test_quota import PROMPT, reserved, wait_for

SDK_BODY = {"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


def completion_with_usage(prompt_tokens: object) -> bytes:
    """A 200 chat completion from Groq whose usage holds `prompt_tokens` as given."""
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "openai/gpt-oss-20b",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 5, "total_tokens": 5},
        }
    ).encode()


def test_chat_reserves_its_max_completion_tokens(fake: FakeGroq, start_service: Any) -> None:
    fake.default.usage = False  # the reservation stands, so the headers show what was reserved
    service = start_service(groq_env(fake, QUOTA_TOKENS_PER_MINUTE="10000"))
    body = {"prompt": "hi", "max_completion_tokens": 5000}
    answer = service.client.post("/chat", json=body)
    assert answer.status_code == 200
    assert answer.headers["x-ratelimit-remaining-tokens"] == str(10000 - reserved(body))  # not the 1024 default
    assert service.access_lines(1)[0]["charged_tokens"] == reserved(body)


def test_the_whole_body_is_the_prompt_estimate_tools_included(fake: FakeGroq, start_service: Any) -> None:
    service = start_service(groq_env(fake, QUOTA_TOKENS_PER_MINUTE="5000"))
    tool = {"type": "function", "function": {"name": "lookup", "description": "x" * 40_000, "parameters": {}}}
    raw = json.dumps({**SDK_BODY, "tools": [tool]}).encode()  # the bytes exactly as sent
    refused = service.client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert refused.status_code == 429
    cost = math.ceil(len(raw) / 4) + 10
    assert refused.json()["error"]["message"] == (
        f"This request reserves {cost} tokens, more than this client's whole quota of 5000 tokens per minute; "
        "send a shorter prompt or a lower max_tokens."
    )
    assert fake.chat_requests() == []


@pytest.mark.parametrize("prompt_tokens", [-1_000_000, True, 10_000_000, 10**19])
@pytest.mark.parametrize("path", ["/chat", "/v1/chat/completions"])
def test_unbelievable_usage_from_groq_leaves_the_reservation(
    fake: FakeGroq, start_service: Any, prompt_tokens: object, path: str
) -> None:
    fake.default = Behaviour(raw_body=completion_with_usage(prompt_tokens))
    service = start_service(groq_env(fake, QUOTA_TOKENS_PER_MINUTE="10000"))
    body = PROMPT if path == "/chat" else SDK_BODY
    answer = service.client.post(path, json=body)
    assert answer.status_code == 200
    if path == "/chat" and prompt_tokens == -1_000_000:
        assert answer.json()["usage"] is None  # not reported to the client either
    assert service.access_lines(1)[0]["charged_tokens"] == reserved(body)
    after = service.client.post("/chat", json={})
    assert after.headers["x-ratelimit-remaining-tokens"] == str(10000 - reserved(body))


def test_believable_usage_at_the_cap_settles(fake: FakeGroq, start_service: Any) -> None:
    fake.default = Behaviour(raw_body=completion_with_usage(9_999_999))
    service = start_service(groq_env(fake, QUOTA_TOKENS_PER_DAY="20000000"))
    assert service.client.post("/v1/chat/completions", json=SDK_BODY).status_code == 200
    assert service.access_lines(1)[0]["charged_tokens"] == 9_999_999 + 5


def test_redis_url_without_a_quota_is_a_warning_and_redis_is_not_used(fake: FakeGroq, start_service: Any) -> None:
    service = start_service(groq_env(fake, REDIS_URL="redis://127.0.0.1:1/0"))  # nothing listens there
    answer = service.client.post("/chat", json=PROMPT)
    assert answer.status_code == 200
    assert answer.headers.get_list("x-ratelimit-limit-requests") == ["14400"]  # Groq's own, as with no quota
    warnings = [line["msg"] for line in service.log_lines() if line["level"] == "WARNING"]
    assert "REDIS_URL is set but no quota is; Redis is not used" in warnings


@pytest.mark.parametrize("prompt_tokens", [-1_000_000, 10**19])
def test_redis_keeps_the_reservation_for_unbelievable_usage(
    fake: FakeGroq, start_service: Any, redis_server: RedisServer, prompt_tokens: int
) -> None:
    fake.default = Behaviour(raw_body=completion_with_usage(prompt_tokens))
    env = groq_env(fake, REDIS_URL=redis_server.url, QUOTA_TOKENS_PER_MINUTE="10000", QUOTA_TOKENS_PER_DAY="90000")
    service = start_service(env)
    assert service.client.post("/v1/chat/completions", json=SDK_BODY).status_code == 200
    assert service.access_lines(1)[0]["charged_tokens"] == reserved(SDK_BODY)
    after = service.client.post("/chat", json={})
    assert after.headers["x-ratelimit-remaining-tokens"] == str(10000 - reserved(SDK_BODY))
    assert not [line for line in service.log_lines() if line["msg"].startswith("Redis is unreachable")]


def seed_day(redis_server: RedisServer, used: str) -> None:
    """Today's tokens-per-day count for the client `local`, written as another replica's script could leave it."""
    seconds, micros = redis_server.client().time()
    day = (seconds * 1_000_000 + micros) // 86_400_000_000
    redis_server.client().hset("quota:{local}:d", mapping={"day": str(day), "used": used})


def test_redis_counts_past_1e14_are_read_as_whole_numbers(
    fake: FakeGroq, start_service: Any, redis_server: RedisServer
) -> None:
    seed_day(redis_server, str(10**15))
    service = start_service(groq_env(fake, REDIS_URL=redis_server.url, QUOTA_TOKENS_PER_DAY=str(10**12)))
    refused = service.client.post("/chat", json=PROMPT)
    assert refused.status_code == 429
    assert refused.json()["error"]["message"].startswith(
        "This client is over its quota of 1000000000000 tokens per day"
    )
    assert (refused.headers["x-ratelimit-limit-tokens"], refused.headers["x-ratelimit-remaining-tokens"]) == (
        str(10**12),
        "0",
    )
    assert fake.chat_requests() == []


def test_a_redis_reply_that_cannot_be_read_takes_the_fail_mode(
    fake: FakeGroq, start_service: Any, redis_server: RedisServer
) -> None:
    seed_day(redis_server, "inf")  # the script then answers `inf`, which is no whole number
    service = start_service(groq_env(fake, REDIS_URL=redis_server.url, QUOTA_TOKENS_PER_DAY="1000"))
    refused = service.client.post("/chat", json=PROMPT)
    assert refused.status_code == 503
    assert refused.json()["error"]["type"] == "quota_unavailable"
    warnings = [line["msg"] for line in service.log_lines() if line["msg"].startswith("Redis is unreachable")]
    assert warnings == [
        "Redis is unreachable (ValueError): Groq-calling routes answer 503 quota_unavailable until it is back"
    ]
    assert fake.chat_requests() == []


def test_charged_tokens_is_what_redis_booked(fake: FakeGroq, start_service: Any, redis_server: RedisServer) -> None:
    fake.default.hold = threading.Event()
    service = start_service(groq_env(fake, REDIS_URL=redis_server.url, QUOTA_TOKENS_PER_MINUTE="10000"))
    answers: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: answers.append(httpx.post(service.url + "/chat", json=PROMPT, timeout=30)))
    thread.start()
    assert wait_for(lambda: len(fake.chat_requests()) == 1)  # admitted: the reservation is booked in Redis
    redis_server.stop()  # so the settlement to Groq's usage cannot be booked
    fake.default.hold.set()
    thread.join(30)
    assert answers[0].status_code == 200 and answers[0].json()["usage"]["total_tokens"] != reserved(PROMPT)
    assert service.access_lines(1)[0]["charged_tokens"] == reserved(PROMPT)  # the reservation stands
