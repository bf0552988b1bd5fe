"""`"stream": true` on /chat: events as Groq sends them, errors before and after the first byte, cancellation."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from conftest import Service, groq_env
from fake_groq import API_KEY, Behaviour, FakeGroq
from test_chat import assert_error

pytestmark = pytest.mark.both_transports  # every test here runs on httpx and on aiohttp

STREAM = {"prompt": "Count", "stream": True}


def sse_events(text: str) -> list[tuple[str, str]]:
    """(event name, data) for each event; the name is "message" when the event has none."""
    events = []
    for block in text.split("\n\n"):
        if not block:
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((lines.get("event", "message"), lines["data"]))
    return events


def stream_and_check(client: httpx.Client, body: dict[str, Any]) -> list[tuple[str, str]]:
    response = client.post("/chat", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert response.headers["x-request-id"]
    assert response.text.endswith("\n\n")
    return sse_events(response.text)


def test_deltas_then_metadata_then_done(service: Service, fake: FakeGroq) -> None:
    fake.default = Behaviour(chunks=40)
    events = stream_and_check(service.client, STREAM)
    *deltas, final, done = events
    assert done == ("message", "[DONE]")
    assert all(name == "message" and set(json.loads(data)) == {"content"} for name, data in deltas)
    assert "".join(json.loads(data)["content"] for _, data in deltas) == "".join(f"t{i} " for i in range(40))
    assert json.loads(final[1]) == {
        "content": "",
        "model": "openai/gpt-oss-20b",
        "usage": {"prompt_tokens": 10, "completion_tokens": 40, "total_tokens": 50},
        "finish_reason": "stop",
    }
    [sent] = fake.chat_requests()
    assert sent.body["stream"] is True and sent.body["stream_options"] == {"include_usage": True}
    [access] = service.access_lines(1)
    assert (access["status"], access["model"], access["prompt_tokens"], access["completion_tokens"]) == (
        200,
        "openai/gpt-oss-20b",
        10,
        40,
    )
    assert "error" not in access and "disconnected" not in access
    assert access["upstream_ms"] <= access["duration_ms"]


def test_no_usage_from_groq_means_null(service: Service, fake: FakeGroq) -> None:
    fake.default = Behaviour(usage=False)
    *_, final, _ = stream_and_check(service.client, STREAM)
    assert json.loads(final[1])["usage"] is None


@pytest.mark.parametrize(
    ("behaviour", "env", "status", "error_type"),
    [
        (
            Behaviour(status=429, error={"message": "slow down", "type": "tokens"}, headers={"retry-after": "3"}),
            {},
            429,
            "rate_limited",
        ),
        (
            Behaviour(status=404, error={"message": "no such model", "type": "invalid_request_error"}),
            {},
            404,
            "upstream_rejected",
        ),
        (Behaviour(status=503), {}, 502, "upstream_error"),
        (Behaviour(delay=2), {"GROQ_TIMEOUT": "0.3"}, 504, "upstream_timeout"),
    ],
)
def test_errors_before_the_first_byte_are_json(
    fake: FakeGroq, start_service: Any, behaviour: Behaviour, env: dict[str, str], status: int, error_type: str
) -> None:
    fake.default = behaviour
    service = start_service(groq_env(fake, **env))
    response = service.client.post("/chat", json=STREAM)
    assert_error(response, status, error_type)
    if status == 429:
        assert response.headers["retry-after"] == "3"
    assert service.app.state.service.in_flight == 0


def test_validation_and_configuration_errors_come_before_streaming(fake: FakeGroq, start_service: Any) -> None:
    service = start_service(groq_env(fake))
    assert_error(service.client.post("/chat", json={**STREAM, "stream": "yes"}), 422, "validation_error")
    unconfigured = start_service({"GROQ_BASE_URL": fake.url})
    assert_error(unconfigured.client.post("/chat", json=STREAM), 503, "not_configured")
    assert fake.received == []


@pytest.mark.parametrize(
    ("behaviour", "env", "error_type"),
    [
        (Behaviour(chunks=50, drop_after=5), {}, "upstream_error"),
        (Behaviour(chunks=50, error_event_after=5), {}, "upstream_error"),
        (Behaviour(chunks=50, stall_after=5), {"GROQ_STREAM_IDLE_TIMEOUT": "0.3"}, "upstream_timeout"),
    ],
)
def test_errors_after_the_first_byte_end_with_one_error_event(
    fake: FakeGroq, start_service: Any, behaviour: Behaviour, env: dict[str, str], error_type: str
) -> None:
    fake.default = behaviour
    service = start_service(groq_env(fake, GROQ_MAX_RETRIES="2", **env))
    events = stream_and_check(service.client, {**STREAM, "model": "m"})
    *deltas, (name, data) = events
    assert [json.loads(d)["content"] for _, d in deltas] == [f"t{i} " for i in range(5)]
    assert name == "error"
    error = json.loads(data)["error"]
    assert error["type"] == error_type and error["message"]
    assert "[DONE]" not in [d for _, d in events]
    assert len(fake.chat_requests()) == 1  # never retried once bytes reached the client
    [access] = service.access_lines(1)
    assert (access["status"], access["error"]) == (200, error_type)
    assert error["request_id"] == access["request_id"]
    assert service.app.state.service.in_flight == 0


def test_client_disconnect_closes_the_upstream_stream(service: Service, fake: FakeGroq) -> None:
    fake.default = Behaviour(chunks=2000, chunk_delay=0.02)
    with service.client.stream("POST", "/chat", json=STREAM) as response:
        first = next(response.iter_lines())
        assert json.loads(first.removeprefix("data: ")) == {"content": "t0 "}
        closed_at = time.monotonic()
    assert fake.stream_ended.wait(5)
    [(how, ended_at)] = fake.stream_ends
    assert how == "client_closed"
    assert ended_at - closed_at < 1.0
    [access] = service.access_lines(1)
    assert (access["status"], access["disconnected"]) == (200, True)
    assert service.app.state.service.in_flight == 0


def test_client_disconnect_while_groq_is_silent(fake: FakeGroq, start_service: Any) -> None:
    fake.default = Behaviour(chunks=20, stall_after=1)
    service = start_service(groq_env(fake))
    with service.client.stream("POST", "/chat", json=STREAM) as response:
        next(response.iter_lines())
        closed_at = time.monotonic()
    assert fake.stream_ended.wait(5)
    assert fake.stream_ends[0][0] == "client_closed" and fake.stream_ends[0][1] - closed_at < 1.0


def test_stream_events_never_carry_the_key(fake: FakeGroq, start_service: Any) -> None:
    service = start_service(groq_env(fake, GROQ_STREAM_IDLE_TIMEOUT="0.3", LOG_LEVEL="DEBUG"))
    texts = []
    for behaviour in [Behaviour(chunks=5), Behaviour(chunks=9, drop_after=3), Behaviour(chunks=9, stall_after=3)]:
        fake.default = behaviour
        texts.append(service.client.post("/chat", json={**STREAM, "prompt": API_KEY}).text)
    assert API_KEY not in "".join(texts)
    assert API_KEY not in service.log_text()


def test_stream_through_the_process(fake: FakeGroq, start_process: Any) -> None:
    """Buffering and disconnects live in the server, so check both against `python app.py` too."""
    fake.default = Behaviour(chunks=3)
    proc = start_process(groq_env(fake))
    response = httpx.post(proc.url + "/chat", json=STREAM)
    events = sse_events(response.text)
    assert [json.loads(d)["content"] for _, d in events[:3]] == ["t0 ", "t1 ", "t2 "]
    assert events[-1] == ("message", "[DONE]")
    fake.default = Behaviour(chunks=2000, chunk_delay=0.02)
    fake.stream_ended.clear()
    with httpx.stream("POST", proc.url + "/chat", json=STREAM) as streaming:
        next(streaming.iter_lines())
        closed_at = time.monotonic()
    assert fake.stream_ended.wait(5)
    [(how, ended_at)] = fake.stream_ends[-1:]
    assert how == "client_closed" and ended_at - closed_at < 1.0
    assert proc.stop() == 0
    [access] = [line for line in proc.json_lines() if line["msg"] == "request" and line.get("disconnected")]
    assert access["status"] == 200
