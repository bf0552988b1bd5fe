"""Issue 24: what the SDKs send back and expect, through the real openai and groq SDKs to the fake Groq.

The openai SDK's own answer objects sent back as the next turn's messages, `null` for unset nested fields,
`models.retrieve`, Groq's own error objects on the SDK routes, and Groq's x-ratelimit-* headers passed on.
"""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path
from typing import Any

import groq
import httpx
import openai
import pydantic
import pytest
from conftest import CLIENT_TOKEN, Service, groq_env
from fake_groq import API_KEY, MODELS, RATE_HEADERS, Behaviour, FakeGroq, groq_error

pytestmark = pytest.mark.both_transports  # every test here runs on httpx and on aiohttp

MODEL = "openai/gpt-oss-20b"
MESSAGES = [{"role": "user", "content": "Weather in Oslo?"}]
AUTH = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
CALL = {"id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}
GROQ_LIMITS = {k: v for k, v in RATE_HEADERS.items() if k.startswith("x-ratelimit-")}  # the fake sends on all


class GetWeather(pydantic.BaseModel):
    city: str


class Weather(pydantic.BaseModel):
    city: str
    temp_c: int


@pytest.fixture
def proxy(fake: FakeGroq, start_service: Any) -> Service:
    service: Service = start_service(groq_env(fake, SERVICE_API_KEYS=CLIENT_TOKEN))
    return service


def openai_client(service: Service) -> openai.OpenAI:
    return openai.OpenAI(base_url=service.url + "/v1", api_key=CLIENT_TOKEN, max_retries=0)


def groq_client(service: Service) -> groq.Groq:
    return groq.Groq(base_url=service.url, api_key=CLIENT_TOKEN, max_retries=0)


def sent_messages(fake: FakeGroq, call: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = fake.chat_requests()[call].body["messages"]
    return messages


# Item 1: the openai SDK's own messages, sent back.


def test_stream_final_message_sent_back_with_a_tool_result(proxy: Service, fake: FakeGroq) -> None:
    fake.behaviours["tools"] = Behaviour(tool_call={"name": "GetWeather", "arguments": '{"city": "Oslo"}'})
    with openai_client(proxy) as client:
        tool = openai.pydantic_function_tool(GetWeather)
        with client.chat.completions.stream(model="tools", messages=MESSAGES, tools=[tool]) as stream:  # type: ignore[arg-type]
            final = stream.get_final_completion()
        message = final.choices[0].message
        [call] = message.tool_calls or []
        assert (call.index, call.function.parsed_arguments) == (0, GetWeather(city="Oslo"))  # the SDK's bookkeeping
        follow_up = [*MESSAGES, message, {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 4}'}]
        answer = client.chat.completions.create(model=MODEL, messages=follow_up)  # type: ignore[arg-type]
    assert answer.choices[0].message.content == "Hello from the fake Groq server."
    sent = fake.chat_requests()[1].body
    assert sent["messages"][1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_fake1",
                "type": "function",
                "function": {"name": "GetWeather", "arguments": '{"city": "Oslo"}'},
            }
        ],
    }
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": "call_fake1", "content": '{"temp_c": 4}'}


# The openai SDK warns when it dumps its own ParsedChatCompletionMessage[Weather] (its `parsed` field is typed None).
@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning")
def test_parse_with_a_pydantic_model_and_its_message_sent_back(proxy: Service, fake: FakeGroq) -> None:
    fake.behaviours[MODEL] = Behaviour(content='{"city": "Oslo", "temp_c": 4}')
    with openai_client(proxy) as client:
        parsed = client.chat.completions.parse(model=MODEL, messages=MESSAGES, response_format=Weather)  # type: ignore[arg-type]
        message = parsed.choices[0].message
        assert message.parsed == Weather(city="Oslo", temp_c=4)
        follow_up = [*MESSAGES, message, {"role": "user", "content": "And tomorrow?"}]
        client.chat.completions.create(model=MODEL, messages=follow_up)  # type: ignore[arg-type]
    response_format = fake.chat_requests()[0].body["response_format"]
    assert response_format["type"] == "json_schema" and response_format["json_schema"]["name"] == "Weather"
    assert response_format["json_schema"]["schema"]["required"] == ["city", "temp_c"]
    assert sent_messages(fake, 1)[1] == {"role": "assistant", "content": '{"city": "Oslo", "temp_c": 4}'}


def test_parse_with_a_tool_call_sent_back(proxy: Service, fake: FakeGroq) -> None:
    fake.behaviours[MODEL] = Behaviour(tool_call={"name": "GetWeather", "arguments": '{"city": "Oslo"}'})
    with openai_client(proxy) as client:
        tools = [openai.pydantic_function_tool(GetWeather)]
        parsed = client.chat.completions.parse(model=MODEL, messages=MESSAGES, tools=tools)  # type: ignore[arg-type]
        message = parsed.choices[0].message
        assert message.tool_calls and message.tool_calls[0].function.parsed_arguments == GetWeather(city="Oslo")
        fake.behaviours.pop(MODEL)
        tool_result = {"role": "tool", "tool_call_id": "call_fake1", "content": "4"}
        client.chat.completions.create(model=MODEL, messages=[*MESSAGES, message, tool_result])  # type: ignore[arg-type]
    call = {"id": "call_fake1", "type": "function", "function": {"name": "GetWeather", "arguments": '{"city": "Oslo"}'}}
    assert sent_messages(fake, 1)[1] == {"role": "assistant", "content": None, "tool_calls": [call]}


# Item 2: null inside nested objects.


def post(service: Service, body: dict[str, Any]) -> httpx.Response:
    return service.client.post("/v1/chat/completions", json=body, headers=AUTH)


def test_null_anywhere_is_not_set_and_not_sent(proxy: Service, fake: FakeGroq) -> None:
    parameters = {"type": "object", "properties": {"unit": {"type": ["string", "null"], "default": None}}}
    tool = {"type": "function", "function": {"name": "get_weather", "description": None, "parameters": parameters}}
    schema = {"type": "object", "properties": {"x": {"enum": ["a", None]}}}
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi", "name": None}],
        "tools": [tool],  # simonw's llm --functions, for a Python function without a docstring
        "tool_choice": None,
        "stream_options": None,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "description": None, "schema": schema}},
        "temperature": None,
    }
    response = post(proxy, body)
    assert response.status_code == 200, response.text
    sent = fake.chat_requests()[0].body
    assert sent["tools"] == [{"type": "function", "function": {"name": "get_weather", "parameters": parameters}}]
    assert sent["response_format"] == {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    assert set(sent) == {"model", "messages", "tools", "response_format"}  # free-form JSON keeps its nulls
    assert sent["messages"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"refusal": "I won't"}, "messages[1].refusal"),  # dropped only as null
        ({"tool_calls": [{**CALL, "x": 1}]}, "messages[1].tool_calls[0].x"),
        (
            {"tool_calls": [{**CALL, "function": {"name": "f", "arguments": "", "y": 1}}]},
            "messages[1].tool_calls[0].function.y",
        ),
        (
            {"tool_calls": [{**CALL, "function": {"name": "f", "arguments": "", "parsed": {}}}]},
            "messages[1].tool_calls[0].function.parsed",
        ),
    ],
)
def test_other_unknown_keys_are_still_refused(
    proxy: Service, fake: FakeGroq, message: dict[str, Any], field: str
) -> None:
    assistant = {"role": "assistant", "content": "ok", **message}
    response = post(proxy, {"model": MODEL, "messages": [*MESSAGES, assistant]})
    assert response.status_code == 422
    [detail] = response.json()["error"]["details"]
    assert detail["field"] == field and detail["message"].startswith(f"{field} is not a known field")
    assert fake.received == []


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"model": MODEL, "messages": None}, "messages", "messages is required"),
        ({"model": MODEL, "messages": "hi"}, "messages", "messages must be a list of 1 to 2048 items (got a string"),
        (
            {"model": MODEL, "messages": [*MESSAGES, {"role": "assistant", "tool_calls": [{**CALL, "function": "f"}]}]},
            "messages[1].tool_calls[0].function",
            "messages[1].tool_calls[0].function must be an object (got a string",
        ),
    ],
)
def test_bodies_of_other_shapes_are_422_not_500(proxy: Service, body: dict[str, Any], field: str, message: str) -> None:
    response = post(proxy, body)
    assert response.status_code == 422
    [detail] = response.json()["error"]["details"]
    assert detail["field"] == field and detail["message"].startswith(message)


