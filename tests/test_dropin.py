"""The groq and openai SDKs pointed at the service: they keep their code, the service keeps the Groq key."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import groq
import httpx
import openai
import pytest
from conftest import CLIENT_TOKEN, Service, groq_env
from fake_groq import API_KEY, Behaviour, FakeGroq

pytestmark = pytest.mark.both_transports  # every test here runs on httpx and on aiohttp

MESSAGES = [{"role": "user", "content": "Say hello"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture
def proxy(fake: FakeGroq, start_service: Any) -> Service:
    service: Service = start_service(groq_env(fake, SERVICE_API_KEYS=CLIENT_TOKEN))
    return service


def groq_client(service: Service, token: str = CLIENT_TOKEN) -> groq.Groq:
    return groq.Groq(base_url=service.url, api_key=token, max_retries=0)


def openai_client(service: Service, token: str = CLIENT_TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=service.url + "/v1", api_key=token, max_retries=0)


def assert_only_the_service_key_went_upstream(fake: FakeGroq) -> None:
    assert fake.received
    for sent in fake.received:
        assert sent.headers["authorization"] == f"Bearer {API_KEY}"
        assert CLIENT_TOKEN not in json.dumps(sent.headers)


def test_groq_sdk_plain_call(proxy: Service, fake: FakeGroq) -> None:
    with groq_client(proxy) as client:
        completion = client.chat.completions.create(messages=MESSAGES, model="openai/gpt-oss-20b", temperature=0.3)  # type: ignore[arg-type]
    assert completion.choices[0].message.content == "Hello from the fake Groq server."
    assert completion.usage is not None and completion.usage.total_tokens == 17
    assert fake.chat_requests()[0].body == {"messages": MESSAGES, "model": "openai/gpt-oss-20b", "temperature": 0.3}
    assert_only_the_service_key_went_upstream(fake)
    [access] = proxy.access_lines(1)
    assert (access["path"], access["status"], access["prompt_tokens"], access["completion_tokens"]) == (
        "/openai/v1/chat/completions",
        200,
        11,
        6,
    )
    assert access["key_id"]


def test_openai_sdk_plain_call(proxy: Service, fake: FakeGroq) -> None:
    with openai_client(proxy) as client:
        completion = client.chat.completions.create(messages=MESSAGES, model="openai/gpt-oss-120b", max_tokens=20)  # type: ignore[arg-type]
    assert completion.choices[0].message.content == "Hello from the fake Groq server."
    assert completion.model == "openai/gpt-oss-120b"
    assert fake.chat_requests()[0].body["max_tokens"] == 20
    assert_only_the_service_key_went_upstream(fake)
    assert proxy.access_lines(1)[0]["path"] == "/v1/chat/completions"


@pytest.mark.parametrize("sdk", ["groq", "openai"])
def test_streamed_call(proxy: Service, fake: FakeGroq, sdk: str) -> None:
    fake.default = Behaviour(chunks=30)
    client: Any = groq_client(proxy) if sdk == "groq" else openai_client(proxy)
    with client:
        chunks = list(client.chat.completions.create(messages=MESSAGES, model="openai/gpt-oss-20b", stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(f"t{i} " for i in range(30))
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert "stream_options" not in fake.chat_requests()[0].body  # relayed as asked, not rewritten
    [access] = proxy.access_lines(1)
    assert (access["status"], access["completion_tokens"]) == (200, 30)


def test_tool_call_round_trip(proxy: Service, fake: FakeGroq) -> None:
    fake.behaviours["tools/model"] = Behaviour(tool_call={"name": "get_weather", "arguments": '{"city": "Oslo"}'})
    with openai_client(proxy) as client:
        first = client.chat.completions.create(
            messages=MESSAGES,
            model="tools/model",
            tools=[WEATHER_TOOL],
            tool_choice="auto",  # type: ignore[list-item]
        )
        call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
        assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Oslo"}')  # type: ignore[union-attr]
        follow_up = [
            *MESSAGES,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 4}'},
        ]
        second = client.chat.completions.create(messages=follow_up, model="openai/gpt-oss-20b", tools=[WEATHER_TOOL])  # type: ignore[arg-type]
    assert second.choices[0].message.content == "Hello from the fake Groq server."
    sent = fake.chat_requests()
    assert sent[0].body["tools"] == [WEATHER_TOOL] and sent[0].body["tool_choice"] == "auto"
    assert sent[1].body["messages"][1]["tool_calls"][0]["id"] == "call_fake1"
    assert sent[1].body["messages"][2] == {"role": "tool", "tool_call_id": "call_fake1", "content": '{"temp_c": 4}'}


@pytest.mark.parametrize("sdk", ["groq", "openai"])
def test_echoing_the_response_message_back_works(proxy: Service, fake: FakeGroq, sdk: str) -> None:
    """The usual loop appends the response's message object itself, with the nulls Groq sent in it."""
    fake.behaviours["tools/model"] = Behaviour(
        tool_call={"name": "get_weather", "arguments": '{"city": "Oslo"}'},
        message_extra={"function_call": None, "executed_tools": None, "reasoning": None},
    )
    client: Any = groq_client(proxy) if sdk == "groq" else openai_client(proxy)
    with client:
        first = client.chat.completions.create(messages=MESSAGES, model="tools/model", tools=[WEATHER_TOOL])
        message = first.choices[0].message
        follow_up = [*MESSAGES, message, {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "4"}]
        second = client.chat.completions.create(messages=follow_up, model="m", tools=[WEATHER_TOOL])
    assert second.choices[0].message.content == "Hello from the fake Groq server."
    echoed = fake.chat_requests()[1].body["messages"][1]
    assert echoed["role"] == "assistant" and echoed["tool_calls"][0]["id"] == "call_fake1"
    assert all(value is not None for key, value in echoed.items() if key != "content")


