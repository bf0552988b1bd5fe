"""/chat for reasoning models: Groq's reasoning, JSON-output and service-tier options, the reasoning in the answer
and the stream, a stream that starts at Groq's first chunk, and Groq's 498 (flex tier at capacity)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import groq
import pytest
from conftest import Service, groq_env
from fake_groq import Behaviour, FakeGroq
from test_chat import assert_error
from test_streaming import stream_and_check

import chat_api

pytestmark = pytest.mark.both_transports  # every test here runs on httpx and on aiohttp

REASONING = "The user wants a greeting. Keep it short."
THINKING = Behaviour(reasoning=REASONING, reasoning_tokens=9)
JSON_TEXT = '{"answer": 42, "items": ["a b", "c"], "ok": true}'


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[FakeGroq, Service]]:
    """One fake and one service for the tables below, which only read what each request did."""
    fake = FakeGroq().start()
    service = Service(groq_env(fake))
    yield fake, service
    service.stop()
    fake.stop()


VALID = [
    *[("reasoning_effort", v) for v in ["none", "default", "low", "medium", "high"]],
    ("include_reasoning", True),
    ("include_reasoning", False),
    *[("reasoning_format", v) for v in ["hidden", "raw", "parsed"]],
    ("response_format", {"type": "text"}),
    ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "reply"}}),
    (
        "response_format",
        {
            "type": "json_schema",
            "json_schema": {
                "name": "reply",
                "description": "",
                "schema": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
                "strict": True,
            },
        },
    ),
    ("max_completion_tokens", 1),
    ("max_completion_tokens", 131072),
    *[("service_tier", v) for v in ["auto", "on_demand", "flex", "performance"]],
]


@pytest.mark.parametrize(("field", "value"), VALID)
def test_each_valid_value_reaches_groq_exactly_as_given(
    shared: tuple[FakeGroq, Service], field: str, value: Any
) -> None:
    fake, service = shared
    response = service.client.post("/chat", json={"prompt": "Say hello", field: value})
    assert response.status_code == 200, response.text
    sent = fake.chat_requests()[-1].body
    assert json.dumps(sent[field]) == json.dumps(value)  # the same JSON: true stays true, 1 stays 1
    assert set(sent) == {"messages", "model", field}


SCHEMA = {"type": "json_schema", "json_schema": {"name": "reply"}}
INVALID = [
    *[({"reasoning_effort": v}, "reasoning_effort") for v in ["max", "LOW", "", None, 1, ["low"]]],
    *[({"include_reasoning": v}, "include_reasoning") for v in ["true", 1, 0, None]],
    *[({"reasoning_format": v}, "reasoning_format") for v in ["json", None, True]],
    ({"response_format": "json_object"}, "response_format"),
    ({"response_format": None}, "response_format"),
    ({"response_format": {}}, "response_format.type"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": ["text"]}}, "response_format.type"),
    ({"response_format": {"type": "text", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_object", "schema": {}}}, "response_format.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format.json_schema.name"),
    ({"response_format": {**SCHEMA, "json_schema": {"name": ""}}}, "response_format.json_schema.name"),
    ({"response_format": {**SCHEMA, "json_schema": {"name": 5}}}, "response_format.json_schema.name"),
    ({"response_format": {**SCHEMA, "json_schema": "reply"}}, "response_format.json_schema"),
    (
        {"response_format": {**SCHEMA, "json_schema": {"name": "x", "description": 5}}},
        "response_format.json_schema.description",
    ),
    (
        {"response_format": {**SCHEMA, "json_schema": {"name": "x", "schema": "object"}}},
        "response_format.json_schema.schema",
    ),
    (
        {"response_format": {**SCHEMA, "json_schema": {"name": "x", "schema": [{"type": "object"}]}}},
        "response_format.json_schema.schema",
    ),
    (
        {"response_format": {**SCHEMA, "json_schema": {"name": "x", "schema": {"max": float("inf")}}}},
        "response_format.json_schema.schema",
    ),
    (
        {"response_format": {**SCHEMA, "json_schema": {"name": "x", "strict": "yes"}}},
        "response_format.json_schema.strict",
    ),
    (
        {"response_format": {**SCHEMA, "json_schema": {"name": "x", "format": "y"}}},
        "response_format.json_schema.format",
    ),
    *[({"max_completion_tokens": v}, "max_completion_tokens") for v in [0, 131073, 1.5, True, "10", None]],
    ({"max_completion_tokens": 10, "max_tokens": 10}, "max_completion_tokens"),
    *[({"service_tier": v}, "service_tier") for v in ["premium", "FLEX", "", None, 1]],
]


@pytest.mark.parametrize(("extra", "field"), INVALID)
def test_each_invalid_value_is_422_naming_the_field_and_never_sent(
    shared: tuple[FakeGroq, Service], extra: dict[str, Any], field: str
) -> None:
    fake, service = shared
    before = len(fake.received)
    content = json.dumps({"prompt": "Say hello", **extra})  # Python's json writes inf as Infinity, as a client may
    response = service.client.post("/chat", content=content, headers={"content-type": "application/json"})
    error = assert_error(response, 422, "validation_error")
    assert [d["field"] for d in error["details"]] == [field]
    assert "premium" not in response.text and "xml" not in response.text  # a value is never echoed
    assert len(fake.received) == before


def test_all_options_together_reach_a_stream_as_given(service: Service, fake: FakeGroq) -> None:
    options = {
        "reasoning_effort": "low",
        "include_reasoning": True,
        "response_format": {"type": "json_object"},
        "max_completion_tokens": 300,
        "service_tier": "flex",
    }
    stream_and_check(service.client, {"prompt": "Say hello", "stream": True, **options})
    [sent] = fake.chat_requests()
    assert sent.body == {
        "messages": [{"role": "user", "content": "Say hello"}],
        "model": "openai/gpt-oss-20b",
        **options,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_an_answer_without_reasoning_is_byte_for_byte_as_before(service: Service, fake: FakeGroq) -> None:
    response = service.client.post("/chat", json={"prompt": "Say hello"})
    assert response.content == (
        b'{"content": "Hello from the fake Groq server.", "model": "openai/gpt-oss-20b", '
        b'"usage": {"prompt_tokens": 11, "completion_tokens": 6, "total_tokens": 17}, "finish_reason": "stop"}'
    )


@pytest.mark.parametrize(
    ("options", "shown"),
    [
        ({"include_reasoning": True}, True),
        ({"reasoning_format": "parsed"}, True),
        ({"include_reasoning": False}, False),
        ({"reasoning_format": "hidden"}, False),
        ({}, False),
    ],
)
def test_reasoning_is_in_the_answer_only_when_groq_sent_it(
    service: Service, fake: FakeGroq, options: dict[str, Any], shown: bool
) -> None:
    fake.default = THINKING
    answer = service.client.post("/chat", json={"prompt": "Say hello", **options}).json()
    expected = {
        "content": "Hello from the fake Groq server.",
        "model": "openai/gpt-oss-20b",
        "usage": {"prompt_tokens": 11, "completion_tokens": 15, "total_tokens": 26, "reasoning_tokens": 9},
        "finish_reason": "stop",
    }
    assert answer == ({**expected, "reasoning": REASONING} if shown else expected)
    assert fake.chat_requests()[0].body == {
        "messages": [{"role": "user", "content": "Say hello"}],
        "model": "openai/gpt-oss-20b",
        **options,
    }


@pytest.mark.parametrize(
    ("behaviour", "status", "reasoning", "usage"),
    [
        (Behaviour(message_extra={"reasoning": None}), 200, None, {"completion_tokens": 6}),
        (Behaviour(message_extra={"reasoning": ""}), 200, "", {"completion_tokens": 6}),
        (Behaviour(message_extra={"reasoning": ["x"]}), 502, None, None),
        (
            Behaviour(
                raw_body=b'{"model": "m", "choices": [{"message": {"content": "c"}}], "usage": {"prompt_tokens": 1, '
                b'"completion_tokens": 2, "total_tokens": 3, "completion_tokens_details": {"reasoning_tokens": "2"}}}'
            ),
            200,
            None,
            {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        ),
        (
            Behaviour(
                raw_body=b'{"model": "m", "choices": [{"message": {"content": "c"}}], "usage": {"prompt_tokens": 1, '
                b'"completion_tokens": 2, "total_tokens": 3, "completion_tokens_details": null}}'
            ),
            200,
            None,
            {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        ),
    ],
)
def test_what_groq_sends_as_reasoning_is_read_defensively(
    service: Service,
    fake: FakeGroq,
    behaviour: Behaviour,
    status: int,
    reasoning: str | None,
    usage: dict[str, int] | None,
) -> None:
    fake.default = behaviour
    response = service.client.post("/chat", json={"prompt": "Say hello", "include_reasoning": True})
    if status != 200:
        assert_error(response, status, "upstream_error")
        return
    answer = response.json()
    assert answer.get("reasoning", None) == reasoning and ("reasoning" in answer) == (reasoning is not None)
    assert usage is not None and usage.items() <= answer["usage"].items() and "reasoning_tokens" not in answer["usage"]


def test_a_stream_relays_reasoning_then_content_then_metadata(fake: FakeGroq, start_service: Any) -> None:
    fake.default = Behaviour(reasoning="Count up. Three words.", reasoning_tokens=5, chunks=3)
    service = start_service(groq_env(fake, LOG_PROMPTS="true"))
    events = stream_and_check(service.client, {"prompt": "Count", "stream": True, "include_reasoning": True})
    assert [json.loads(data) if data != "[DONE]" else data for _, data in events] == [
        {"reasoning": "Count "},
        {"reasoning": "up. "},
        {"reasoning": "Three "},
        {"reasoning": "words."},
        {"content": "t0 "},
        {"content": "t1 "},
        {"content": "t2 "},
        {
            "content": "",
            "model": "openai/gpt-oss-20b",
            "usage": {"prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18, "reasoning_tokens": 5},
            "finish_reason": "stop",
        },
        "[DONE]",
    ]
    [access] = service.access_lines(1)
    assert (access["completion"], access["completion_tokens"]) == ("t0 t1 t2 ", 8)  # the answer, not the reasoning


@pytest.mark.parametrize("ask", [True, False])
def test_reasoning_groq_sends_unasked_is_not_passed_on(service: Service, fake: FakeGroq, ask: bool) -> None:
    """gpt-oss sends its reasoning by default: a request that did not ask gets the answer it always got."""
    fake.default = Behaviour(reasoning="Think first.", reasoning_unasked=True)
    options = {"include_reasoning": True} if ask else {}
    answer = service.client.post("/chat", json={"prompt": "Say hello", **options}).json()
    assert answer.get("reasoning") == ("Think first." if ask else None)
    assert ("reasoning" in answer) is ask
    events = stream_and_check(service.client, {"prompt": "Say hello", "stream": True, **options})
    kinds = [next(iter(json.loads(data))) for _, data in events if data != "[DONE]"]
    assert kinds == (["reasoning"] * 2 if ask else []) + ["content"] * 7
    assert all(request.body.get("include_reasoning") is (True if ask else None) for request in fake.chat_requests())


@pytest.mark.parametrize("ask", [True, False])
def test_a_stream_starts_at_groqs_first_chunk_not_its_first_content(
    service: Service, fake: FakeGroq, ask: bool
) -> None:
    """The fake holds its content until the test has what it needs, or for 2 s: it must be released by the test."""
    gate = threading.Event()
    fake.default = Behaviour(reasoning=REASONING, chunks=2, content_delay=2, content_gate=gate)
    body = {"prompt": "Say hello", "stream": True, "include_reasoning": ask}
    before_content: list[str] = []
    with service.client.stream("POST", "/chat", json=body) as response:
        assert (response.status_code, response.headers["content-type"]) == (200, "text/event-stream")
        lines = response.iter_lines()
        if ask:
            before_content.append(next(line for line in lines if line))
        assert fake.content_waits == []  # the fake is still thinking
        gate.set()
        rest = [line for line in lines if line]
    assert fake.content_waits == ["gate"]
    assert before_content == (['data: {"reasoning": "The "}'] if ask else [])
    assert rest[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in before_content + rest[:-1]]
    assert "".join(e.get("reasoning", "") for e in events) == (REASONING if ask else "")
    assert [e["content"] for e in events if "content" in e] == ["t0 ", "t1 ", ""]


def test_a_client_leaving_while_the_model_thinks_closes_the_upstream_at_once(service: Service, fake: FakeGroq) -> None:
    fake.default = Behaviour(reasoning=REASONING, chunks=2, content_delay=10)
    with service.client.stream("POST", "/chat", json={"prompt": "x", "stream": True, "include_reasoning": True}) as r:
        lines = (line for line in r.iter_lines() if line)
        assert next(lines) == 'data: {"reasoning": "The "}'
        reasoning = "The "
        while reasoning != REASONING:  # all of it: the fake is now holding the answer, as a model still thinking
            reasoning += json.loads(next(lines)[6:])["reasoning"]
        closed_at = time.monotonic()
    assert fake.stream_ended.wait(5)
    [(how, ended_at)] = fake.stream_ends
    assert (how, fake.content_waits) == ("client_closed", ["client_closed"])
    assert ended_at - closed_at < 1.0
    [access] = service.access_lines(1)
    assert (access["status"], access["disconnected"]) == (200, True)
    assert service.app.state.service.in_flight == 0


@pytest.mark.parametrize(
    ("behaviour", "env", "error_type"),
    [
        (Behaviour(error_event_after=0, chunks=3), {}, "upstream_error"),
        (Behaviour(drop_after=0, chunks=3), {}, "upstream_error"),
        (Behaviour(stall_after=0, chunks=3), {"GROQ_STREAM_IDLE_TIMEOUT": "0.3"}, "upstream_timeout"),
    ],
)
def test_a_failure_after_groqs_first_chunk_ends_the_started_stream(
    fake: FakeGroq, start_service: Any, behaviour: Behaviour, env: dict[str, str], error_type: str
) -> None:
    fake.default = behaviour
    service = start_service(groq_env(fake, **env))
    [(name, data)] = stream_and_check(service.client, {"prompt": "Count", "stream": True})
    assert (name, json.loads(data)["error"]["type"]) == ("error", error_type)
    [access] = service.access_lines(1)
    assert (access["status"], access["error"]) == (200, error_type)
    assert service.app.state.service.in_flight == 0


def test_json_mode_content_round_trips_through_json_loads(service: Service, fake: FakeGroq) -> None:
    fake.default = Behaviour(content=JSON_TEXT)
    body = {"prompt": "Reply in JSON", "response_format": {"type": "json_object"}}
    answer = service.client.post("/chat", json=body).json()
    assert json.loads(answer["content"]) == {"answer": 42, "items": ["a b", "c"], "ok": True}
    events = stream_and_check(service.client, {**body, "stream": True})
    streamed = "".join(json.loads(data).get("content", "") for _, data in events if data != "[DONE]")
    assert json.loads(streamed) == json.loads(JSON_TEXT)
    assert [r.body["response_format"] for r in fake.chat_requests()] == [{"type": "json_object"}] * 2


BUSY = {"message": "Flex tier capacity exceeded. You can try again later.", "type": "capacity_exceeded"}


@pytest.mark.parametrize(("headers", "retry_after"), [({"retry-after": "2"}, "2"), ({}, None)])
@pytest.mark.parametrize("stream", [False, True])
def test_groq_498_is_503_upstream_busy_on_chat(
    service: Service, fake: FakeGroq, headers: dict[str, str], retry_after: str | None, stream: bool
) -> None:
    fake.default = Behaviour(status=498, error=BUSY, headers=headers)
    response = service.client.post("/chat", json={"prompt": "x", "service_tier": "flex", "stream": stream})
    error = assert_error(response, 503, "upstream_busy")
    assert error["message"] == "Groq's flex tier is at capacity (HTTP 498); retry later, or use another service_tier."
    assert response.headers.get("retry-after") == retry_after
    assert service.access_lines(1)[0]["error"] == "upstream_busy"


@pytest.mark.parametrize("path", ["/openai/v1/chat/completions", "/v1/chat/completions"])
def test_groq_498_is_503_upstream_busy_on_the_sdk_routes(service: Service, fake: FakeGroq, path: str) -> None:
    fake.default = Behaviour(status=498, error=BUSY, headers={"retry-after": "2"})
    body = {"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "x"}], "service_tier": "flex"}
    response = service.client.post(path, json=body, headers={"authorization": "Bearer any"})
    assert (response.status_code, response.headers["retry-after"]) == (503, "2")
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("upstream_busy", "upstream_busy")


def test_the_groq_sdk_retries_a_busy_flex_tier_through_the_service(service: Service, fake: FakeGroq) -> None:
    fake.default = Behaviour(status=498, error=BUSY, headers={"retry-after": "1"}, fail_times=1)
    with groq.Groq(base_url=service.url, api_key="any", max_retries=1) as client:
        completion = client.chat.completions.create(
            messages=[{"role": "user", "content": "x"}], model="openai/gpt-oss-20b", service_tier="flex"
        )
    assert completion.choices[0].message.content == "Hello from the fake Groq server."
    assert [r.body["service_tier"] for r in fake.chat_requests()] == ["flex", "flex"]
    assert [line["status"] for line in service.access_lines(2)] == [503, 200]


def test_a_script_stream_yields_the_answer_not_the_reasoning(
    fake: FakeGroq, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    for name, value in groq_env(fake).items():
        monkeypatch.setenv(name, value)
    fake.default = Behaviour(reasoning=REASONING, chunks=2)
    *deltas, final = chat_api.stream_chat_completion([{"role": "user", "content": "hi"}], include_reasoning=True)
    assert deltas == ["t0 ", "t1 "]
    assert isinstance(final, chat_api.ChatResult) and final.reasoning is None
    result = chat_api.chat_completion([{"role": "user", "content": "hi"}], reasoning_format="parsed")
    assert result.reasoning == REASONING
