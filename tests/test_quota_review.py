"""What a review of the quotas reproduced (issue 22), each as it fails without its fix, and the charging table.

1. a busy event loop taken for a Redis outage; 2. overload refusals spending quota; 3. wall-clock steps locking
clients out (stepped with Debian's libfaketime around the service, tests/clockshift.c around redis-server);
4. a connection Groq dropped after the request was sent charged 0; 5. an unexpected error type from the Redis
client answering 500; 6. the shutdown deadline losing a settlement in flight.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from clock import FakeTime, ShiftedClock
from conftest import Process, free_port, groq_env
from fake_groq import Behaviour, FakeGroq
from redis_server import RedisServer
from test_quota import PROMPT, concurrent_posts, reserved, usage_tokens, wait_for
from test_quota_deadline import loop_held

import errors
import quota_redis
from config import load_settings
from quota_types import Limits

BIG = {"prompt": "x" * 850_000}  # ~850 KB: parsing 40 of these keeps the service's loop busy


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_a_busy_event_loop_is_not_a_redis_outage(
    fake: FakeGroq, start_process: Any, redis_server: RedisServer, mode: str
) -> None:
    # a deadline shorter than the default 0.25 s, so that without the fix the false timeouts show in most runs
    env = groq_env(fake, REDIS_URL=redis_server.url, QUOTA_REQUESTS_PER_MINUTE="10", QUOTA_FAIL_MODE=mode)
    env["REDIS_TIMEOUT"] = "0.1"
    proc = start_process(env)
    answers = concurrent_posts(proc.url, "/chat", [BIG] * 40)  # a healthy Redis answers each admission at once
    statuses = collections.Counter(a.json().get("error", {}).get("type", a.status_code) for a in answers)
    assert statuses == {200: 10, "quota_exceeded": 30}, (statuses, [line for line in proc.lines if "Redis" in line])
    assert len(fake.chat_requests()) == 10  # with `open`, none passed uncounted
    assert not [line for line in proc.lines if "Redis is" in line]


def test_the_redis_deadline_does_not_count_time_the_loop_spent_elsewhere(redis_server: RedisServer) -> None:
    """The same, without depending on the machine's load: a task that holds the loop 0.2 s at a time, so every
    reply from Redis waits that long to be read, past the whole 0.1 s deadline."""
    settings = load_settings({"REDIS_URL": redis_server.url, "QUOTA_REQUESTS_PER_MINUTE": "1", "REDIS_TIMEOUT": "0.1"})
    limits = Limits(0, 1_000_000, 0)

    async def scenario() -> list[int]:
        store = quota_redis.Shared(settings)
        try:
            async with loop_held(0.2):
                answers = [await store.admit("local", limits, 10, True) for _ in range(5)]
        finally:
            await store.aclose()
        return [raw.minute_used for raw in answers if raw is not None]

    assert asyncio.run(scenario()) == [10, 20, 30, 40, 50]  # each counted, none taken for an outage


def test_an_overload_refusal_spends_no_quota(fake: FakeGroq, start_service: Any) -> None:
    fake.default.hold = threading.Event()
    service = start_service(groq_env(fake, MAX_CONCURRENCY="1", QUOTA_REQUESTS_PER_MINUTE="3"))
    held: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: held.append(httpx.post(service.url + "/chat", json=PROMPT, timeout=30)))
    thread.start()
    assert wait_for(lambda: len(fake.chat_requests()) == 1)  # the one slot is taken, one request reserved
    refused = [service.client.post("/chat", json=PROMPT) for _ in range(4)]
    assert [r.json()["error"]["type"] for r in refused] == ["overloaded"] * 4  # never a false 429
    assert [r.headers["x-ratelimit-remaining-requests"] for r in refused] == ["2"] * 4  # nothing reserved
    fake.default.hold.set()
    thread.join(30)
    assert held[0].status_code == 200
    after = service.client.post("/chat", json=PROMPT)
    assert (after.status_code, after.headers["x-ratelimit-remaining-requests"]) == (200, "1")


def _process_clock(proc: Process) -> float:
    """The service process's wall clock, as its Date header shows it."""
    date = httpx.get(proc.url + "/healthz", timeout=5).headers["date"]
    return email.utils.parsedate_to_datetime(date).timestamp()


