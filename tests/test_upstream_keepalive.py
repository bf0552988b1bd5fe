"""A streamed answer leaves its upstream connection open for the next call, as Groq does.

The fake Groq once closed every connection after a stream without saying so (no `Connection: close`); the
service's next call on it, sent before the close arrived, was reset unread: a 502 `upstream_unreachable`
with GROQ_MAX_RETRIES=0, seen under load in tests/test_deploy.py's rolling restart.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from conftest import groq_env
from fake_groq import FakeGroq

pytestmark = pytest.mark.both_transports  # every test here runs on httpx and on aiohttp


def test_a_stream_hands_its_connection_to_the_next_call(fake: FakeGroq, start_service: Any) -> None:
    service = start_service(groq_env(fake, MAX_CONCURRENCY="1"))
    for stream in (True, False, True, True, False):
        response = httpx.post(service.url + "/chat", json={"prompt": "hi", "stream": stream}, timeout=10)
        assert response.status_code == 200, response.text
    assert [how for how, _ in fake.stream_ends] == ["completed"] * 3
    assert len(fake.chat_requests()) == 5
    assert fake.connections == 1