def test_streamed_tool_call(proxy: Service, fake: FakeGroq) -> None:
    fake.default = Behaviour(tool_call={"name": "get_weather", "arguments": '{"city": "Oslo"}'})
    with groq_client(proxy) as client:
        chunks = list(client.chat.completions.create(messages=MESSAGES, model="m", tools=[WEATHER_TOOL], stream=True))  # type: ignore[list-item]
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    assert "".join(tc.function.arguments or "" for tc in calls) == '{"city": "Oslo"}'  # type: ignore[union-attr]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_model_list(proxy: Service, fake: FakeGroq, start_service: Any) -> None:
    with groq_client(proxy) as client:
        assert [m.id for m in client.models.list().data] == [
            "openai/gpt-oss-20b",
            "openai/gpt-oss-120b",
            "qwen/qwen3.6-27b",
        ]
    limited = start_service(groq_env(fake, ALLOWED_MODELS="qwen/qwen3.6-27b,openai/gpt-oss-20b"))
    with openai_client(limited) as client:
        assert [m.id for m in client.models.list().data] == ["openai/gpt-oss-20b", "qwen/qwen3.6-27b"]


def test_bad_service_token_is_authentication_error(proxy: Service, fake: FakeGroq) -> None:
    with groq_client(proxy, "wrong") as client, pytest.raises(groq.AuthenticationError) as caught:
        client.chat.completions.create(messages=MESSAGES, model="m")  # type: ignore[arg-type]
    assert caught.value.status_code == 401
    assert caught.value.response.headers["x-request-id"]
    with openai_client(proxy, CLIENT_TOKEN[:-1]) as oclient, pytest.raises(openai.AuthenticationError):
        oclient.models.list()
    assert fake.received == []


GROQ_ERRORS = [
    (
        Behaviour(status=400, error={"message": "decommissioned", "type": "invalid_request_error"}),
        "BadRequestError",
        400,
    ),
    (Behaviour(status=404, error={"message": "no such model", "type": "invalid_request_error"}), "NotFoundError", 404),
    (Behaviour(status=413, error={"message": "too large", "type": "tokens"}), "APIStatusError", 413),
    (Behaviour(status=422, error={"message": "unprocessable", "type": "x"}), "UnprocessableEntityError", 422),
    (
        Behaviour(status=429, error={"message": "rate limit", "type": "tokens"}, headers={"retry-after": "2"}),
        "RateLimitError",
        429,
    ),
    (Behaviour(status=503), "InternalServerError", 503),  # Groq's own status and error object
    (Behaviour(delay=2), "InternalServerError", 504),
]