def test_a_wall_clock_step_back_locks_no_client_out(fake: FakeGroq, start_process: Any, tmp_path: Path) -> None:
    clock = FakeTime(tmp_path)
    proc = start_process({**groq_env(fake, QUOTA_REQUESTS_PER_MINUTE="60"), **clock.env()})
    first = httpx.post(proc.url + "/chat", json=PROMPT, timeout=30)
    assert (first.status_code, first.headers["x-ratelimit-remaining-requests"]) == (200, "59")
    clock.step(-3600)
    assert wait_for(lambda: _process_clock(proc) < time.time() - 3500)  # its clock went back an hour
    second = httpx.post(proc.url + "/chat", json=PROMPT, timeout=30)
    assert second.status_code == 200, second.text  # not a wait of 3,542 s
    assert second.headers["x-ratelimit-remaining-requests"] in ("58", "59")


def test_the_in_process_day_count_starts_again_at_utc_midnight(
    fake: FakeGroq, start_process: Any, tmp_path: Path
) -> None:
    clock = FakeTime(tmp_path)
    proc = start_process({**groq_env(fake, QUOTA_TOKENS_PER_DAY="100000"), **clock.env()})
    assert httpx.post(proc.url + "/chat", json=PROMPT, timeout=30).status_code == 200
    seen = httpx.post(proc.url + "/chat", json={}, timeout=30)  # a 422 shows the counts, reserving nothing
    assert seen.headers["x-ratelimit-remaining-tokens"] == str(100000 - usage_tokens(fake))
    to_midnight = 86400 - int(time.time()) % 86400
    clock.step(to_midnight + 5)
    assert wait_for(lambda: int(_process_clock(proc)) // 86400 > int(time.time()) // 86400)
    after = httpx.post(proc.url + "/chat", json={}, timeout=30)
    assert after.headers["x-ratelimit-remaining-tokens"] == "100000"
    assert after.headers["x-ratelimit-reset-tokens"].startswith("23h59m")


@pytest.fixture
def shifted_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, ShiftedClock]]:
    clock = ShiftedClock(tmp_path)
    server = RedisServer(env=clock.env()).start()
    yield server, clock
    server.stop()


def test_a_redis_clock_step_back_locks_no_client_out(
    fake: FakeGroq, start_service: Any, shifted_redis: tuple[RedisServer, ShiftedClock]
) -> None:
    redis, clock = shifted_redis
    env = groq_env(fake, REDIS_URL=redis.url, QUOTA_REQUESTS_PER_MINUTE="60", QUOTA_TOKENS_PER_MINUTE="100000")
    service = start_service(env)
    first = service.client.post("/chat", json=PROMPT)
    assert (first.status_code, first.headers["x-ratelimit-remaining-requests"]) == (200, "59")
    clock.offset(-3600)
    second = service.client.post("/chat", json=PROMPT)
    assert (second.status_code, second.headers["retry-after"]) == (429, "1")  # one interval, not 3,542 s
    clock.offset(-3600 + 1)
    third = service.client.post("/chat", json=PROMPT)
    assert third.status_code == 200, third.text
    # the first request's tokens, booked an hour "ahead", no longer count
    assert third.headers["x-ratelimit-remaining-tokens"] == str(100000 - reserved(PROMPT))


