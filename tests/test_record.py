"""The request record: the access line is a pure function of it (record.access_line), with the field names,
values and presence rules the line had when it was a dict; and the quota settles from the record's Groq usage."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import CLIENT_TOKEN, groq_env
from fake_groq import FakeGroq
from test_quota import reserved, usage_tokens

from record import Record, access_line

TOKEN = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
# The fields of the line after RequestLog, in the order they are written (logging_config adds ts ... request_id).
ALWAYS = ["method", "path", "status", "client"]


def test_a_fully_set_record_renders_every_field_in_its_fixed_order() -> None:
    record = Record(
        "POST",
        "/v1/chat/completions",
        "127.0.0.1:40000",
        request_id="req-1",
        status=503,
        key="batch",
        key_id="0123abcd",  # Authorize sets one of the two; the renderer shows whichever is set
        call_model="a/asked",
        model="b/answered",
        stream=True,
        call_started_ms=7.5,  # for metrics only: never on the line
        messages=[{"role": "user", "content": "hi"}],
        completion="Hello",
        fallback_from="a/asked",
        attempts=2,
        upstream_ms=12.25,
        usage_reported=True,
        prompt_tokens=11,
        completion_tokens=6,
        charged_tokens=17,
        quota="tokens_per_minute",
        error="shutting_down",
        disconnected=True,
        duration_ms=30.5,
    )
    line = access_line(record)
    assert line == {
        "request_id": "req-1",
        "method": "POST",
        "path": "/v1/chat/completions",
        "status": 503,
        "client": "127.0.0.1:40000",
        "key": "batch",
        "key_id": "0123abcd",
        "model": "b/answered",
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
        "completion": "Hello",
        "fallback_from": "a/asked",
        "attempts": 2,
        "upstream_ms": 12.25,
        "prompt_tokens": 11,
        "completion_tokens": 6,
        "charged_tokens": 17,
        "quota": "tokens_per_minute",
        "error": "shutting_down",
        "disconnected": True,
        "duration_ms": 30.5,
    }
    assert list(line)[:5] == ["request_id", *ALWAYS] and list(line)[-1] == "duration_ms"


def test_a_minimal_record_renders_only_what_every_line_has() -> None:
    assert access_line(Record("GET", "/healthz", None)) == {
        "method": "GET",
        "path": "/healthz",
        "status": 500,  # until the server takes a status
        "client": None,
        "duration_ms": 0.0,
    }


def test_a_request_refused_before_its_head_was_parsed_has_no_method_or_path() -> None:
    record = Record(None, None, "127.0.0.1:40000", status=400, error="invalid_request", duration_ms=1.25)
    assert access_line(record) == {
        "status": 400,
        "client": "127.0.0.1:40000",
        "error": "invalid_request",
        "duration_ms": 1.25,
    }


@pytest.mark.parametrize(
    ("attributes", "shown"),
    [
        ({"call_model": "a/asked"}, {"model": "a/asked"}),  # Groq named no model: the one asked for
        ({"call_model": "a/asked", "model": "b/named"}, {"model": "b/named"}),
        ({"stream": False, "disconnected": False}, {}),  # false flags are left out, not written as false
        ({"usage_reported": True}, {"prompt_tokens": None, "completion_tokens": None}),  # a usage without counts
        ({"prompt_tokens": "11"}, {}),  # no usage reported: no counts shown
        # A relayed body's counts, as Groq sent them (the quota and metrics do not believe them).
        (
            {"usage_reported": True, "prompt_tokens": "11", "completion_tokens": -1},
            {"prompt_tokens": "11", "completion_tokens": -1},
        ),
        ({"charged_tokens": 0, "key_id": "0123abcd"}, {"key_id": "0123abcd", "charged_tokens": 0}),
    ],
)
def test_each_optional_field_is_shown_only_once_set(attributes: dict[str, Any], shown: dict[str, Any]) -> None:
    line = access_line(Record("POST", "/chat", None, **attributes))
    assert line == {"method": "POST", "path": "/chat", "status": 500, "client": None, **shown, "duration_ms": 0.0}


def _fields(line: dict[str, Any]) -> list[str]:
    return [name for name in line if name not in ("ts", "level", "logger", "msg", "request_id")]


def test_the_quota_charges_groq_usage_from_the_record_and_the_line_keeps_its_fields(
    fake: FakeGroq, start_service: Any
) -> None:
    """Through real requests: the settlement books Groq's usage, the line shows it under the same names."""
    service = start_service(groq_env(fake, SERVICE_API_KEYS=CLIENT_TOKEN, QUOTA_TOKENS_PER_MINUTE="2000"))
    answer = service.client.post("/chat", json={"prompt": "hi", "max_tokens": 100}, headers=TOKEN)
    assert answer.status_code == 200
    used = answer.json()["usage"]["total_tokens"]
    assert used == usage_tokens(fake)
    body = {"model": "openai/gpt-oss-20b", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with service.client.stream("POST", "/v1/chat/completions", json=body, headers=TOKEN) as streamed:
        assert streamed.status_code == 200
        streamed.read()
    refused = service.client.post("/chat", json={"prompt": "hi", "max_tokens": 1990}, headers=TOKEN)
    assert refused.status_code == 429
    plain, stream, over = service.access_lines(3)
    assert _fields(plain) == [
        *ALWAYS,
        "key_id",
        "model",
        "upstream_ms",
        "prompt_tokens",
        "completion_tokens",
        "charged_tokens",
        "duration_ms",
    ]
    assert plain["charged_tokens"] == plain["prompt_tokens"] + plain["completion_tokens"] == used
    assert _fields(stream) == [
        *ALWAYS,
        "key_id",
        "model",
        "stream",
        "upstream_ms",
        "prompt_tokens",
        "completion_tokens",
        "charged_tokens",
        "duration_ms",
    ]
    assert stream["charged_tokens"] == usage_tokens(fake) != reserved(body)
    assert _fields(over) == [*ALWAYS, "key_id", "model", "quota", "error", "duration_ms"]
    assert (over["status"], over["quota"], over["error"]) == (429, "tokens_per_minute", "quota_exceeded")
