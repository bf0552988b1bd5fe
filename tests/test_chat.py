"""The /, /healthz, /readyz and /chat contract, over a real socket, against the fake Groq server."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from conftest import Service, groq_env
from fake_groq import API_KEY, Behaviour, FakeGroq

pytestmark = pytest.mark.both_transports  # every test here runs on httpx and on aiohttp

PROMPT = {"prompt": "Say hello"}


def assert_error(response: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["type"] == error_type
    assert isinstance(error["message"], str) and error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    assert set(error) <= {"type", "message", "request_id", "details"}
    return dict(error)


def test_status_endpoints(service: Service) -> None:
    assert service.client.get("/").json() == {"status": "ok", "service": "Groq Starlette Service"}
    assert service.client.get("/healthz").json() == {"status": "ok", "model": "openai/gpt-oss-20b"}
    assert service.client.get("/readyz").json() == {"status": "ready"}


def test_healthz_reports_configured_model_without_calling_groq(fake: FakeGroq, start_service: Any) -> None:
    service = start_service(groq_env(fake, GROQ_MODEL="qwen/qwen3.6-27b"))
    assert service.client.get("/healthz").json() == {"status": "ok", "model": "qwen/qwen3.6-27b"}
    assert fake.received == []


def test_without_key_chat_is_not_configured_and_not_ready(fake: FakeGroq, start_service: Any) -> None:
    service = start_service({"GROQ_BASE_URL": fake.url})
    assert service.client.get("/").status_code == 200
    ready = service.client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"status": "not_ready", "reason": "GROQ_API_KEY is not set"}
    assert_error(service.client.post("/chat", json=PROMPT), 503, "not_configured")
    warnings = [line for line in service.log_lines() if line["level"] == "WARNING" and "GROQ_API_KEY" in line["msg"]]
    assert len(warnings) == 1
    assert fake.received == []


def test_prompt_reaches_groq_and_answer_comes_back(service: Service, fake: FakeGroq) -> None:
    response = service.client.post("/chat", json={"prompt": "Say hello", "system_prompt": "Be brief"})
    assert response.status_code == 200
    assert response.json() == {
        "content": "Hello from the fake Groq server.",
        "model": "openai/gpt-oss-20b",
        "usage": {"prompt_tokens": 13, "completion_tokens": 6, "total_tokens": 19},
        "finish_reason": "stop",
    }
    [sent] = fake.chat_requests()
    assert sent.body == {
        "messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Say hello"}],
        "model": "openai/gpt-oss-20b",
    }
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"


def test_messages_model_and_parameters_are_forwarded(service: Service, fake: FakeGroq) -> None:
    body = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "And now?"},
        ],
        "system_prompt": "Be brief",
        "model": "qwen/qwen3.6-27b",
        "temperature": 0.2,
        "top_p": 1,
        "max_tokens": 64,
        "stop": ["\n", "END"],
        "seed": -7,
    }
    response = service.client.post("/chat", json=body)
    assert response.status_code == 200
    assert response.json()["model"] == "qwen/qwen3.6-27b"
    [sent] = fake.chat_requests()
    forwarded = {k: v for k, v in body.items() if k not in ("messages", "system_prompt")}
    assert sent.body == {"messages": [{"role": "system", "content": "Be brief"}, *body["messages"]], **forwarded}


def test_charset_parameter_is_accepted(service: Service) -> None:
    response = service.client.post(
        "/chat", content=json.dumps(PROMPT), headers={"content-type": "application/json; charset=utf-8"}
    )
    assert response.status_code == 200


INVALID_BODIES = [
    ({}, "prompt"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": "\ud800"}, "prompt"),
    ({"promt": "typo"}, "promt"),
    ({"prompt": "a", "api_key": "x"}, "api_key"),
    ({"prompt": "a", "base_url": "http://evil"}, "base_url"),
    ({"prompt": "a", "system_prompt": ""}, "system_prompt"),
    ({"prompt": "a", "system_prompt": ["x"]}, "system_prompt"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": ""}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x", "name": "n"}]}, "messages[0].name"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "user"}]}, "messages[1].content"),
    ({"prompt": "a", "model": ""}, "model"),
    ({"prompt": "a", "model": "x" * 129}, "model"),
    ({"prompt": "a", "model": "bad model"}, "model"),
    ({"prompt": "a", "model": "../../etc?x=1"}, "model"),
    ({"prompt": "a", "model": 7}, "model"),
    ({"prompt": "a", "temperature": 2.5}, "temperature"),
    ({"prompt": "a", "temperature": -0.1}, "temperature"),
    ({"prompt": "a", "temperature": True}, "temperature"),
    ({"prompt": "a", "temperature": "0.5"}, "temperature"),
    ({"prompt": "a", "top_p": 1.5}, "top_p"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 131073}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 1.5}, "max_tokens"),
    ({"prompt": "a", "max_tokens": False}, "max_tokens"),
    ({"prompt": "a", "stop": []}, "stop"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "a", "stop": [1]}, "stop[0]"),
    ({"prompt": "a", "stop": 3}, "stop"),
    ({"prompt": "a", "seed": 1.0}, "seed"),
    ({"prompt": "a", "seed": 2**64}, "seed"),
    ({"prompt": "a", "stream": "yes"}, "stream"),
]


@pytest.mark.parametrize(("body", "field"), INVALID_BODIES)
def test_invalid_fields_are_422_naming_the_field(service: Service, fake: FakeGroq, body: Any, field: str) -> None:
    response = service.client.post("/chat", content=json.dumps(body), headers={"content-type": "application/json"})
    error = assert_error(response, 422, "validation_error")
    assert field in [d["field"] for d in error["details"]]
    assert all(set(d) == {"field", "message"} and d["message"] for d in error["details"])
    assert fake.received == []


@pytest.mark.parametrize(
    "raw",
    [
        '{"prompt": "a", "temperature": NaN}',
        '{"prompt": "a", "temperature": Infinity}',
        '{"prompt": "a", "seed": -Infinity}',
    ],
)
def test_non_finite_numbers_are_rejected(service: Service, fake: FakeGroq, raw: str) -> None:
    response = service.client.post("/chat", content=raw, headers={"content-type": "application/json"})
    assert_error(response, 422, "validation_error")
    assert fake.received == []


def test_every_field_error_is_reported_at_once(service: Service) -> None:
    body = {"promt": "x", "temperature": 3, "messages": [{"role": "bot", "content": ""}]}
    error = assert_error(service.client.post("/chat", json=body), 422, "validation_error")
    fields = {d["field"] for d in error["details"]}
    assert {"promt", "temperature", "messages[0].role", "messages[0].content"} <= fields


@pytest.mark.parametrize(
    ("content", "status", "error_type"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (b'"prompt"', 400, "invalid_json"),
        (b"\xff\xfe", 400, "invalid_json"),
        (b"[" * 100_000 + b"]" * 100_000, 422, "validation_error"),  # valid JSON, deeper than the service parses
    ],
)
def test_bodies_that_are_not_a_json_object(service: Service, content: bytes, status: int, error_type: str) -> None:
    response = service.client.post("/chat", content=content, headers={"content-type": "application/json"})
    assert_error(response, status, error_type)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"content-type": "text/plain"},
        {"content-type": "application/x-www-form-urlencoded"},
        {"content-type": "application/jsonx"},
    ],
)
def test_other_media_types_are_415(service: Service, headers: dict[str, str]) -> None:
    response = service.client.post("/chat", content=json.dumps(PROMPT), headers=headers)
    assert_error(response, 415, "unsupported_media_type")


def test_unknown_path_and_wrong_method(service: Service) -> None:
    assert_error(service.client.get("/nope"), 404, "not_found")
    response = service.client.get("/chat")
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"
    assert_error(service.client.post("/healthz"), 405, "method_not_allowed")


@pytest.mark.parametrize(
    ("given", "kept"),
    [("abc-123_X.y", True), ("x" * 128, True), ("x" * 129, False), ("bad id", False), ("a/b", False), ("", False)],
)
def test_request_id_is_echoed_only_when_well_formed(service: Service, given: str, kept: bool) -> None:
    response = service.client.get("/healthz", headers={"x-request-id": given})
    if kept:
        assert response.headers["x-request-id"] == given
    else:
        assert response.headers["x-request-id"] != given
        assert len(response.headers["x-request-id"]) == 32
    assert service.access_lines(1)[-1]["request_id"] == response.headers["x-request-id"]


GROQ_FAILURES = [
    # (what the fake answers, our status, our type, Groq's message shown to the client)
    (
        Behaviour(
            status=400,
            error={
                "message": "The model `llama3-8b-8192` has been decommissioned.",
                "type": "invalid_request_error",
                "code": "model_decommissioned",
            },
        ),
        400,
        "upstream_rejected",
        True,
    ),
    (
        Behaviour(
            status=404,
            error={
                "message": "The model `x` does not exist or you do not have access to it.",
                "type": "invalid_request_error",
                "code": "model_not_found",
            },
        ),
        404,
        "upstream_rejected",
        True,
    ),
    (
        Behaviour(
            status=413,
            error={
                "message": "Request too large for model on tokens per minute (TPM)",
                "type": "tokens",
                "code": "rate_limit_exceeded",
            },
        ),
        413,
        "upstream_rejected",
        True,
    ),
    (
        Behaviour(
            status=422, error={"message": "Please reduce the length of the messages.", "type": "invalid_request_error"}
        ),
        422,
        "upstream_rejected",
        True,
    ),
    (
        Behaviour(
            status=401, error={"message": "Invalid API Key", "type": "invalid_request_error", "code": "invalid_api_key"}
        ),
        502,
        "upstream_auth",
        False,
    ),
    (Behaviour(status=403, raw_body=b"<html>Please enable cookies</html>"), 502, "upstream_auth", False),
    (
        Behaviour(
            status=429,
            error={
                "message": "Rate limit reached for model. Please try again in 7s.",
                "type": "tokens",
                "code": "rate_limit_exceeded",
            },
            headers={"retry-after": "7"},
        ),
        429,
        "rate_limited",
        True,
    ),
    (
        Behaviour(status=500, error={"message": "Internal Server Error", "type": "internal_server_error"}),
        502,
        "upstream_error",
        False,
    ),
    (Behaviour(status=502, raw_body=b"Bad Gateway"), 502, "upstream_error", False),
    (
        Behaviour(status=503, error={"message": "Service Unavailable", "type": "internal_server_error"}),
        502,
        "upstream_error",
        False,
    ),
    (
        Behaviour(status=498, error={"message": "Flex tier capacity exceeded", "type": "capacity_exceeded"}),
        503,
        "upstream_busy",
        False,
    ),
    (Behaviour(status=418, error={"message": "teapot", "type": "x"}), 502, "upstream_error", False),
    (Behaviour(raw_body=b"not json at all"), 502, "upstream_error", False),
    (Behaviour(raw_body=b'{"id": "x", "choices": []}'), 502, "upstream_error", False),
    (Behaviour(raw_body=b'{"model": "m", "choices": [{"message": {"content": 5}}]}'), 502, "upstream_error", False),
]


@pytest.mark.parametrize(("behaviour", "status", "error_type", "shows_groq_message"), GROQ_FAILURES)
def test_groq_failures_map_to_one_error_table(
    service: Service, fake: FakeGroq, behaviour: Behaviour, status: int, error_type: str, shows_groq_message: bool
) -> None:
    fake.behaviours["fail/model"] = behaviour
    response = service.client.post("/chat", json={"prompt": "x", "model": "fail/model"})
    error = assert_error(response, status, error_type)
    if shows_groq_message:
        assert error["message"] == behaviour.error["message"]  # type: ignore[index]
    if status == 429:
        assert response.headers["retry-after"] == "7"
    access = service.access_lines(1)[-1]
    assert (access["status"], access["error"], access["model"]) == (status, error_type, "fail/model")


def test_groq_unreachable_is_502(fake: FakeGroq, start_service: Any) -> None:
    from conftest import free_port

    service = start_service(groq_env(fake, GROQ_BASE_URL=f"http://127.0.0.1:{free_port()}"))
    assert_error(service.client.post("/chat", json=PROMPT), 502, "upstream_unreachable")


def test_deadline_covers_the_whole_call_and_gives_504(fake: FakeGroq, start_service: Any) -> None:
    fake.default = Behaviour(status=503, headers={"retry-after-ms": "300"})
    service = start_service(groq_env(fake, GROQ_TIMEOUT="0.5", GROQ_MAX_RETRIES="5"))
    assert_error(service.client.post("/chat", json=PROMPT), 504, "upstream_timeout")
    assert 1 <= len(fake.chat_requests()) <= 3  # retries were cut short by the one deadline


def test_slow_groq_gives_504(fake: FakeGroq, start_service: Any) -> None:
    fake.default = Behaviour(delay=2)
    service = start_service(groq_env(fake, GROQ_TIMEOUT="0.3"))
    assert_error(service.client.post("/chat", json=PROMPT), 504, "upstream_timeout")


def test_sdk_retries_transient_failures(fake: FakeGroq, start_service: Any) -> None:
    fake.default = Behaviour(status=503, fail_times=2, headers={"retry-after-ms": "1"})
    service = start_service(groq_env(fake, GROQ_MAX_RETRIES="2"))
    response = service.client.post("/chat", json=PROMPT)
    assert response.status_code == 200
    assert len(fake.chat_requests()) == 3


def test_one_access_line_per_request_with_its_fields(service: Service) -> None:
    response = service.client.post("/chat", json=PROMPT, headers={"x-request-id": "trace-1"})
    assert response.status_code == 200
    service.client.post("/chat", json={"prompt": 1}, headers={"x-request-id": "trace-2"})
    lines = service.access_lines(2)
    assert [line["request_id"] for line in lines] == ["trace-1", "trace-2"]
    ok, bad = lines
    assert {"ts", "level", "logger", "msg", "method", "path", "status", "duration_ms", "client"} <= set(ok)
    assert (ok["method"], ok["path"], ok["status"], ok["model"]) == ("POST", "/chat", 200, "openai/gpt-oss-20b")
    assert (ok["prompt_tokens"], ok["completion_tokens"]) == (11, 6)
    assert ok["upstream_ms"] >= 0 and ok["duration_ms"] >= ok["upstream_ms"]
    assert ok["client"].startswith("127.0.0.1:")
    assert ok["ts"].endswith("Z") and "error" not in ok
    assert (bad["status"], bad["error"]) == (422, "validation_error")
    assert "Say hello" not in service.log_text()  # no prompt text unless LOG_PROMPTS
    assert "Hello from the fake" not in service.log_text()


def test_groq_key_never_appears_in_responses_or_logs(fake: FakeGroq, start_service: Any) -> None:
    service = start_service(groq_env(fake, LOG_LEVEL="DEBUG"))
    for i, (behaviour, *_) in enumerate(GROQ_FAILURES):
        fake.behaviours[f"fail/{i}"] = behaviour
    bodies: list[bytes] = []
    for i in range(len(GROQ_FAILURES)):
        bodies.append(service.client.post("/chat", json={"prompt": API_KEY, "model": f"fail/{i}"}).content)
    for body, _ in INVALID_BODIES:
        content = json.dumps({**body, "api_key": API_KEY})
        bodies.append(
            service.client.post("/chat", content=content, headers={"content-type": "application/json"}).content
        )
    bodies.append(service.client.post("/chat", json=PROMPT).content)
    responses = b"\n".join(bodies).decode()
    assert API_KEY not in responses
    assert API_KEY not in service.log_text()
    assert len(service.access_lines(len(bodies))) == len(bodies)


def test_unexpected_errors_are_a_fixed_500(service: Service, fake: FakeGroq) -> None:
    # A body Groq answers with that makes our own code fail unexpectedly is impossible to craft on
    # purpose, so break the upstream client itself: the 500 must still be the envelope.
    service.app.state.service.upstream = object()
    error = assert_error(service.client.post("/chat", json=PROMPT), 500, "internal_error")
    assert "object" not in error["message"] and "Traceback" not in error["message"]
    [line] = [line for line in service.log_lines() if line["msg"] == "unhandled error"]
    assert "Traceback" in line["exc"] and line["request_id"] == error["request_id"]
