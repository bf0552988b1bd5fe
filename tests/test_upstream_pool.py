"""Upstream connections: one per concurrent call, reused, never reopened in steady state (issue 16)."""

from __future__ import annotations

import json
import random
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from conftest import groq_env
from fake_groq import Behaviour, FakeGroq

pytestmark = pytest.mark.both_transports  # every test here runs on httpx and on aiohttp


def test_calls_at_capacity_reuse_one_connection_each(fake: FakeGroq, start_service: Any) -> None:
    service = start_service(groq_env(fake, MAX_CONCURRENCY="4"))

    def chat(_: int) -> int:
        return httpx.post(service.url + "/chat", json={"prompt": "hi"}, timeout=10).status_code

    with ThreadPoolExecutor(4) as pool:
        for round_ in range(3):
            gate = threading.Event()  # Groq answers a round only once all four of its calls are in flight
            fake.default = Behaviour(hold=gate)
            calls = pool.map(chat, range(4))
            deadline = time.monotonic() + 10
            while len(fake.chat_requests()) < 4 * (round_ + 1):
                assert time.monotonic() < deadline, "the four calls did not reach Groq together"
                time.sleep(0.01)
            gate.set()
            assert list(calls) == [200] * 4
    fake.default = Behaviour()
    assert [chat(i) for i in range(10)] == [200] * 10
    assert len(fake.chat_requests()) == 22
    assert fake.connections == 4  # one per call in flight at once, then only reused


def test_calls_cut_short_by_clients_that_leave_leave_no_pool_stuck(fake: FakeGroq, start_service: Any) -> None:
    """A call cancelled mid-request must not leave its pool's one connection busy: later calls would wait for
    GROQ_TIMEOUT (a 504) behind a request that no longer exists."""
    service = start_service(groq_env(fake, MAX_CONCURRENCY="16", GROQ_TIMEOUT="3"))
    slow = json.dumps({"prompt": "hi", "model": "slow"}).encode()
    fake.behaviours["slow"] = Behaviour(delay=0.05)
    head = f"POST /chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {len(slow)}"
    port = int(service.url.rsplit(":", 1)[1])
    rng = random.Random(16)  # noqa: S311 - a repeatable spread of delays, not a secret

    def leave(delay: float) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(head.encode() + b"\r\n\r\n" + slow)
            time.sleep(delay)  # the client gives up while Groq is still answering: its call is cancelled
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def chat(_: int) -> int:
        return httpx.post(service.url + "/chat", json={"prompt": "hi"}, timeout=10).status_code

    with ThreadPoolExecutor(16) as pool:
        for _ in range(8):
            list(pool.map(leave, [rng.uniform(0.005, 0.06) for _ in range(16)]))
        statuses = [status for _ in range(3) for status in pool.map(chat, range(16))]
    assert statuses == [200] * 48