CHARGES = {  # README's charging table, the rows decided by how the call to Groq ended
    "not sent: Groq not reachable": ("unreachable", 502, "upstream_unreachable", "zero"),
    "sent, then the connection dropped": ("dropped", 502, "upstream_error", "reservation"),
    "a Groq 5xx": ("fail/500", 502, "upstream_error", "reservation"),
    **{f"a Groq {code}": (f"fail/{code}", code, "upstream_rejected", "reservation") for code in (400, 404, 413, 422)},
    "Groq's deadline": ("slow", 504, "upstream_timeout", "reservation"),
}


@pytest.mark.both_transports
@pytest.mark.parametrize("row", CHARGES)
def test_what_a_failed_call_to_groq_is_charged(fake: FakeGroq, start_service: Any, row: str) -> None:
    model, status, error, charged = CHARGES[row]
    fake.behaviours["dropped"] = Behaviour(hang_up=True)
    for code in (400, 404, 413, 422, 500):
        fake.behaviours[f"fail/{code}"] = Behaviour(status=code)
    fake.behaviours["slow"] = Behaviour(delay=5)
    base_url = f"http://127.0.0.1:{free_port()}" if model == "unreachable" else fake.url
    env = groq_env(fake, GROQ_BASE_URL=base_url, GROQ_TIMEOUT="0.5", QUOTA_TOKENS_PER_MINUTE="10000")
    service = start_service(env)
    body = {"prompt": "hi", "model": model}
    answer = service.client.post("/chat", json=body)
    assert (answer.status_code, answer.json()["error"]["type"]) == (status, error)
    expected = 0 if charged == "zero" else reserved(body)
    assert service.access_lines(1)[0]["charged_tokens"] == expected
    after = service.client.post("/chat", json={})
    assert after.headers["x-ratelimit-remaining-tokens"] == str(10000 - expected)


class _NotRedis:
    """Not Redis: answers every command with `reply`."""

    def __init__(self, reply: bytes) -> None:
        self._reply = reply
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self._listener.getsockname()[1]}/0"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with connection:
            while connection.recv(65536):
                connection.sendall(self._reply)

    def close(self) -> None:
        self._listener.close()


REPLIES = {
    # an array nested 5,000 deep: redis-py's parser meets it with a RecursionError, a type no Redis client lists
    "RecursionError": b"*1\r\n" * 5000 + b":1\r\n",
    "ValueError": b":1\r\n",  # a number where the admission script answers a string
}


@pytest.mark.parametrize("error", REPLIES)
@pytest.mark.parametrize(("mode", "status"), [("closed", 503), ("open", 200)])
def test_an_unexpected_answer_from_the_redis_client_takes_the_fail_mode(
    fake: FakeGroq, start_service: Any, mode: str, status: int, error: str
) -> None:
    redis = _NotRedis(REPLIES[error])
    try:
        env = groq_env(fake, REDIS_URL=redis.url, QUOTA_REQUESTS_PER_MINUTE="5", QUOTA_FAIL_MODE=mode)
        service = start_service(env)
        answer = service.client.post("/chat", json=PROMPT)
    finally:
        redis.close()
    assert answer.status_code == status, answer.text
    if mode == "closed":
        assert answer.json()["error"]["type"] == "quota_unavailable"
    outage = [line["msg"] for line in service.log_lines() if line["msg"].startswith("Redis is unreachable")]
    assert outage and outage[0].startswith(f"Redis is unreachable ({error})")
    assert not [line for line in service.log_lines() if line["level"] == "ERROR"]


def test_a_cancelled_call_to_redis_stays_a_cancellation(redis_server: RedisServer) -> None:
    """A request cancelled while Redis holds its call (a client gone, the shutdown) is no deadline passed."""
    settings = load_settings({"REDIS_URL": redis_server.url, "QUOTA_REQUESTS_PER_MINUTE": "1", "REDIS_TIMEOUT": "5"})
    limits = Limits(0, 1_000_000, 0)

    async def scenario() -> Any:
        store = quota_redis.Shared(settings)
        await store.admit("local", limits, 10, True)
        redis_server.pause()
        call = asyncio.create_task(store.admit("local", limits, 10, True))
        for _ in range(20):  # until it waits for Redis
            await asyncio.sleep(0)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        redis_server.resume()
        after = await store.admit("local", limits, 0, False)
        await store.aclose()
        return after

    after = asyncio.run(scenario())
    assert after is not None and after.minute_used in (10, 20)  # Redis may have run the cancelled one


