"""Shutdown past its deadline while clients have stopped reading: `python app.py` and real sockets.

A response that cannot be finished at the deadline (a plain answer already under way, or a last error
event the client does not take) ends with the connection aborted: no traceback, no ERROR line, and the
access line still says `shutting_down`.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from typing import Any

from conftest import Process, groq_env
from fake_groq import Behaviour, FakeGroq

BIG = " ".join(["x" * 4000] * 1500)  # 6 MB: more than every buffer between the service and its client


def _stalled(proc: Process, body: dict[str, Any], request_id: str) -> socket.socket:
    """A request from a client with a small receive buffer that reads 40 bytes of the answer, then stops."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(20)
    sock.connect(("127.0.0.1", proc.port))
    data = json.dumps(body).encode()
    head = f"POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-ID: {request_id}\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    sock.sendall(head.encode() + data)
    assert len(sock.recv(40)) > 0
    return sock


def test_answers_that_clients_stop_reading_end_without_a_traceback(fake: FakeGroq, start_process: Any) -> None:
    fake.behaviours["big-stream"] = Behaviour(content=BIG, chunks_per_write=20)
    fake.behaviours["big-plain"] = Behaviour(content=BIG)
    proc = start_process(groq_env(fake, SHUTDOWN_TIMEOUT="2", CLIENT_TIMEOUT="30"))
    stream = _stalled(proc, {"prompt": "hi", "model": "big-stream", "stream": True}, "stalled-stream")
    plain = _stalled(proc, {"prompt": "hi", "model": "big-plain"}, "stalled-plain")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert time.monotonic() - started < 10
    for sock in (stream, plain):
        sock.close()
    lines = proc.json_lines()  # every line is JSON: no plain-text traceback either
    assert [line for line in lines if line["level"] == "ERROR" or "exc" in line] == []
    access = {line["request_id"]: line for line in lines if line["msg"] == "request" and line["logger"] == "service"}
    for request_id in ("stalled-stream", "stalled-plain"):
        line = access[request_id]
        assert (line["status"], line["error"]) == (200, "shutting_down")
        assert "disconnected" not in line
    cut = [line["msg"] for line in lines if line["level"] == "WARNING" and "shutting_down" in line["msg"]]
    assert cut == ["shutdown: 2 request(s) still running were ended with 503 shutting_down"]