# Item 3: models.retrieve.


@pytest.mark.parametrize("sdk", ["openai", "groq"])
def test_models_retrieve(proxy: Service, fake: FakeGroq, sdk: str) -> None:
    client: Any = openai_client(proxy) if sdk == "openai" else groq_client(proxy)
    with client:
        model = client.models.retrieve(MODEL)
        assert (model.id, model.object, model.owned_by) == (MODEL, "model", "openai")
        not_found = openai.NotFoundError if sdk == "openai" else groq.NotFoundError
        with pytest.raises(not_found) as caught:
            client.models.retrieve("openai/no-such-model")
    assert caught.value.status_code == 404
    error = caught.value.body if sdk == "openai" else caught.value.body["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "model_not_found")
    assert [r.path for r in fake.received] == [f"/openai/v1/models/{MODEL}", "/openai/v1/models/openai/no-such-model"]


def test_models_retrieve_outside_the_allowed_models_is_404_as_unknown(
    fake: FakeGroq, start_service: Any, tmp_path: Path
) -> None:
    narrow = "svc_narrow_client_token_1a2b3c4d"
    digest = hashlib.sha256(narrow.encode()).hexdigest()
    wide_digest = hashlib.sha256(CLIENT_TOKEN.encode()).hexdigest()
    keys = tmp_path / "keys.toml"
    keys.write_text(
        f'[[keys]]\nname = "wide"\nsha256 = "{wide_digest}"\n'
        f'[[keys]]\nname = "narrow"\nsha256 = "{digest}"\nallowed_models = ["{MODEL}"]\n'
    )
    allowed = f"{MODEL},openai/gpt-oss-120b"
    service = start_service(groq_env(fake, ALLOWED_MODELS=allowed, SERVICE_KEYS_FILE=str(keys)))
    with openai.OpenAI(base_url=service.url + "/v1", api_key=narrow, max_retries=0) as client:
        assert client.models.retrieve(MODEL).id == MODEL
        with pytest.raises(openai.NotFoundError) as outside_client:
            client.models.retrieve("openai/gpt-oss-120b")  # allowed by ALLOWED_MODELS, not for this client
    with openai_client(service) as client:
        assert client.models.retrieve("openai/gpt-oss-120b").id == "openai/gpt-oss-120b"
        with pytest.raises(openai.NotFoundError) as outside:
            client.models.retrieve("qwen/qwen3.6-27b")  # known to Groq, outside ALLOWED_MODELS
    for caught in (outside_client, outside):
        assert caught.value.code == "model_not_found" and caught.value.type == "invalid_request_error"
    assert [r.path for r in fake.received] == [
        "/openai/v1/models/openai/gpt-oss-20b",
        "/openai/v1/models/openai/gpt-oss-120b",
    ]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/openai/../chat/completions",
        "/openai/v1/models/a//b",
        "/v1/models/a%3Fb",
        "/v1/models/.",
    ],
)
def test_a_path_that_is_no_model_id_is_404_without_calling_groq(proxy: Service, fake: FakeGroq, path: str) -> None:
    port = int(proxy.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # httpx would resolve the dot segments
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: {AUTH['Authorization']}\r\n\r\n".encode()
        )
        answer = b""
        while b"}}" not in answer:
            answer += sock.recv(65536) or b"}}"
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 ")
    assert json.loads(body)["error"]["code"] == "model_not_found"
    assert fake.received == []


