"""Shutdown past its deadline, over `python app.py` and real signals: requests still running end in the envelope."""

from __future__ import annotations

import json
import signal
import threading
import time
from typing import Any

import httpx
from conftest import Process, groq_env
from fake_groq import Behaviour, FakeGroq

SLOW = "slow/plain"  # Groq takes 8 s to answer
LONG = "slow/stream"  # a stream that would run for 20 s


class _Call:
    """One request in a thread: its status, headers and every byte of its body; `started` once bytes arrive."""

    def __init__(self, url: str, body: dict[str, Any], request_id: str) -> None:
        self.started = threading.Event()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self._thread = threading.Thread(target=self._run, args=(url, body, request_id), daemon=True)
        self._thread.start()

    def _run(self, url: str, body: dict[str, Any], request_id: str) -> None:
        with httpx.stream("POST", url, json=body, headers={"x-request-id": request_id}, timeout=30) as response:
            self.status, self.headers = response.status_code, dict(response.headers)
            for chunk in response.iter_raw():
                self.body += chunk
                self.started.set()
        self.started.set()

    def join(self) -> None:
        self._thread.join(20)
        assert not self._thread.is_alive(), "the request was not ended"


def _start_four(fake: FakeGroq, proc: Process) -> dict[str, _Call]:
    fake.behaviours[SLOW] = Behaviour(delay=8)
    fake.behaviours[LONG] = Behaviour(chunks=200, chunk_delay=0.1)
    messages = [{"role": "user", "content": "hi"}]
    calls = {
        "cut-plain": _Call(proc.url + "/chat", {"prompt": "hi", "model": SLOW}, "cut-plain"),
        "cut-stream": _Call(proc.url + "/chat", {"prompt": "hi", "model": LONG, "stream": True}, "cut-stream"),
        "cut-sdk": _Call(proc.url + "/v1/chat/completions", {"model": SLOW, "messages": messages}, "cut-sdk"),
        "cut-sdk-stream": _Call(
            proc.url + "/v1/chat/completions", {"model": LONG, "messages": messages, "stream": True}, "cut-sdk-stream"
        ),
    }
    deadline = time.monotonic() + 20
    while len(fake.chat_requests()) < 4 or not all(calls[k].started.is_set() for k in ("cut-stream", "cut-sdk-stream")):
        assert time.monotonic() < deadline, "the four requests did not reach the fake Groq"
        time.sleep(0.02)
    return calls


def _assert_all_ended_in_the_envelope(proc: Process, calls: dict[str, _Call]) -> None:
    for call in calls.values():
        call.join()
    for request_id in ("cut-plain", "cut-sdk"):
        call = calls[request_id]
        assert call.status == 503 and call.headers["content-type"] == "application/json"
        assert call.headers["x-request-id"] == request_id
        error = json.loads(call.body)["error"]
        assert error["type"] == "shutting_down" and error["request_id"] == request_id
        assert error["message"] == "The service is shutting down and this request ran past SHUTDOWN_TIMEOUT; retry it."
        assert ("code" in error) == (request_id == "cut-sdk")  # the SDK routes' shape
    stream = calls["cut-stream"].body.decode()
    assert calls["cut-stream"].status == 200 and stream.startswith('data: {"content": "t0 "}\n\n')
    assert stream.count("event: error") == 1 and stream.endswith("\n\n")
    last = stream.rstrip("\n").rsplit("\n\n", 1)[-1]
    assert last.startswith("event: error\ndata: ")
    assert json.loads(last.split("data: ", 1)[1])["error"]["type"] == "shutting_down"
    sdk_stream = calls["cut-sdk-stream"].body.decode()
    last = sdk_stream.rstrip("\n").rsplit("\n\n", 1)[-1]
    assert last.startswith('data: {"error": ') and "[DONE]" not in sdk_stream
    assert json.loads(last.removeprefix("data: "))["error"]["code"] == "shutting_down"
    assert proc.wait() == 0
    lines = proc.json_lines()  # every line is JSON: no plain-text traceback either
    assert not [line for line in lines if "exc" in line or "Exception" in line["msg"] or line["level"] == "ERROR"]
    access = {line["request_id"]: line for line in lines if line["msg"] == "request" and line["logger"] == "service"}
    for request_id, status in [("cut-plain", 503), ("cut-sdk", 503), ("cut-stream", 200), ("cut-sdk-stream", 200)]:
        assert access[request_id]["status"] == status and access[request_id]["error"] == "shutting_down"
        assert "disconnected" not in access[request_id]
    cut = [line for line in lines if line["level"] == "WARNING" and "shutting_down" in line["msg"]]
    assert [line["msg"] for line in cut] == ["shutdown: 4 request(s) still running were ended with 503 shutting_down"]


def test_requests_running_at_the_deadline_end_with_shutting_down(fake: FakeGroq, start_process: Any) -> None:
    proc = start_process(groq_env(fake, SHUTDOWN_TIMEOUT="2"))
    calls = _start_four(fake, proc)
    proc.send_signal(signal.SIGTERM)  # SIGHUP reloads instead (tests/test_reload.py)
    _assert_all_ended_in_the_envelope(proc, calls)
    assert any(line["msg"] == "Shutting down" for line in proc.json_lines())  # a drain, not a kill


def test_a_second_ctrl_c_ends_running_requests_at_once(fake: FakeGroq, start_process: Any) -> None:
    proc = start_process(groq_env(fake, SHUTDOWN_TIMEOUT="60"))
    calls = _start_four(fake, proc)
    proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 10
    while not any('"Shutting down"' in line for line in proc.lines):
        assert time.monotonic() < deadline, "the first SIGINT did not start the shutdown"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _assert_all_ended_in_the_envelope(proc, calls)  # long before SHUTDOWN_TIMEOUT


def test_a_request_that_finishes_in_time_is_not_cut(fake: FakeGroq, start_process: Any) -> None:
    hold = threading.Event()  # Groq answers only once the shutdown has begun, well inside SHUTDOWN_TIMEOUT
    fake.default = Behaviour(hold=hold)
    proc = start_process(groq_env(fake, SHUTDOWN_TIMEOUT="5"))
    call = _Call(proc.url + "/chat", {"prompt": "hi"}, "in-time")
    deadline = time.monotonic() + 10
    while not fake.chat_requests():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    while not any('"Shutting down"' in line for line in proc.lines):
        assert time.monotonic() < deadline + 10, "SIGTERM did not start the shutdown"
        time.sleep(0.02)
    hold.set()
    call.join()
    assert call.status == 200
    assert proc.wait() == 0
    assert not [line for line in proc.json_lines() if line["level"] == "WARNING" and "shutting_down" in line["msg"]]
