"""FALLBACK_MODELS: which Groq answers send a request on to its fallback, over real sockets to the fake Groq."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import groq
import openai
import pytest
from conftest import Service, groq_env
from fake_groq import Behaviour, FakeGroq, groq_error
from test_chat import assert_error
from test_lifetimes import _port, _request, _wait_for
from test_streaming import sse_events

pytestmark = pytest.mark.both_transports  # every test here runs on httpx and on aiohttp

A, B, C, D, E = "openai/gpt-oss-120b", "openai/gpt-oss-20b", "qwen/qwen3.6-27b", "qwen/qwen3.8-27b", "compound-beta"
ASK_A = {"prompt": "Say hello", "model": A}
MESSAGES = [{"role": "user", "content": "Say hello"}]
SDK_TOKEN = "loopback-needs-no-token-1234"  # the SDKs insist on a key; a loopback-only service ignores it


def models_asked(fake: FakeGroq) -> list[str]:
    return [r.body["model"] for r in fake.chat_requests()]


def fallback_fields(access: dict[str, Any]) -> tuple[Any, Any]:
    return access.get("fallback_from"), access.get("attempts")


@pytest.fixture
def a_to_b(fake: FakeGroq, start_service: Any) -> Service:
    service: Service = start_service(groq_env(fake, FALLBACK_MODELS=f"{A}>{B}"))
    return service


@pytest.mark.parametrize("status", [429, 498, 500, 502, 503])
def test_groq_out_of_capacity_sends_the_request_to_the_fallback(a_to_b: Service, fake: FakeGroq, status: int) -> None:
    fake.behaviours[A] = groq_error(status, A)
    response = a_to_b.client.post("/chat", json=ASK_A)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == B  # what Groq reports: the fallback answered
    assert response.json()["content"] == "Hello from the fake Groq server."
    assert models_asked(fake) == [A, B]
    assert fake.chat_requests()[1].body["messages"] == fake.chat_requests()[0].body["messages"]
    [access] = a_to_b.access_lines(1)
    assert (access["status"], access["model"], "error" in access) == (200, B, False)
    assert fallback_fields(access) == (A, 2)


def test_groq_unreachable_for_a_model_sends_it_to_the_fallback(a_to_b: Service, fake: FakeGroq) -> None:
    fake.behaviours[A] = Behaviour(hang_up=True)
    response = a_to_b.client.post("/chat", json=ASK_A)
    assert (response.status_code, response.json()["model"]) == (200, B)
    assert models_asked(fake) == [A, B]
    assert fallback_fields(a_to_b.access_lines(1)[0]) == (A, 2)


@pytest.mark.parametrize(
    ("status", "client_status", "error_type"),
    [
        (400, 400, "upstream_rejected"),
        (401, 502, "upstream_auth"),
        (403, 502, "upstream_auth"),
        (404, 404, "upstream_rejected"),
        (413, 413, "upstream_rejected"),
        (422, 422, "upstream_rejected"),
    ],
)
def test_a_request_groq_refuses_is_not_sent_to_the_fallback(
    a_to_b: Service, fake: FakeGroq, status: int, client_status: int, error_type: str
) -> None:
    fake.behaviours[A] = groq_error(status, A)
    assert_error(a_to_b.client.post("/chat", json=ASK_A), client_status, error_type)
    assert models_asked(fake) == [A]
    [access] = a_to_b.access_lines(1)
    assert access["error"] == error_type
    assert fallback_fields(access) == (None, None)


def test_no_fallback_after_groq_timeout(fake: FakeGroq, start_service: Any) -> None:
    held = threading.Event()
    fake.behaviours[A] = Behaviour(hold=held)
    service = start_service(groq_env(fake, FALLBACK_MODELS=f"{A}>{B}", GROQ_TIMEOUT="0.3"))
    try:
        assert_error(service.client.post("/chat", json=ASK_A), 504, "upstream_timeout")
    finally:
        held.set()
    assert models_asked(fake) == [A]
    assert fallback_fields(service.access_lines(1)[0]) == (None, None)


def test_the_chain_shares_one_groq_timeout(fake: FakeGroq, start_service: Any) -> None:
    """A fails after 0.5 s, B would answer after 1.8 s: within GROQ_TIMEOUT=2 each, but not both. (B must be
    asked before the deadline: 1.5 s of slack, so a busy machine still gets there.)"""
    fake.behaviours[A] = groq_error(503, A, delay=0.5)
    fake.behaviours[B] = Behaviour(delay=1.8)
    service = start_service(groq_env(fake, FALLBACK_MODELS=f"{A}>{B}", GROQ_TIMEOUT="2"))
    assert_error(service.client.post("/chat", json=ASK_A), 504, "upstream_timeout")
    assert models_asked(fake) == [A, B]
    [access] = service.access_lines(1)
    assert (access["model"], access["error"], *fallback_fields(access)) == (B, "upstream_timeout", A, 2)


def test_a_chain_of_three_fallbacks(fake: FakeGroq, start_service: Any) -> None:
    fake.behaviours |= {A: groq_error(429, A), B: groq_error(498, B), C: groq_error(503, C)}
    service = start_service(groq_env(fake, FALLBACK_MODELS=f"{A}>{B}, {B}>{C} ,{C}>{D}"))
    response = service.client.post("/chat", json=ASK_A)
    assert (response.status_code, response.json()["model"]) == (200, D)
    assert models_asked(fake) == [A, B, C, D]
    [access] = service.access_lines(1)
    assert (access["model"], *fallback_fields(access)) == (D, A, 4)
    assert (access["prompt_tokens"], access["completion_tokens"]) == (11, 6)  # the answering call's usage


def test_when_every_model_fails_the_client_gets_the_last_error(fake: FakeGroq, start_service: Any) -> None:
    fake.behaviours |= {A: groq_error(429, A), B: groq_error(498, B), C: groq_error(503, C), D: groq_error(502, D)}
    service = start_service(groq_env(fake, FALLBACK_MODELS=f"{A}>{B},{B}>{C},{C}>{D},{D}>{E}"))
    assert_error(service.client.post("/chat", json=ASK_A), 502, "upstream_error")
    assert models_asked(fake) == [A, B, C, D]  # at most three fallbacks: E is never asked
    [access] = service.access_lines(1)
    assert (access["status"], access["error"], *fallback_fields(access)) == (502, "upstream_error", A, 4)
    assert access["model"] == D  # the last model tried, as metrics label the last call


def test_the_last_error_is_the_one_the_client_sees(fake: FakeGroq, start_service: Any) -> None:
    fake.behaviours |= {A: groq_error(503, A), B: groq_error(429, B)}
    service = start_service(groq_env(fake, FALLBACK_MODELS=f"{A}>{B}"))
    response = service.client.post("/chat", json=ASK_A)
    assert_error(response, 429, "rate_limited")
    assert response.headers["retry-after"] == "6"  # B's, as Groq sent it
    assert f"`{B}`" in response.json()["error"]["message"]


def test_429_goes_to_the_fallback_at_once_and_the_last_model_keeps_its_retries(
    fake: FakeGroq, start_service: Any
) -> None:
    fake.behaviours[A] = groq_error(429, A)  # retry-after: 6, which the SDK would wait twice
    fake.behaviours[B] = groq_error(503, B, fail_times=1, headers={"retry-after-ms": "1"})
    service = start_service(groq_env(fake, FALLBACK_MODELS=f"{A}>{B}", GROQ_MAX_RETRIES="2"))
    started = time.monotonic()
    response = service.client.post("/chat", json=ASK_A)
    assert (response.status_code, response.json()["model"]) == (200, B)
    assert models_asked(fake) == [A, B, B]  # A once; B retried by the SDK, being the last of the chain
    assert time.monotonic() - started < 5
    assert [r.headers["x-stainless-retry-count"] for r in fake.chat_requests()] == ["0", "0", "1"]


def test_a_model_without_fallback_is_called_as_before(fake: FakeGroq, start_service: Any) -> None:
    fake.behaviours[C] = groq_error(503, C, fail_times=1, headers={"retry-after-ms": "1"})
    service = start_service(groq_env(fake, FALLBACK_MODELS=f"{A}>{B}", GROQ_MAX_RETRIES="1"))
    response = service.client.post("/chat", json={**ASK_A, "model": C})
    assert (response.status_code, response.json()["model"]) == (200, C)
    assert models_asked(fake) == [C, C]
    response = service.client.post("/chat", json=ASK_A)  # A has a fallback, and answers: nothing is added
    assert (response.status_code, response.json()["model"]) == (200, A)
    accesses = service.access_lines(2)
    assert [fallback_fields(a) for a in accesses] == [(None, None), (None, None)]


def test_a_stream_falls_back_before_its_response_head(a_to_b: Service, fake: FakeGroq) -> None:
    fake.behaviours[A] = groq_error(429, A)
    response = a_to_b.client.post("/chat", json={**ASK_A, "stream": True})
    assert response.status_code == 200
    events = sse_events(response.text)
    assert events[-1] == ("message", "[DONE]")
    assert json.loads(events[-2][1])["model"] == B
    assert "".join(json.loads(d).get("content", "") for _, d in events[:-2]) == "Hello from the fake Groq server."
    assert models_asked(fake) == [A, B]
    assert [r.body["stream"] for r in fake.chat_requests()] == [True, True]
    [access] = a_to_b.access_lines(1)
    assert (access["model"], access["stream"], *fallback_fields(access)) == (B, True, A, 2)


def test_a_stream_that_needs_no_fallback_is_relayed_as_before(a_to_b: Service, fake: FakeGroq) -> None:
    response = a_to_b.client.post("/chat", json={**ASK_A, "stream": True})
    events = sse_events(response.text)
    assert (response.status_code, events[-1], json.loads(events[-2][1])["model"]) == (200, ("message", "[DONE]"), A)
    assert models_asked(fake) == [A]
    assert fallback_fields(a_to_b.access_lines(1)[0]) == (None, None)


def test_a_stream_groq_refuses_is_not_sent_to_the_fallback(a_to_b: Service, fake: FakeGroq) -> None:
    fake.behaviours[A] = groq_error(404, A)
    assert_error(a_to_b.client.post("/chat", json={**ASK_A, "stream": True}), 404, "upstream_rejected")
    assert models_asked(fake) == [A]
    assert fallback_fields(a_to_b.access_lines(1)[0]) == (None, None)


@pytest.mark.parametrize("behaviour", [Behaviour(chunks=5, error_event_after=2), Behaviour(chunks=5, drop_after=2)])
def test_a_stream_never_falls_back_after_its_response_head(
    a_to_b: Service, fake: FakeGroq, behaviour: Behaviour
) -> None:
    fake.behaviours[A] = behaviour
    response = a_to_b.client.post("/chat", json={**ASK_A, "stream": True})
    assert response.status_code == 200
    *deltas, (name, data) = sse_events(response.text)
    assert [json.loads(d)["content"] for _, d in deltas] == ["t0 ", "t1 "]
    assert (name, json.loads(data)["error"]["type"]) == ("error", "upstream_error")
    assert models_asked(fake) == [A]
    [access] = a_to_b.access_lines(1)
    assert (access["error"], *fallback_fields(access)) == ("upstream_error", None, None)
    assert a_to_b.app.state.service.in_flight == 0


def test_a_stream_whose_whole_chain_fails_answers_the_last_error(a_to_b: Service, fake: FakeGroq) -> None:
    fake.behaviours |= {A: groq_error(498, A), B: groq_error(500, B)}
    assert_error(a_to_b.client.post("/chat", json={**ASK_A, "stream": True}), 502, "upstream_error")
    assert models_asked(fake) == [A, B]
    [access] = a_to_b.access_lines(1)
    assert (access["model"], *fallback_fields(access)) == (B, A, 2)
    assert a_to_b.app.state.service.in_flight == 0


def test_the_groq_sdk_route_falls_back_plain_and_streamed(a_to_b: Service, fake: FakeGroq) -> None:
    fake.behaviours[A] = groq_error(503, A)
    with groq.Groq(base_url=a_to_b.url, api_key=SDK_TOKEN, max_retries=0) as client:
        completion = client.chat.completions.create(messages=MESSAGES, model=A)  # type: ignore[arg-type]
        chunks = list(client.chat.completions.create(messages=MESSAGES, model=A, stream=True))  # type: ignore[arg-type]
    assert completion.model == B
    assert completion.choices[0].message.content == "Hello from the fake Groq server."
    assert {chunk.model for chunk in chunks} == {B}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from the fake Groq server."
    assert models_asked(fake) == [A, B, A, B]
    accesses = a_to_b.access_lines(2)
    assert [(a["path"], a["model"], *fallback_fields(a)) for a in accesses] == [
        ("/openai/v1/chat/completions", B, A, 2),
        ("/openai/v1/chat/completions", B, A, 2),
    ]


def test_the_openai_sdk_route_falls_back_plain_and_streamed(a_to_b: Service, fake: FakeGroq) -> None:
    fake.behaviours[A] = Behaviour(hang_up=True)
    with openai.OpenAI(base_url=a_to_b.url + "/v1", api_key=SDK_TOKEN, max_retries=0) as client:
        completion = client.chat.completions.create(messages=MESSAGES, model=A)  # type: ignore[arg-type]
        stream = client.chat.completions.create(
            messages=MESSAGES,  # type: ignore[arg-type]
            model=A,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    assert completion.model == B
    assert {chunk.model for chunk in chunks} == {B}
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 17
    assert models_asked(fake) == [A, B, A, B]
    accesses = a_to_b.access_lines(2)
    assert [(a["path"], a["model"], *fallback_fields(a)) for a in accesses] == [
        ("/v1/chat/completions", B, A, 2),
        ("/v1/chat/completions", B, A, 2),
    ]


def test_the_sdk_route_passes_on_a_refusal_without_fallback(a_to_b: Service, fake: FakeGroq) -> None:
    fake.behaviours[A] = groq_error(404, A)
    with groq.Groq(base_url=a_to_b.url, api_key=SDK_TOKEN, max_retries=0) as client, pytest.raises(groq.NotFoundError):
        client.chat.completions.create(messages=MESSAGES, model=A)  # type: ignore[arg-type]
    assert models_asked(fake) == [A]


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_during_the_fallback_stops_it(fake: FakeGroq, start_service: Any, stream: bool) -> None:
    fake.behaviours |= {A: groq_error(429, A), B: Behaviour(delay=30)}
    service = start_service(groq_env(fake, FALLBACK_MODELS=f"{A}>{B}"))
    sock = _request(_port(service.url), "POST", "/chat", {**ASK_A, "stream": stream})
    _wait_for(lambda: len(fake.chat_requests()) == 2)  # B is asked, and holds its answer
    sock.close()
    _wait_for(lambda: fake.closed_early, 5)
    assert models_asked(fake) == [A, B]
    [access] = service.access_lines(1)
    assert (access["status"], access["disconnected"], access["model"], *fallback_fields(access)) == (499, True, B, A, 2)
    assert service.app.state.service.in_flight == 0


def test_the_access_line_names_the_fallback_even_when_groq_reports_no_usage(a_to_b: Service, fake: FakeGroq) -> None:
    """The SDK route takes Groq's model from an answer with usage; without it the line still names the last call's."""
    fake.behaviours |= {A: groq_error(503, A), B: Behaviour(usage=False)}
    response = a_to_b.client.post("/openai/v1/chat/completions", json={"model": A, "messages": MESSAGES})
    assert (response.status_code, response.json()["model"]) == (200, B)
    [access] = a_to_b.access_lines(1)
    assert (access["model"], *fallback_fields(access)) == (B, A, 2)