def test_models_retrieve_needs_the_service_token_and_escaped_slashes_work(proxy: Service, fake: FakeGroq) -> None:
    assert proxy.client.get(f"/v1/models/{MODEL}").status_code == 401
    response = proxy.client.get("/openai/v1/models/openai%2Fgpt-oss-120b", headers=AUTH)
    assert response.status_code == 200 and response.json()["id"] == "openai/gpt-oss-120b"
    assert {k: response.headers[k] for k in GROQ_LIMITS} == GROQ_LIMITS
    assert [r.path for r in fake.received] == ["/openai/v1/models/openai/gpt-oss-120b"]
    assert MODEL in MODELS


@pytest.mark.parametrize("refused", ["qwen/qwen3.6-27b", "a//b"])  # outside ALLOWED_MODELS; no model id
def test_a_refused_model_id_spends_no_quota(fake: FakeGroq, start_service: Any, refused: str) -> None:
    env = groq_env(fake, SERVICE_API_KEYS=CLIENT_TOKEN, ALLOWED_MODELS=MODEL, QUOTA_REQUESTS_PER_MINUTE="1")
    service = start_service(env)
    response = service.client.get(f"/v1/models/{refused}", headers=AUTH)
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    response = service.client.get(f"/v1/models/{MODEL}", headers=AUTH)
    assert response.status_code == 200 and response.json()["id"] == MODEL
    assert service.client.get(f"/v1/models/{MODEL}", headers=AUTH).status_code == 429  # the quota is on
    assert [r.path for r in fake.received] == [f"/openai/v1/models/{MODEL}"]


