"""Upstream connections: one per concurrent call, reused, never reopened in steady state (issue 16)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from conftest import groq_env
from fake_groq import Behaviour, FakeGroq


def test_calls_at_capacity_reuse_one_connection_each(fake: FakeGroq, start_service: Any) -> None:
    service = start_service(groq_env(fake, MAX_CONCURRENCY="4"))
    fake.default = Behaviour(delay=0.2)  # all four calls of a round are in flight together

    def chat(_: int) -> int:
        return httpx.post(service.url + "/chat", json={"prompt": "hi"}, timeout=10).status_code

    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            assert list(pool.map(chat, range(4))) == [200] * 4
    fake.default = Behaviour()
    assert [chat(i) for i in range(10)] == [200] * 10
    assert len(fake.chat_requests()) == 22
    assert fake.connections == 4  # one per call in flight at once, then only reused
