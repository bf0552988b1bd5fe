"""Property: whatever a client posts to /chat, it never gets a 500, and every error is the envelope."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from conftest import Service, groq_env
from fake_groq import FakeGroq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FIELDS = [
    "prompt",
    "messages",
    "system_prompt",
    "model",
    "temperature",
    "top_p",
    "max_tokens",
    "stop",
    "seed",
    "stream",
    "role",
    "content",
]
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["user", "system", "assistant", ""])
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)
chat_bodies = st.fixed_dictionaries({}, optional=dict.fromkeys(FIELDS[:10], json_values)) | json_values


@pytest.fixture(scope="module")
def fuzz_service() -> Iterator[Service]:
    fake = FakeGroq().start()
    service = Service(groq_env(fake))
    yield service
    service.stop()
    fake.stop()


def check(response: httpx.Response) -> None:
    assert response.status_code != 500, response.text
    assert response.headers["x-request-id"]
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) <= {"type", "message", "request_id", "details"}
        assert error["request_id"] == response.headers["x-request-id"]
    else:
        assert set(response.json()) == {"content", "model", "usage", "finish_reason"}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=chat_bodies)
def test_any_json_body_gets_a_clean_answer(fuzz_service: Service, body: object) -> None:
    check(fuzz_service.client.post("/chat", content=json.dumps(body), headers={"content-type": "application/json"}))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    raw=st.binary(max_size=200),
    media_type=st.sampled_from(["application/json", "text/plain", "application/json; charset=latin-1"]),
)
def test_any_bytes_get_a_clean_answer(fuzz_service: Service, raw: bytes, media_type: str) -> None:
    check(fuzz_service.client.post("/chat", content=raw, headers={"content-type": media_type}))