@pytest.mark.parametrize("body", [b'{"object": "list", "data": []}', b'{"id": 5}', b"[]"])
def test_a_model_object_of_another_shape_is_502(proxy: Service, fake: FakeGroq, body: bytes) -> None:
    fake.default = Behaviour(models_body=body)
    response = proxy.client.get(f"/v1/models/{MODEL}", headers=AUTH)
    assert response.status_code == 502 and response.json()["error"]["type"] == "upstream_error"


# Item 4: Groq's own errors on the SDK routes; /chat keeps its envelope.


def test_groq_429_is_a_rate_limit_error_with_groqs_code(proxy: Service, fake: FakeGroq) -> None:
    fake.default = groq_error(429, MODEL)  # Groq's body, retry-after and x-ratelimit-* for its 429
    with openai_client(proxy) as client, pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    error = caught.value
    assert (error.status_code, error.code, error.type, error.param) == (429, "rate_limit_exceeded", "tokens", None)
    assert error.body["message"].startswith("Rate limit reached for model `openai/gpt-oss-20b`")  # type: ignore[index]
    headers = error.response.headers
    assert headers["retry-after"] == "6"
    assert {k: headers[k] for k in GROQ_LIMITS} == {
        **GROQ_LIMITS,
        "x-ratelimit-limit-tokens": "15000",
        "x-ratelimit-remaining-tokens": "3028",
        "x-ratelimit-reset-tokens": "5.289s",
    }
    with groq_client(proxy) as gclient, pytest.raises(groq.RateLimitError) as gcaught:
        gclient.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    assert gcaught.value.body["error"]["code"] == "rate_limit_exceeded"  # type: ignore[index]
    assert len(fake.chat_requests()) == 2  # no SDK retry: max_retries=0


TOO_BIG = {"message": "too big", "type": "invalid_request_error", "param": "max_tokens"}
FAILED = {"message": "fake failure", "type": "internal_server_error", "code": None, "param": None}


def _own(type_: str) -> dict[str, Any]:
    return {"type": type_, "code": type_}