@pytest.mark.parametrize(("behaviour", "exception", "status"), GROQ_ERRORS)
@pytest.mark.parametrize("sdk", [groq, openai])
def test_each_error_raises_the_matching_sdk_exception(
    fake: FakeGroq, start_service: Any, behaviour: Behaviour, exception: str, status: int, sdk: Any
) -> None:
    fake.default = behaviour
    service = start_service(groq_env(fake, GROQ_TIMEOUT="0.5"))
    client = groq_client(service) if sdk is groq else openai_client(service)
    with client, pytest.raises(getattr(sdk, exception)) as caught:
        client.chat.completions.create(messages=MESSAGES, model="m")  # type: ignore[arg-type]
    assert caught.value.status_code == status
    body = caught.value.body
    error = body if sdk is openai else body["error"]  # type: ignore[index]
    assert set(error) >= {"message", "type", "code"}  # type: ignore[arg-type]
    if behaviour.status != 200:  # Groq's error object, passed on (code and param null when Groq sent none)
        groq_error = behaviour.error or {"message": "fake failure", "type": "internal_server_error"}
        assert error == {"code": None, "param": None, **groq_error, "request_id": error["request_id"]}  # type: ignore[index]
    if status == 429:
        assert caught.value.response.headers["retry-after"] == "2"


def test_sdk_retry_honours_retry_after(fake: FakeGroq, start_service: Any) -> None:
    error = {"message": "rate limit", "type": "tokens"}
    fake.default = Behaviour(status=429, error=error, headers={"retry-after": "1"}, fail_times=1)
    service = start_service(groq_env(fake))
    with groq.Groq(base_url=service.url, api_key="any", max_retries=1) as client:
        completion = client.chat.completions.create(messages=MESSAGES, model="m")  # type: ignore[arg-type]
    assert completion.choices[0].message.content == "Hello from the fake Groq server."
    assert len(fake.chat_requests()) == 2


def test_overload_is_503_with_retry_after(fake: FakeGroq, start_service: Any) -> None:
    gate = threading.Event()  # Groq answers the first call only once the second was refused
    fake.behaviours["slow"] = Behaviour(hold=gate)
    service = start_service(groq_env(fake, MAX_CONCURRENCY="1"))
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(httpx.post, service.url + "/chat", json={"prompt": "hi", "model": "slow"}, timeout=10)
        deadline = time.monotonic() + 10
        while not fake.received:  # the one slot is taken by a request Groq is slow to answer
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with groq_client(service) as client, pytest.raises(groq.InternalServerError) as caught:
            client.chat.completions.create(messages=MESSAGES, model="m")  # type: ignore[arg-type]
        gate.set()
        assert busy.result().status_code == 200
    assert caught.value.status_code == 503 and caught.value.response.headers["retry-after"] == "1"
    assert caught.value.response.json()["error"]["code"] == "overloaded"


def test_mid_stream_error_raises_in_the_sdk(proxy: Service, fake: FakeGroq) -> None:
    fake.default = Behaviour(chunks=10, drop_after=3)
    with groq_client(proxy) as client, pytest.raises(groq.APIError) as caught:
        list(client.chat.completions.create(messages=MESSAGES, model="m", stream=True))  # type: ignore[arg-type]
    assert "closed the connection" in caught.value.message


@pytest.mark.parametrize(
    "extra_body",
    [
        {"api_base": "http://evil.example"},
        {"base_url": "http://evil.example"},
        {"api_key": "x"},
        {"extra_headers": {"Authorization": "Bearer stolen"}},
        {"n": 2},
        {"messages": [{"role": "user", "content": "x", "api_key": "bob"}]},  # `name` is accepted (issue 10)
        {"stream_options": {"include_usage": True, "host": "evil"}},
    ],
)
def test_smuggled_fields_are_refused_before_groq(proxy: Service, fake: FakeGroq, extra_body: dict[str, Any]) -> None:
    with groq_client(proxy) as client, pytest.raises(groq.UnprocessableEntityError) as caught:
        client.chat.completions.create(messages=MESSAGES, model="m", extra_body=extra_body)  # type: ignore[arg-type]
    assert caught.value.body["error"]["type"] == "validation_error"  # type: ignore[index]
    assert fake.received == []


