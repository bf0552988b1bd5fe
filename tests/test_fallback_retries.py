"""FALLBACK_MODELS never makes a failure worse: what the SDK retries (but is no fallback's trigger) is still retried."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import groq_env
from fake_groq import Behaviour, FakeGroq, groq_error
from test_chat import assert_error
from test_fallback import ASK_A, A, B, fallback_fields, models_asked
from test_streaming import sse_events

FAST_RETRY = {"retry-after-ms": "1"}  # the SDK waits 1 ms before each retry instead of its backoff


def retry_counts(fake: FakeGroq) -> list[str]:
    return [r.headers["x-stainless-retry-count"] for r in fake.chat_requests()]


@pytest.mark.parametrize("fallbacks", [{}, {"FALLBACK_MODELS": f"{A}>{B}"}], ids=["alone", "with_fallback"])
@pytest.mark.parametrize("status", [408, 409, 504, 520])
def test_a_failure_the_sdk_retries_is_retried_with_a_fallback_as_without(
    fake: FakeGroq, start_service: Any, status: int, fallbacks: dict[str, str]
) -> None:
    fake.behaviours[A] = groq_error(status, A, fail_times=1, headers=FAST_RETRY)
    service = start_service(groq_env(fake, GROQ_MAX_RETRIES="2", **fallbacks))
    response = service.client.post("/chat", json=ASK_A)
    assert (response.status_code, response.json()["model"]) == (200, A), response.text
    assert models_asked(fake) == [A, A]
    assert fallback_fields(service.access_lines(1)[0]) == (None, None)


@pytest.mark.parametrize("status", [408, 504])
def test_a_stream_the_sdk_retries_is_retried_with_a_fallback(fake: FakeGroq, start_service: Any, status: int) -> None:
    fake.behaviours[A] = groq_error(status, A, fail_times=1, headers=FAST_RETRY)
    service = start_service(groq_env(fake, GROQ_MAX_RETRIES="2", FALLBACK_MODELS=f"{A}>{B}"))
    response = service.client.post("/chat", json={**ASK_A, "stream": True})
    events = sse_events(response.text)
    assert (response.status_code, events[-1], json.loads(events[-2][1])["model"]) == (200, ("message", "[DONE]"), A)
    assert models_asked(fake) == [A, A]
    assert fallback_fields(service.access_lines(1)[0]) == (None, None)


def test_a_model_that_keeps_failing_gets_its_retries_then_its_error_without_fallback(
    fake: FakeGroq, start_service: Any
) -> None:
    fake.behaviours[A] = groq_error(504, A, headers=FAST_RETRY)
    service = start_service(groq_env(fake, GROQ_MAX_RETRIES="2", FALLBACK_MODELS=f"{A}>{B}"))
    assert_error(service.client.post("/chat", json=ASK_A), 502, "upstream_error")
    # Once without the SDK's retries (a 429 would have gone on at once), then again with them: B is never asked.
    assert models_asked(fake) == [A, A, A, A]
    assert retry_counts(fake) == ["0", "0", "1", "2"]
    [access] = service.access_lines(1)
    assert (access["model"], access["error"], *fallback_fields(access)) == (A, "upstream_error", None, None)


@pytest.mark.parametrize(
    ("status", "headers", "retries", "asked", "answer"),
    [
        (504, {"x-should-retry": "false"}, "2", [A], 502),  # Groq says not to retry: the SDK would not
        (400, {"x-should-retry": "true"}, "2", [A, A], 200),  # Groq says to retry a 400: the SDK would
        (504, FAST_RETRY, "0", [A], 502),  # GROQ_MAX_RETRIES=0: no retry with or without a fallback
        (404, FAST_RETRY, "2", [A], 404),  # the SDK never retries a 404, nor falls back
    ],
)
def test_the_model_is_called_again_exactly_when_the_sdk_would_retry(
    fake: FakeGroq,
    start_service: Any,
    status: int,
    headers: dict[str, str],
    retries: str,
    asked: list[str],
    answer: int,
) -> None:
    fake.behaviours[A] = groq_error(status, A, fail_times=1, headers=headers)
    service = start_service(groq_env(fake, GROQ_MAX_RETRIES=retries, FALLBACK_MODELS=f"{A}>{B}"))
    assert service.client.post("/chat", json=ASK_A).status_code == answer
    assert models_asked(fake) == asked


def test_the_retries_keep_the_one_groq_timeout(fake: FakeGroq, start_service: Any) -> None:
    """Each 504 comes 0.3 s after its call: GROQ_TIMEOUT=2 ends the retries, as it would without a fallback (the
    second call starts 1.7 s before the deadline, so a busy machine still gets there)."""
    fake.behaviours[A] = groq_error(504, A, delay=0.3, headers=FAST_RETRY)
    service = start_service(groq_env(fake, GROQ_MAX_RETRIES="10", GROQ_TIMEOUT="2", FALLBACK_MODELS=f"{A}>{B}"))
    assert_error(service.client.post("/chat", json=ASK_A), 504, "upstream_timeout")
    assert set(models_asked(fake)) == {A}
    assert 2 <= len(models_asked(fake)) <= 7


def test_no_connection_still_goes_on_at_once_when_retries_are_set(fake: FakeGroq, start_service: Any) -> None:
    fake.behaviours[A] = Behaviour(hang_up=True)
    service = start_service(groq_env(fake, GROQ_MAX_RETRIES="2", FALLBACK_MODELS=f"{A}>{B}"))
    response = service.client.post("/chat", json=ASK_A)
    assert (response.status_code, response.json()["model"]) == (200, B)
    assert models_asked(fake) == [A, B]