@pytest.mark.parametrize(
    ("behaviour", "chat", "sdk"),
    [  # (status, type) on /chat; (status, error object without request_id and, for the envelope, message) on the SDK
        (groq_error(429), (429, "rate_limited"), (429, {**groq_error(429).error, "param": None})),  # type: ignore[dict-item]
        (Behaviour(status=500), (502, "upstream_error"), (500, FAILED)),
        (Behaviour(status=400, error=TOO_BIG), (400, "upstream_rejected"), (400, {**TOO_BIG, "code": None})),
        (
            Behaviour(status=401, error={"message": "Invalid API Key"}),
            (502, "upstream_auth"),
            (502, _own("upstream_auth")),
        ),
        (Behaviour(status=498, error={"message": "capacity"}), (503, "upstream_busy"), (503, _own("upstream_busy"))),
        (Behaviour(status=502, raw_body=b"Bad Gateway"), (502, "upstream_error"), (502, _own("upstream_error"))),
    ],
)
def test_groq_errors_on_each_route(proxy: Service, fake: FakeGroq, behaviour: Behaviour, chat: Any, sdk: Any) -> None:
    fake.default = behaviour
    response = proxy.client.post("/chat", json={"prompt": "hi"}, headers=AUTH)
    error = response.json()["error"]
    assert (response.status_code, error["type"]) == chat and "code" not in error  # /chat keeps its envelope
    response = post(proxy, {"model": MODEL, "messages": MESSAGES})
    error = response.json()["error"]
    if "message" not in sdk[1]:  # the service's own envelope: its deliberate mappings, or Groq sent no error object
        del error["message"]
    assert (response.status_code, error) == (sdk[0], {**sdk[1], "request_id": response.headers["x-request-id"]})


def test_a_groq_error_event_in_a_stream_is_groqs_object(proxy: Service, fake: FakeGroq) -> None:
    fake.default = Behaviour(chunks=10, error_event_after=2)
    body = {"model": MODEL, "messages": MESSAGES, "stream": True}
    with proxy.client.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as response:
        text = response.read().decode()
    last = json.loads(text.strip().split("\n\n")[-1].removeprefix("data: "))
    assert last["error"]["type"] == "internal_server_error" and last["error"]["code"] == "503"
    assert last["error"]["message"] == "Service Unavailable"


def test_the_groq_key_is_masked_in_every_field_of_groqs_error(proxy: Service, fake: FakeGroq) -> None:
    leaky = {"message": f"m {API_KEY}", "type": f"t {API_KEY}", "code": f"c {API_KEY}", "param": f"p {API_KEY}"}
    masked = {key: f"{key[0]} [redacted]" for key in leaky}
    fake.behaviours["plain"] = Behaviour(status=400, error=leaky)
    event = b"data: " + json.dumps({"error": leaky}).encode() + b"\n\n"
    fake.behaviours["stream"] = Behaviour(raw_events=[_first_chunk(), event])
    response = post(proxy, {"model": "plain", "messages": MESSAGES})
    assert response.status_code == 400 and API_KEY not in response.text
    assert {k: v for k, v in response.json()["error"].items() if k != "request_id"} == masked
    body = {"model": "stream", "messages": MESSAGES, "stream": True}
    with proxy.client.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as streamed:
        text = streamed.read().decode()
    assert streamed.status_code == 200 and API_KEY not in text
    last = json.loads(text.strip().split("\n\n")[-1].removeprefix("data: "))
    assert {k: v for k, v in last["error"].items() if k != "request_id"} == masked


def _first_chunk() -> bytes:
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": "stream", "choices": [{"index": 0, "delta": {}}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


# Item 5: Groq's rate-limit headers passed on, unless the service has a quota of its own.


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ["/chat", "/v1/chat/completions"])
def test_groq_rate_limit_headers_are_passed_on(proxy: Service, fake: FakeGroq, path: str, stream: bool) -> None:
    body = {"prompt": "hi"} if path == "/chat" else {"model": MODEL, "messages": MESSAGES}
    with proxy.client.stream("POST", path, json={**body, "stream": stream}, headers=AUTH) as response:
        response.read()
    assert response.status_code == 200
    assert {k: response.headers.get_list(k) for k in GROQ_LIMITS} == {k: [v] for k, v in GROQ_LIMITS.items()}
    assert response.headers["content-type"] == ("text/event-stream" if stream else "application/json")