VALID_BODIES = [
    {"response_format": {"type": "json_object"}},
    {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": True},
        }
    },
    {
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "tools": [WEATHER_TOOL],
        "parallel_tool_calls": False,
    },
    {"reasoning_effort": "low", "reasoning_format": "hidden", "user": "u1", "seed": 3, "n": 1, "stop": None},
    {"max_completion_tokens": 10, "top_p": 0.5, "stream_options": None},
    {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "s"}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}},
                ],
            },
        ]
    },
]
INVALID_BODIES = [
    ({"model": None}, "model"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].image_url"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "text": "x"}]}]}, "messages[0].content[0].type"),
    (
        {
            "messages": [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "1", "type": "x", "function": {"name": "f", "arguments": ""}}],
                }
            ]
        },
        "messages[0].tool_calls[0].type",
    ),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"x": float("nan")}}}]},
        "tools[0].function.parameters",
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"d": ["\ud800"]}}}},
        "response_format.json_schema.schema",
    ),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"\udfff": 1}}}]},
        "tools[0].function.parameters",
    ),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"reasoning_effort": "max"}, "reasoning_effort"),
    ({"temperature": 3}, "temperature"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"stream": "true"}, "stream"),
    ({"logprobs": True}, "logprobs"),
    ({"user": 5}, "user"),
]


@pytest.mark.parametrize("extra", VALID_BODIES)
def test_documented_parameters_pass_through(proxy: Service, fake: FakeGroq, extra: dict[str, Any]) -> None:
    body = {"model": "m", "messages": MESSAGES, **extra}
    response = proxy.client.post(
        "/openai/v1/chat/completions", json=body, headers={"authorization": f"Bearer {CLIENT_TOKEN}"}
    )
    assert response.status_code == 200, response.text
    assert fake.chat_requests()[0].body == {k: v for k, v in body.items() if v is not None}


@pytest.mark.parametrize(("extra", "field"), INVALID_BODIES)
def test_invalid_parameters_are_422_naming_the_field(
    proxy: Service, fake: FakeGroq, extra: dict[str, Any], field: str
) -> None:
    body = json.dumps({"model": "m", "messages": MESSAGES, **extra})
    headers = {"authorization": f"Bearer {CLIENT_TOKEN}", "content-type": "application/json"}
    response = proxy.client.post("/v1/chat/completions", content=body, headers=headers)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == error["code"] == "validation_error"
    assert field in [d["field"] for d in error["details"]], error["details"]
    assert fake.received == []


def test_unknown_paths_under_v1_use_the_openai_shape(proxy: Service) -> None:
    response = proxy.client.get("/v1/embeddings", headers={"authorization": f"Bearer {CLIENT_TOKEN}"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_sdks_through_the_process_never_leak_secrets(fake: FakeGroq, start_process: Any) -> None:
    """Started as the README says; the canary: neither secret shows up in any answer or log line."""
    fake.default = Behaviour(chunks=4)
    proc = start_process(groq_env(fake, SERVICE_API_KEYS=CLIENT_TOKEN, LOG_LEVEL="DEBUG", LOG_PROMPTS="true"))
    seen = []
    with groq.Groq(base_url=proc.url, api_key=CLIENT_TOKEN, max_retries=0) as client:
        seen.append(client.chat.completions.create(messages=MESSAGES, model="m").model_dump_json())
        seen += [c.model_dump_json() for c in client.chat.completions.create(messages=MESSAGES, model="m", stream=True)]
        seen.append(client.models.list().model_dump_json())
    with openai.OpenAI(base_url=proc.url + "/v1", api_key=CLIENT_TOKEN, max_retries=0) as oclient:
        seen.append(
            oclient.chat.completions.create(
                messages=[{"role": "user", "content": API_KEY}], model="m"
            ).model_dump_json()
        )  # type: ignore[list-item]
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            oclient.chat.completions.create(messages=MESSAGES, model="m", extra_body={"api_key": API_KEY})  # type: ignore[arg-type]
        seen.append(json.dumps(caught.value.body))
    for bad in ("wrong", CLIENT_TOKEN + "x"):
        seen.append(httpx.get(proc.url + "/v1/models", headers={"authorization": f"Bearer {bad}"}).text)
    assert proc.stop() == 0
    logs = "\n".join(proc.lines)
    for text in [*seen, logs]:
        assert API_KEY not in text and CLIENT_TOKEN not in text
    assert_only_the_service_key_went_upstream(fake)
    access = [line for line in proc.json_lines() if line["msg"] == "request" and line["path"] != "/"]
    assert [line["status"] for line in access] == [200, 200, 200, 200, 422, 401, 401]
