"""Property: whatever an authorised client posts to /chat or the SDK routes, it never gets a 500, and every error is
the envelope. Bodies reach validation (the client sends a valid token), with lone surrogates in keys and values,
integers beyond any float, nesting deeper than json can parse, and a wrong type at every field of either schema."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import CLIENT_TOKEN, Service, groq_env
from fake_groq import FakeGroq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdk_validation import OPENAI_PARAMS

CHAT_FIELDS = ["prompt", "messages", "system_prompt", "model", "temperature", "top_p", "max_tokens", "stop", "seed"]
OPENAI_ONLY = ["logprobs", "top_logprobs", "logit_bias", "prediction", "metadata", "store", "api_key", "name"]
MESSAGE_FIELDS = ["role", "content", "name", "tool_calls", "tool_call_id", "reasoning", "type", "text", "image_url"]
ROLES = ["user", "system", "assistant", "developer", "tool", "function", ""]
STATUSES = {200, 400, 413, 415, 422}
_DEEP = re.compile(r'"\\u0000deep(\d+)\\u0000"')

surrogates = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)
texts = st.text(max_size=12) | surrogates | st.builds(lambda a, b: a + b, st.text(max_size=4), surrogates)
numbers = (
    st.integers()
    | st.integers(min_value=2**1024, max_value=2**1100)
    | st.integers(max_value=-(2**1024), min_value=-(2**1100))
    | st.floats()
)
deep = st.integers(min_value=65, max_value=3000).map(lambda n: f"\x00deep{n}\x00")  # see _encode
keys = st.sampled_from([*CHAT_FIELDS, *OPENAI_PARAMS, *OPENAI_ONLY, *MESSAGE_FIELDS]) | texts
scalars = st.none() | st.booleans() | numbers | texts | st.sampled_from(ROLES) | deep
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=20,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(ROLES) | json_values},
        optional={"content": st.text(max_size=10) | json_values, **dict.fromkeys(MESSAGE_FIELDS[2:], json_values)},
    )
    | json_values,
    max_size=3,
)


def _with(base: st.SearchStrategy[dict[str, Any]], names: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """`base` plus up to four of `names`, each with any JSON value."""
    extra = st.dictionaries(st.sampled_from(names), json_values, max_size=4)
    return st.builds(lambda b, e: {**b, **e}, base, extra)


chat_bodies = _with(st.fixed_dictionaries({}, optional={"messages": messages}), CHAT_FIELDS)
openai_bodies = _with(
    st.fixed_dictionaries({"model": st.just("m") | json_values, "messages": messages}),
    [*(name for name in OPENAI_PARAMS if name not in ("model", "messages")), *OPENAI_ONLY],
)


def _encode(body: object) -> bytes:
    """JSON text, with each `deep` marker replaced by a value nested that many levels (json.dumps could not)."""

    def nested(match: re.Match[str]) -> str:
        depth = int(match.group(1))
        return "[" * depth + "]" * depth if depth % 2 else '{"a":' * depth + "1" + "}" * depth

    return _DEEP.sub(nested, json.dumps(body)).encode()


@pytest.fixture(scope="module")
def fuzz_service() -> Iterator[Service]:
    fake = FakeGroq().start()
    service = Service(groq_env(fake, SERVICE_API_KEYS=CLIENT_TOKEN))
    yield service
    service.stop()
    fake.stop()


def post(service: Service, path: str, content: bytes, media_type: str = "application/json") -> httpx.Response:
    headers = {"content-type": media_type, "authorization": f"Bearer {CLIENT_TOKEN}"}
    return service.client.post(path, content=content, headers=headers)


def check(response: httpx.Response, *, openai: bool = False) -> None:
    assert response.status_code in STATUSES, response.text
    assert response.headers["x-request-id"]
    if response.headers["content-type"] == "text/event-stream":
        assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n"), response.text
        return
    assert response.headers["content-type"] == "application/json"
    body = json.loads(response.content.decode("utf-8"))
    if response.status_code >= 400:
        error = body["error"]
        assert set(error) - {"details"} == {"type", "message", "request_id", *(["code"] if openai else [])}
        assert error["request_id"] == response.headers["x-request-id"]
        assert len(response.content) <= 16 * 1024 and len(error.get("details", ())) <= 20
    elif openai:
        assert body["object"] == "chat.completion"
    else:
        assert set(body) == {"content", "model", "usage", "finish_reason"}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=chat_bodies | json_values)
def test_any_json_body_gets_a_clean_answer(fuzz_service: Service, body: object) -> None:
    check(post(fuzz_service, "/chat", _encode(body)))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=openai_bodies, path=st.sampled_from(["/v1/chat/completions", "/openai/v1/chat/completions"]))
def test_any_openai_body_gets_a_clean_answer(fuzz_service: Service, body: object, path: str) -> None:
    check(post(fuzz_service, path, _encode(body)), openai=True)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    raw=st.binary(max_size=200),
    media_type=st.sampled_from(["application/json", "text/plain", "application/json; charset=latin-1"]),
    path=st.sampled_from(["/chat", "/v1/chat/completions"]),
)
def test_any_bytes_get_a_clean_answer(fuzz_service: Service, raw: bytes, media_type: str, path: str) -> None:
    check(post(fuzz_service, path, raw, media_type), openai=path != "/chat")
