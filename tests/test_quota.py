"""Per-client quotas counted in the process: admission, reservation, settlement, headers, and their errors."""

from __future__ import annotations

import datetime
import json
import math
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from conftest import ROOT, groq_env
from fake_groq import Behaviour, FakeGroq

import quota
from config import ServiceKey, SettingsError, load_settings

PROMPT = {"prompt": "hi", "max_tokens": 100}
RESET = re.compile(r"(\d+h)?(\d+m)?\d+(\.\d{1,2})?s")


def reserved(body: dict[str, Any]) -> int:
    """What a request reserves: its body as httpx sends it (compact JSON) / 4, rounded up, plus its max tokens."""
    size = len(json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode())
    return math.ceil(size / 4) + (body.get("max_tokens") or body.get("max_completion_tokens") or 1024)


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def usage_tokens(fake: FakeGroq, n: int = -1) -> int:
    """What the fake reported for its n-th chat request: prompt + completion tokens."""
    body = fake.chat_requests()[n].body
    prompt = sum(len(str(m.get("content", "")).split()) for m in body["messages"]) + 9
    return prompt + len(fake.default.pieces())


def test_requests_per_minute_burst_then_429_with_the_real_wait_then_passes(fake: FakeGroq, start_service: Any) -> None:
    service = start_service(groq_env(fake, QUOTA_REQUESTS_PER_MINUTE="3"), quota_minute=1.5)  # one per 0.5 s
    answers = [service.client.post("/chat", json=PROMPT) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["2", "1", "0", "0"]
    assert all(a.headers["x-ratelimit-limit-requests"] == "3" for a in answers)
    assert all(RESET.fullmatch(a.headers["x-ratelimit-reset-requests"]) for a in answers)
    refused = answers[3]
    assert refused.headers["retry-after"] == "1"  # 0.5 s to the next slot, rounded up
    error = refused.json()["error"]
    assert error["type"] == "quota_exceeded"
    assert error["message"] == "This client is over its quota of 3 requests per minute; retry in 1 s."
    assert len(fake.chat_requests()) == 3
    line = service.access_lines(4)[3]
    assert (line["status"], line["quota"], line["error"]) == (429, "requests_per_minute", "quota_exceeded")
    assert "charged_tokens" not in line
    time.sleep(float(refused.headers["retry-after"]))
    assert service.client.post("/chat", json=PROMPT).status_code == 200


def test_tokens_per_rolling_minute_refuse_until_the_oldest_reservations_leave(
    fake: FakeGroq, start_service: Any
) -> None:
    fake.default.usage = False  # no usage: each reservation stands
    service = start_service(groq_env(fake, QUOTA_TOKENS_PER_MINUTE="200"), quota_minute=0.9)
    assert service.client.post("/chat", json={"prompt": "hi", "max_tokens": 10}).status_code == 200
    width = 0.9 / 60  # the next reservation lands in a later slice of the window
    first = math.floor(time.monotonic() / width)  # the in-process windows run on the monotonic clock
    assert wait_for(lambda: math.floor(time.monotonic() / width) > first)
    assert service.client.post("/chat", json=PROMPT).status_code == 200
    refused = service.client.post("/chat", json=PROMPT)  # needs both earlier reservations gone
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["message"] == "This client is over its quota of 200 tokens per minute; retry in 1 s."
    assert service.client.get("/readyz").json() == {"status": "ready"}
    time.sleep(1)
    again = service.client.post("/chat", json=PROMPT)
    assert again.status_code == 200
    assert again.headers["x-ratelimit-remaining-tokens"] == str(200 - reserved(PROMPT))


def test_the_limit_named_is_the_one_with_the_longest_wait(fake: FakeGroq, start_service: Any) -> None:
    over_both = {"prompt": "hi", "max_tokens": 150}
    env = groq_env(fake, QUOTA_REQUESTS_PER_MINUTE="1", QUOTA_TOKENS_PER_MINUTE=str(reserved(over_both)))
    service = start_service(env)
    assert service.client.post("/chat", json=PROMPT).status_code == 200
    fake.default.usage = False
    refused = service.client.post("/chat", json=over_both)
    assert refused.status_code == 429
    assert service.access_lines(2)[1]["quota"] == "requests_per_minute"


def concurrent_posts(
    urls: str | list[str], path: str, bodies: list[dict[str, Any]], held: FakeGroq | None = None
) -> list[httpx.Response]:
    """All requests at once, each on its own connection, spread over `urls`. With `held`, a fake whose default
    behaviour holds its answers: every request is first either answered (refused) or waiting at the fake
    (admitted), and only then does the fake answer, so none is settled before all are admitted."""
    urls = [urls] if isinstance(urls, str) else urls
    answers: list[httpx.Response] = []
    barrier = threading.Barrier(len(bodies))

    def post(url: str, body: dict[str, Any]) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            barrier.wait(10)
            answers.append(client.post(path, json=body))

    threads = [threading.Thread(target=post, args=(urls[i % len(urls)], b)) for i, b in enumerate(bodies)]
    for thread in threads:
        thread.start()
    if held is not None and held.default.hold is not None:
        assert wait_for(lambda: len(answers) + len(held.chat_requests()) >= len(bodies)), "not all admitted or refused"
        held.default.hold.set()
    for thread in threads:
        thread.join(30)
    return answers


@pytest.mark.parametrize("variable", ["QUOTA_TOKENS_PER_MINUTE", "QUOTA_TOKENS_PER_DAY"])
def test_concurrent_first_requests_cannot_all_pass_a_budget(fake: FakeGroq, start_service: Any, variable: str) -> None:
    fake.default.hold = threading.Event()  # all are admitted before any settles
    budget = 2 * reserved(PROMPT) + 50  # fits k = 2 reservations
    service = start_service(groq_env(fake, **{variable: str(budget)}))
    answers = concurrent_posts(service.url, "/chat", [PROMPT] * 6, held=fake)
    assert sorted(a.status_code for a in answers) == [200, 200, 429, 429, 429, 429]
    assert len(fake.chat_requests()) == 2
    what = variable.removeprefix("QUOTA_").lower()
    for refused in (a for a in answers if a.status_code == 429):
        assert refused.json()["error"]["message"].startswith(
            f"This client is over its quota of {budget} {what.replace('_', ' ')}"
        )
        assert refused.headers["x-ratelimit-limit-tokens"] == str(budget)
    lines = service.access_lines(6)
    assert sorted(line.get("quota", "") for line in lines) == ["", ""] + [what] * 4
    wait = int(next(a for a in answers if a.status_code == 429).headers["retry-after"])
    if variable == "QUOTA_TOKENS_PER_MINUTE":
        assert 58 <= wait <= 60  # when the first reservation leaves the rolling minute
    else:
        now = datetime.datetime.now(datetime.UTC)
        midnight = (now + datetime.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        assert abs(wait - (midnight - now).total_seconds()) <= 2  # the next UTC day


def test_reservations_settle_to_groq_usage(fake: FakeGroq, start_service: Any) -> None:
    service = start_service(groq_env(fake, QUOTA_TOKENS_PER_MINUTE="10000"))
    answer = service.client.post("/chat", json={"prompt": "hi", "max_tokens": 5000})
    assert answer.status_code == 200
    assert answer.headers["x-ratelimit-remaining-tokens"] == str(10000 - reserved({"prompt": "hi", "max_tokens": 5000}))
    used = answer.json()["usage"]["total_tokens"]
    assert used == usage_tokens(fake)
    assert service.access_lines(1)[0]["charged_tokens"] == used
    refused = service.client.post("/chat", json={"prompt": ""})  # refused by validation: reserves nothing
    assert refused.status_code == 422
    assert refused.headers["x-ratelimit-remaining-tokens"] == str(10000 - used)
    assert refused.headers["x-ratelimit-limit-tokens"] == "10000"
    assert "charged_tokens" not in service.access_lines(2)[1]


def test_a_stream_is_charged_its_real_usage(fake: FakeGroq, start_service: Any) -> None:
    service = start_service(groq_env(fake, QUOTA_TOKENS_PER_MINUTE="10000", QUOTA_REQUESTS_PER_MINUTE="100"))
    with service.client.stream("POST", "/chat", json={"prompt": "hi", "stream": True}) as answer:
        assert answer.headers["x-ratelimit-remaining-tokens"] == str(10000 - reserved({"prompt": "hi", "stream": True}))
        assert answer.headers["x-ratelimit-remaining-requests"] == "99"
        events = [json.loads(line[6:]) for line in answer.iter_lines() if line.startswith("data: {")]
    used = events[-1]["usage"]["total_tokens"]
    assert used == usage_tokens(fake)
    assert service.access_lines(1)[0]["charged_tokens"] == used
    after = service.client.post("/chat", json={})
    assert after.headers["x-ratelimit-remaining-tokens"] == str(10000 - used)


def test_a_client_that_disconnects_mid_stream_is_charged(fake: FakeGroq, start_service: Any) -> None:
    fake.default = Behaviour(chunks=200, chunk_delay=0.05)
    service = start_service(groq_env(fake, QUOTA_TOKENS_PER_MINUTE="10000"))
    with service.client.stream("POST", "/chat", json={"prompt": "hi", "stream": True}) as answer:
        next(answer.iter_lines())
    assert fake.stream_ended.wait(5)
    line = service.access_lines(1)[0]
    assert line["disconnected"] is True
    cost = reserved({"prompt": "hi", "stream": True})  # 1024, the default reserve, for the completion
    assert line["charged_tokens"] == cost  # Groq's usage never came: the reservation stands
    after = service.client.post("/chat", json={})
    assert after.headers["x-ratelimit-remaining-tokens"] == str(10000 - cost)


def test_sdk_stream_asks_groq_for_usage_and_strips_it_again(fake: FakeGroq, start_service: Any) -> None:
    service = start_service(groq_env(fake, QUOTA_TOKENS_PER_DAY="100000"))
    body = {"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with service.client.stream("POST", "/v1/chat/completions", json=body) as answer:
        assert answer.headers["x-ratelimit-limit-tokens"] == "100000"
        chunks = [json.loads(line[6:]) for line in answer.iter_lines() if line.startswith("data: {")]
    assert fake.chat_requests()[-1].body["stream_options"] == {"include_usage": True}
    assert all(chunk["choices"] for chunk in chunks)  # no usage-only chunk the client did not ask for
    used = chunks[-1]["usage"]["total_tokens"]
    assert service.access_lines(1)[0]["charged_tokens"] == used
    asked = {**body, "stream_options": {"include_usage": True}}
    with service.client.stream("POST", "/v1/chat/completions", json=asked) as answer:
        chunks = [json.loads(line[6:]) for line in answer.iter_lines() if line.startswith("data: {")]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == used


def test_sdk_routes_answer_in_the_openai_shape_and_groq_headers_never_pass(fake: FakeGroq, start_service: Any) -> None:
    service = start_service(groq_env(fake, QUOTA_REQUESTS_PER_MINUTE="1"))
    body = {"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    first = service.client.post("/v1/chat/completions", json=body)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "1"  # ours; the fake sends 14400
    assert "x-ratelimit-limit-tokens" not in first.headers  # no token limit set
    assert "14400" not in str(first.headers) and "17997" not in str(first.headers)
    refused = service.client.post("/openai/v1/chat/completions", json=body)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "60"
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("quota_exceeded", "rate_limit_exceeded")
    models = service.client.get("/v1/models")
    assert models.status_code == 429


def test_no_quota_means_groqs_own_headers(service: Any) -> None:
    answer = service.client.post("/chat", json=PROMPT)
    assert answer.status_code == 200
    assert answer.headers["x-ratelimit-limit-requests"] == "14400"  # the fake's, as Groq sends them
    assert answer.headers["x-ratelimit-reset-tokens"] == "7.66s"


def test_a_request_over_the_whole_limit_can_never_pass(fake: FakeGroq, start_service: Any) -> None:
    for minute, day, what in (("600", "700", "600 tokens per minute"), ("700", "600", "600 tokens per day")):
        service = start_service(groq_env(fake, QUOTA_TOKENS_PER_MINUTE=minute, QUOTA_TOKENS_PER_DAY=day))
        body = {"prompt": "hi", "max_tokens": 650}
        refused = service.client.post("/chat", json=body)
        assert refused.status_code == 429
        assert "retry-after" not in refused.headers
        message = refused.json()["error"]["message"]
        assert message == (
            f"This request reserves {reserved(body)} tokens, more than this client's whole quota of "
            f"{what}; send a shorter prompt or a lower max_tokens."
        )
    assert fake.chat_requests() == []


def test_what_groq_refuses_before_generating_is_not_charged_other_errors_are(
    fake: FakeGroq, start_service: Any
) -> None:
    before = {"no/key": 401, "too/many": 429, "flex/full": 498}  # Groq refused without generating: charged 0
    for model, status in before.items():
        fake.behaviours[model] = Behaviour(status=status, error={"message": "no", "type": "invalid_request_error"})
    error = {"message": "Failed to validate JSON", "type": "invalid_request_error", "code": "json_validate_failed"}
    fake.behaviours["bad/json"] = Behaviour(status=400, error=error)  # Groq generated, then refused the output
    service = start_service(groq_env(fake, QUOTA_TOKENS_PER_MINUTE="5000", QUOTA_REQUESTS_PER_MINUTE="10"))
    bodies = [{"prompt": "hi", "model": model} for model in [*before, "bad/json"]]
    statuses = [service.client.post("/chat", json=body).status_code for body in bodies]
    assert statuses == [502, 429, 503, 400]
    lines = service.access_lines(4)
    assert [line["error"] for line in lines] == ["upstream_auth", "rate_limited", "upstream_busy", "upstream_rejected"]
    assert [line["charged_tokens"] for line in lines] == [0, 0, 0, reserved(bodies[3])]
    after = service.client.post("/chat", json={})
    assert after.headers["x-ratelimit-remaining-tokens"] == str(5000 - reserved(bodies[3]))
    assert after.headers["x-ratelimit-remaining-requests"] == "6"  # Groq saw the refused ones


def test_a_request_the_service_never_sent_gives_everything_back(fake: FakeGroq, start_service: Any) -> None:
    service = start_service({"QUOTA_REQUESTS_PER_MINUTE": "10"})  # no GROQ_API_KEY: /v1/models answers 503
    answers = [service.client.get("/v1/models") for _ in range(2)]
    assert [a.status_code for a in answers] == [503, 503]
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["9", "9"]
    assert service.access_lines(2)[0]["charged_tokens"] == 0


@pytest.mark.parametrize(
    ("seconds", "written"),
    [(7.66, "7.66s"), (6, "6s"), (0.004, "0s"), (179.56, "2m59.56s"), (3723, "1h2m3s"), (-1, "0s")],
)
def test_duration_is_written_as_groq_writes_it(seconds: float, written: str) -> None:
    assert quota.duration(seconds) == written


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"QUOTA_REQUESTS_PER_MINUTE": "0"}, "QUOTA_REQUESTS_PER_MINUTE must be a whole number from 1 to"),
        ({"QUOTA_TOKENS_PER_MINUTE": "many"}, "QUOTA_TOKENS_PER_MINUTE must be a whole number from 1 to"),
        ({"QUOTA_TOKENS_PER_DAY": "-5"}, "QUOTA_TOKENS_PER_DAY must be a whole number from 1 to"),
        ({"QUOTA_DEFAULT_RESERVE": "0"}, "QUOTA_DEFAULT_RESERVE must be a whole number from 1 to"),
        ({"QUOTA_FAIL_MODE": "maybe"}, "QUOTA_FAIL_MODE must be one of closed, open"),
        ({"REDIS_TIMEOUT": "0"}, "REDIS_TIMEOUT must be a number of seconds > 0"),
        ({"WORKERS": "2", "QUOTA_TOKENS_PER_DAY": "9"}, "WORKERS > 1 with a quota needs REDIS_URL"),
        ({"REDIS_URL": "http://:hunter2@x/0", "QUOTA_TOKENS_PER_DAY": "9"}, "REDIS_URL must look like redis://"),
    ],
)
def test_invalid_quota_settings_stop_the_start(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(env)
    assert str(raised.value).startswith(message)
    assert "hunter2" not in str(raised.value)


def test_redis_password_is_a_secret() -> None:
    settings = load_settings({"REDIS_URL": "redis://:hunter2@127.0.0.1:1/0", "QUOTA_TOKENS_PER_DAY": "9"})
    assert "hunter2" in settings.secrets() and "hunter2" not in repr(settings)


def test_redis_url_without_the_package_is_one_clear_start_up_line() -> None:
    code = "import sys, runpy; sys.modules['redis'] = None; runpy.run_path('app.py', run_name='__main__')"
    env = {"REDIS_URL": "redis://127.0.0.1:1/0", "QUOTA_REQUESTS_PER_MINUTE": "5", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    (line,) = [json.loads(line) for line in result.stderr.splitlines() + result.stdout.splitlines() if line]
    assert line["msg"] == (
        "configuration error: REDIS_URL is set but the redis package is not installed: "
        "pip install --require-hashes --no-deps -r requirements-redis.txt"
    )


def test_the_redis_requirement_is_pinned_with_hashes() -> None:
    from test_audit import pins

    assert set(pins(ROOT / "requirements-redis.txt")) == {"redis", "async-timeout"}


def test_the_openai_sdk_raises_its_rate_limit_error(fake: FakeGroq, start_service: Any) -> None:
    import openai

    service = start_service(groq_env(fake, QUOTA_REQUESTS_PER_MINUTE="1"))
    client = openai.OpenAI(base_url=service.url + "/v1", api_key="unused-on-loopback", max_retries=0)
    messages: Any = [{"role": "user", "content": "hi"}]
    client.chat.completions.create(model="openai/gpt-oss-20b", messages=messages)
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="openai/gpt-oss-20b", messages=messages)
    assert raised.value.code == "rate_limit_exceeded"
    assert raised.value.response.headers["retry-after"] == "60"
    client.close()


def test_limits_are_kept_once_per_client_name_across_reloads() -> None:
    """Each reload may hand a new entry under the same name: its limits replace the old ones, never pile up."""
    limits = quota.build(load_settings({"QUOTA_TOKENS_PER_MINUTE": "100"}))
    for rpm in range(1, 51):  # fifty reloads, each changing alpha's limit
        entry = ServiceKey("alpha", bytes(32), requests_per_minute=rpm)
        assert limits.limits(entry) == (rpm, 100, 0)
    assert limits.limits(ServiceKey("beta", bytes(32))) == (0, 100, 0)
    assert len(limits._limits) == 2  # one per name