@pytest.mark.parametrize("stream", [False, True])
def test_with_a_quota_the_services_own_headers_replace_groqs(fake: FakeGroq, start_service: Any, stream: bool) -> None:
    service = start_service(groq_env(fake, SERVICE_API_KEYS=CLIENT_TOKEN, QUOTA_REQUESTS_PER_MINUTE="50"))
    for path, body in (("/chat", {"prompt": "hi"}), ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES})):
        with service.client.stream("POST", path, json={**body, "stream": stream}, headers=AUTH) as response:
            response.read()
        assert response.status_code == 200
        assert response.headers.get_list("x-ratelimit-limit-requests") == ["50"]
        assert all(not k.endswith("tokens") for k in response.headers if k.startswith("x-ratelimit-"))
    response = service.client.get(f"/v1/models/{MODEL}", headers=AUTH)
    assert response.status_code == 200 and response.headers.get_list("x-ratelimit-limit-requests") == ["50"]
    fake.default = groq_error(429, MODEL)
    response = post(service, {"model": MODEL, "messages": MESSAGES})
    assert response.status_code == 429 and response.json()["error"]["code"] == "rate_limit_exceeded"
    assert response.headers["retry-after"] == "6" and response.headers.get_list("x-ratelimit-limit-requests") == ["50"]


@pytest.mark.parametrize("stream", [False, True])
def test_after_a_fallback_the_headers_are_the_answering_calls(fake: FakeGroq, start_service: Any, stream: bool) -> None:
    fake.behaviours["openai/gpt-oss-120b"] = groq_error(429)  # its x-ratelimit-remaining-tokens: 3028
    env = groq_env(fake, SERVICE_API_KEYS=CLIENT_TOKEN, FALLBACK_MODELS=f"openai/gpt-oss-120b>{MODEL}")
    service = start_service(env)
    body = {"model": "openai/gpt-oss-120b", "messages": MESSAGES, "stream": stream}
    with service.client.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as response:
        response.read()
    assert response.status_code == 200
    assert [r.body["model"] for r in fake.chat_requests()] == ["openai/gpt-oss-120b", MODEL]
    assert {k: response.headers.get_list(k) for k in GROQ_LIMITS} == {k: [v] for k, v in GROQ_LIMITS.items()}


NOT_LATIN_1 = {"x-ratelimit-reset-tokens": "5€s"}  # httpx decodes a header's UTF-8; a response head is Latin-1


@pytest.mark.parametrize("quota", [{}, {"QUOTA_REQUESTS_PER_MINUTE": "50"}])
def test_a_groq_header_value_that_is_not_ascii_is_dropped_not_a_500(
    fake: FakeGroq, start_service: Any, quota: dict[str, str]
) -> None:
    env = groq_env(fake, SERVICE_API_KEYS=CLIENT_TOKEN, MAX_CONCURRENCY="1", **quota)
    service = start_service(env)
    cases = [
        (Behaviour(headers=NOT_LATIN_1), 200),
        (groq_error(429, MODEL, headers=NOT_LATIN_1), 429),
        (Behaviour(), 200),
    ]
    for behaviour, status in cases:  # with MAX_CONCURRENCY=1, the last ones prove every slot was freed
        fake.default = behaviour
        for path, body in (
            ("/chat", {"prompt": "hi"}),
            ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES}),
        ):
            for stream in (False, True):
                with service.client.stream("POST", path, json={**body, "stream": stream}, headers=AUTH) as response:
                    response.read()
                assert (response.status_code, path, stream) == (status, path, stream)
                if behaviour.headers:  # the header Groq sent not in ASCII is dropped
                    assert "x-ratelimit-reset-tokens" not in response.headers
                if not quota:  # Groq's other x-ratelimit-* headers are still passed on
                    assert response.headers["x-ratelimit-limit-tokens"] in ("18000", "15000")
    assert "Traceback" not in service.log_text() and "UnicodeEncodeError" not in service.log_text()
