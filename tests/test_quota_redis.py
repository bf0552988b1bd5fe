"""Quotas shared through a real Redis: atomic admission across processes and workers, fail modes, recovery."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from conftest import Service, groq_env
from fake_groq import API_KEY, Behaviour, FakeGroq
from redis_server import RedisServer
from test_quota import PROMPT, concurrent_posts, reserved, usage_tokens, wait_for


def redis_env(fake: FakeGroq, redis: RedisServer, **overrides: str) -> dict[str, str]:
    return groq_env(fake, REDIS_URL=redis.url, **overrides)


def warnings(service: Service, start: str) -> list[str]:
    return [line["msg"] for line in service.log_lines() if line["msg"].startswith(start)]


def test_gcra_in_redis_burst_wait_and_one_hash_tag(
    fake: FakeGroq, start_service: Any, redis_server: RedisServer
) -> None:
    service = start_service(redis_env(fake, redis_server, QUOTA_REQUESTS_PER_MINUTE="3"), quota_minute=1.5)
    answers = [service.client.post("/chat", json=PROMPT) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["2", "1", "0", "0"]
    assert answers[3].headers["retry-after"] == "1"
    assert service.access_lines(4)[3]["quota"] == "requests_per_minute"
    time.sleep(float(answers[3].headers["retry-after"]))  # the real window passes, as a client would wait
    assert service.client.post("/chat", json=PROMPT).status_code == 200
    assert redis_server.client().keys() == [b"quota:{local}:r"]  # only the limit that is set; one hash tag


def test_concurrent_requests_meet_one_atomic_budget_in_redis(
    fake: FakeGroq, start_service: Any, redis_server: RedisServer
) -> None:
    fake.default.hold = threading.Event()  # all are admitted before any settles
    budget = 2 * reserved(PROMPT) + 50
    service = start_service(redis_env(fake, redis_server, QUOTA_TOKENS_PER_MINUTE=str(budget)))
    answers = concurrent_posts(service.url, "/chat", [PROMPT] * 6, held=fake)
    assert sorted(a.status_code for a in answers) == [200, 200, 429, 429, 429, 429]
    assert len(fake.chat_requests()) == 2
    assert 58 <= int(next(a for a in answers if a.status_code == 429).headers["retry-after"]) <= 60


def test_redis_settles_plain_calls_streams_and_disconnects(
    fake: FakeGroq, start_service: Any, redis_server: RedisServer
) -> None:
    fake.behaviours["slow/stream"] = Behaviour(chunks=200, chunk_delay=0.05)
    env = redis_env(fake, redis_server, QUOTA_TOKENS_PER_DAY="100000", QUOTA_TOKENS_PER_MINUTE="50000")
    service = start_service(env)
    answer = service.client.post("/chat", json={"prompt": "hi", "max_tokens": 5000})
    assert answer.headers["x-ratelimit-remaining-tokens"] == str(50000 - reserved({"prompt": "hi", "max_tokens": 5000}))
    used = usage_tokens(fake)
    body = {"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with service.client.stream("POST", "/v1/chat/completions", json=body) as stream:
        chunks = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
    assert all(chunk["choices"] for chunk in chunks)
    used += chunks[-1]["usage"]["total_tokens"]
    slow = {"prompt": "hi", "model": "slow/stream", "stream": True}
    with service.client.stream("POST", "/chat", json=slow) as cut:
        next(cut.iter_lines())
    assert fake.stream_ended.wait(5)
    lines = service.access_lines(3)
    assert lines[2]["charged_tokens"] == reserved(slow)  # no usage arrived: the reservation stands
    used += reserved(slow)
    assert sum(line["charged_tokens"] for line in lines) == used
    after = service.client.post("/chat", json={})
    assert after.headers["x-ratelimit-remaining-tokens"] == str(50000 - used)
    stats = redis_server.client().info("commandstats")
    sha, load = stats["cmdstat_evalsha"], stats["cmdstat_script|load"]
    assert sha["failed_calls"] == load["calls"] == 2  # NOSCRIPT once per script: register_script loads it
    # 3 admissions and the 422's look-up; 2 settlements (the cut stream's reservation stands, so none for it)
    assert sha["calls"] - sha["failed_calls"] == 6


def test_two_processes_and_two_workers_hold_one_limit(
    fake: FakeGroq, start_process: Any, redis_server: RedisServer
) -> None:
    env = {
        "GROQ_API_KEY": API_KEY,
        "GROQ_BASE_URL": fake.url,
        "GROQ_MAX_RETRIES": "0",
        "REDIS_URL": redis_server.url,
        "QUOTA_REQUESTS_PER_MINUTE": "5",
    }
    one = start_process(env)
    two = start_process({**env, "WORKERS": "2"})
    answers = concurrent_posts([one.url, two.url], "/chat", [PROMPT] * 12)  # at once, so atomicity is what holds
    assert sorted(a.status_code for a in answers) == [200] * 5 + [429] * 7
    assert len(fake.chat_requests()) == 5


def test_redis_failing_closed_then_recovering(fake: FakeGroq, start_service: Any, redis_server: RedisServer) -> None:
    service = start_service(redis_env(fake, redis_server, QUOTA_REQUESTS_PER_MINUTE="5", REDIS_TIMEOUT="0.25"))
    assert service.client.post("/chat", json=PROMPT).headers["x-ratelimit-remaining-requests"] == "4"
    redis_server.pause()  # hung: connections open, nothing answers
    started = time.monotonic()
    refused = service.client.post("/chat", json=PROMPT)
    assert time.monotonic() - started < 2  # the REDIS_TIMEOUT deadline, not a hang
    assert refused.status_code == 503
    assert refused.json()["error"]["type"] == "quota_unavailable"
    assert not [name for name in refused.headers if name.startswith("x-ratelimit")]
    invalid = service.client.post("/chat", json={})
    assert invalid.status_code == 422 and "x-ratelimit-limit-requests" not in invalid.headers
    assert service.client.get("/readyz").json() == {
        "status": "not_ready",
        "reason": "the quota store (Redis) cannot be reached",
    }
    redis_server.resume()  # whether the refused request's admission had reached it (then it counts) is chance
    resumed = [service.client.post("/chat", json=PROMPT) for _ in range(2)]
    left = [int(answer.headers["x-ratelimit-remaining-requests"]) for answer in resumed]
    assert left[0] in (2, 3) and left[1] == left[0] - 1
    redis_server.stop()  # gone: connections refused
    assert service.client.post("/chat", json=PROMPT).status_code == 503
    assert service.client.get("/readyz").status_code == 503
    redis_server.start()  # back, empty: counting starts again
    answers = [service.client.post("/chat", json=PROMPT) for _ in range(2)]
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["4", "3"]
    assert service.client.get("/readyz").status_code == 200
    assert len(warnings(service, "Redis is unreachable")) == 2  # one per outage, not per request
    assert len(warnings(service, "Redis is reachable again")) == 2
    assert fake.chat_requests() and len(fake.chat_requests()) == 5


def test_redis_failing_open_passes_uncounted(fake: FakeGroq, start_service: Any, redis_server: RedisServer) -> None:
    env = redis_env(fake, redis_server, QUOTA_REQUESTS_PER_MINUTE="5", QUOTA_FAIL_MODE="open")
    service = start_service(env)
    assert service.client.post("/chat", json=PROMPT).headers["x-ratelimit-remaining-requests"] == "4"
    redis_server.stop()
    answers = [service.client.post("/chat", json=PROMPT) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert not [name for a in answers for name in a.headers if name.startswith("x-ratelimit")]
    assert service.client.get("/readyz").status_code == 200
    assert warnings(service, "Redis is unreachable") == [
        "Redis is unreachable (ConnectionError): requests pass uncounted until it is back"
    ]
    redis_server.start()
    assert service.client.post("/chat", json=PROMPT).headers["x-ratelimit-remaining-requests"] == "4"


def test_a_settlement_is_in_redis_before_the_client_sees_the_usage(
    fake: FakeGroq, start_service: Any, redis_server: RedisServer
) -> None:
    """So a client's next request, on any replica, meets it. Read at once, with no wait: after each plain answer,
    and on a stream as soon as Groq's usage chunk arrives, while Groq holds the stream's end for 0.5 s."""
    fake.behaviours["slow/end"] = Behaviour(chunks=3, chunks_per_write=10, chunk_delay=0.5)
    service = start_service(redis_env(fake, redis_server, QUOTA_TOKENS_PER_MINUTE="1000000"))
    store, booked = redis_server.client(), 0

    def used() -> int:
        return sum(int(tokens) for tokens in store.hgetall("quota:{local}:m").values())

    for n in range(5):
        assert service.client.post("/chat", json={"prompt": "hi " * (n + 1), "max_tokens": 500}).status_code == 200
        booked += usage_tokens(fake)
        assert used() == booked
    body = {"model": "slow/end", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    body["stream_options"] = {"include_usage": True}
    with service.client.stream("POST", "/openai/v1/chat/completions", json=body) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:]).get("usage"):
                assert used() == booked + json.loads(line[6:])["usage"]["total_tokens"]
                break
        else:
            raise AssertionError("no usage chunk")


def test_connections_redis_closed_are_replaced_without_a_refusal(
    fake: FakeGroq, start_service: Any, redis_server: RedisServer
) -> None:
    env = redis_env(fake, redis_server, QUOTA_REQUESTS_PER_MINUTE="10", QUOTA_TOKENS_PER_MINUTE="100000")
    service = start_service(env)
    for left in ("9", "8", "7"):
        answer = service.client.post("/chat", json=PROMPT)
        assert answer.status_code == 200 and answer.headers["x-ratelimit-remaining-requests"] == left
        # as an operator's CLIENT KILL, or Redis's idle `timeout`, would; a settlement's reply is still unread
        assert redis_server.client().client_kill_filter(_type="normal", skipme=True) >= 1
    assert service.client.get("/readyz").status_code == 200
    assert not warnings(service, "Redis is unreachable")


def test_connections_to_redis_are_at_most_max_concurrency(
    fake: FakeGroq, start_service: Any, redis_server: RedisServer
) -> None:
    fake.default.hold = threading.Event()
    env = redis_env(fake, redis_server, QUOTA_REQUESTS_PER_MINUTE="100", MAX_CONCURRENCY="2")
    service = start_service(env)
    answers = concurrent_posts(service.url, "/chat", [PROMPT] * 12, held=fake)  # 12 admissions at once
    assert sorted(a.status_code for a in answers) == [200] * 2 + [503] * 10
    assert {a.json()["error"]["type"] for a in answers if a.status_code == 503} == {"overloaded"}  # none waited out
    assert all(a.headers["x-ratelimit-remaining-requests"] for a in answers)
    assert len(redis_server.client().client_list()) - 1 <= 2  # the test's own connection aside
    assert not warnings(service, "Redis is unreachable")


def one_held(fake: FakeGroq, start_service: Any, redis: RedisServer) -> tuple[Service, Callable[[], Any]]:
    """A service with a token quota in Redis and one request admitted (its reservation booked) whose answer the
    fake holds; the function returned lets the answer go and returns it."""
    fake.default.hold = threading.Event()
    service = start_service(redis_env(fake, redis, QUOTA_TOKENS_PER_MINUTE="100000"))
    answers: list[Any] = []
    thread = threading.Thread(target=lambda: answers.append(service.client.post("/chat", json=PROMPT)))
    thread.start()
    assert wait_for(lambda: len(fake.chat_requests()) == 1)

    def answer() -> Any:
        assert fake.default.hold is not None
        fake.default.hold.set()
        thread.join(30)
        return answers[0]

    return service, answer


def test_a_settlement_redis_refuses_is_logged_and_its_reservation_stands(
    fake: FakeGroq, start_service: Any, redis_server: RedisServer
) -> None:
    service, answer = one_held(fake, start_service, redis_server)
    store = redis_server.client()
    store.config_set("maxmemory", "1")  # Redis refuses writes (OOM) from here on: the settlement among them
    assert answer().status_code == 200
    assert service.access_lines(1)[0]["charged_tokens"] == reserved(PROMPT)  # awaited: the refusal is known
    assert [line for line in warnings(service, "Redis refused a settlement") if "maxmemory" in line]
    store.config_set("maxmemory", "0")
    after = service.client.post("/chat", json={})
    assert after.headers["x-ratelimit-remaining-tokens"] == str(100000 - reserved(PROMPT))
    assert not warnings(service, "Redis is unreachable")  # Redis answered: no outage


def test_one_late_reply_is_no_outage_three_in_a_row_are(
    fake: FakeGroq, start_service: Any, redis_server: RedisServer
) -> None:
    env = redis_env(fake, redis_server, QUOTA_REQUESTS_PER_MINUTE="100", REDIS_TIMEOUT="0.2")
    service = start_service(env)
    assert service.client.post("/chat", json=PROMPT).status_code == 200
    for late in (1, 2):
        redis_server.pause()
        for _ in range(late):
            refused = service.client.post("/chat", json=PROMPT)  # this request could not be counted: 503
            assert refused.json()["error"]["type"] == "quota_unavailable"
        redis_server.resume()
        assert service.client.post("/chat", json=PROMPT).status_code == 200  # a reply: none are in a row now
    assert not warnings(service, "Redis is")
    redis_server.pause()
    for _ in range(3):
        assert service.client.post("/chat", json=PROMPT).status_code == 503
    assert warnings(service, "Redis is") == [
        "Redis is unreachable (TimeoutError): Groq-calling routes answer 503 quota_unavailable until it is back"
    ]
    redis_server.resume()
    assert service.client.post("/chat", json=PROMPT).status_code == 200
    assert warnings(service, "Redis is")[1:] == ["Redis is reachable again: requests are counted"]