def test_the_shutdown_deadline_lets_a_settlement_in_flight_finish(fake: FakeGroq, start_process: Any) -> None:
    redis = RedisServer(password="quota-pw").start()  # a new connection waits for AUTH's reply before its command
    try:
        fake.default.hold = threading.Event()
        env = groq_env(fake, REDIS_URL=redis.url, QUOTA_TOKENS_PER_MINUTE="100000", SHUTDOWN_TIMEOUT="1")
        proc = start_process({**env, "REDIS_TIMEOUT": "10"})
        answers: list[httpx.Response] = []
        thread = threading.Thread(
            target=lambda: answers.append(httpx.post(proc.url + "/chat", json=PROMPT, timeout=30))
        )
        thread.start()
        assert wait_for(lambda: len(fake.chat_requests()) == 1)  # admitted: its reservation is in Redis
        store = redis.client()
        assert store.client_kill_filter(_type="normal", skipme=True) >= 1  # the settlement will reconnect
        redis.pause()  # ...and wait for AUTH's reply
        proc.send_signal(signal.SIGTERM)
        fake.default.hold.set()  # Groq answers: the settlement starts, and hangs
        ended = "shutdown: 1 request(s) still running were ended with 503 shutting_down"
        assert wait_for(lambda: any(ended in line for line in proc.lines), timeout=20)  # the deadline passed
        redis.resume()
        assert proc.wait(30) == 0
        thread.join(30)
        assert answers[0].json()["error"]["type"] == "shutting_down"
        booked = sum(int(tokens) for tokens in store.hgetall("quota:{local}:m").values())
        assert booked == usage_tokens(fake)  # Groq's usage, not the reservation: the settlement finished
    finally:
        redis.stop()


def test_the_wait_for_a_free_redis_connection_is_bounded_on_its_own(redis_server: RedisServer) -> None:
    """One connection (MAX_CONCURRENCY=1), a hung Redis holding it 0.3 s per call: of 20 look-ups at once, those
    still waiting for it after max(1 s, 4 x REDIS_TIMEOUT) = 1.2 s are `overloaded` then, about 1.5 s in all.
    Unbounded, none is `overloaded` (they wait their turns); counted in the deadline, each fails at 0.3 s."""
    env = {"REDIS_URL": redis_server.url, "QUOTA_REQUESTS_PER_MINUTE": "100", "REDIS_TIMEOUT": "0.3"}
    settings = load_settings({**env, "MAX_CONCURRENCY": "1", "QUOTA_FAIL_MODE": "open"})
    limits = Limits(100, 0, 0)

    async def scenario() -> list[tuple[str, float]]:
        store = quota_redis.Shared(settings)
        await store.admit("local", limits, 0, False)  # the one connection, in the pool
        redis_server.pause()
        started = time.monotonic()

        async def look() -> tuple[str, float]:
            try:
                answer = "counts" if await store.admit("local", limits, 0, False) else "uncounted"
            except errors.Overloaded:
                answer = "overloaded"
            return answer, time.monotonic() - started

        try:
            return await asyncio.gather(*[look() for _ in range(20)])
        finally:
            redis_server.resume()
            await store.aclose()

    answers = asyncio.run(scenario())
    overloaded = [took for answer, took in answers if answer == "overloaded"]
    assert overloaded and all(1.2 <= took < 3 for took in overloaded), answers  # at 1.2 s, 1.8 s to spare
    assert max(took for _, took in answers) < 4, answers  # 1.2 s of waiting and 0.3 s at Redis at most
