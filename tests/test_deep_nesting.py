"""A body nested deeper than Python's default recursion limit lets json parse (~1,000 levels) is still valid
JSON: 422 naming the field that nests too deep, or, past what the service parses at all, 422 naming the body. Over
`python app.py` (the main thread's stack), which stays up."""

from __future__ import annotations

import signal
from typing import Any

import httpx
from conftest import Process, groq_env
from fake_groq import FakeGroq

TOO_DEEP_DETAIL = "nests lists and objects more than about 10,000 levels deep"
MESSAGES = b'"messages": [{"role": "user", "content": "x"}]'
TOO_DEEP = (
    "The body nests lists and objects more than about 10,000 levels deep; free-form values (tool parameters,"
    " schemas) may nest at most 64 levels."
)


def _tool_parameters(depth: int) -> bytes:
    """Issue 11's body: `tools[0].function.parameters` nested `depth` levels (json.dumps could not write it)."""
    inner = b'{"a": ' * (depth - 1) + b"[1]" + b"}" * (depth - 1)
    tool = b'{"type": "function", "function": {"name": "f", "parameters": %s}}' % inner
    return b'{"model": "m", ' + MESSAGES + b', "tools": [%s]}' % tool


def _post(proc: Process, path: str, content: bytes) -> httpx.Response:
    headers = {"content-type": "application/json"}
    return httpx.post(proc.url + path, content=content, headers=headers, timeout=30)


def _error(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == "validation_error"
    return error


def test_deep_bodies_get_422_and_the_service_stays_up(fake: FakeGroq, start_process: Any) -> None:
    proc: Process = start_process(groq_env(fake))
    for depth in (964, 5000):
        error = _error(_post(proc, "/v1/chat/completions", _tool_parameters(depth)))
        field = "tools[0].function.parameters"
        assert error["details"] == [{"field": field, "message": f"{field} must not be nested more than 64 levels deep"}]
        assert error["code"] == "validation_error"
    error = _error(_post(proc, "/chat", b'{"prompt": ' + b"[" * 3000 + b"]" * 3000 + b"}"))
    assert error["details"] == [{"field": "prompt", "message": "prompt must be a non-empty string (got a list)"}]
    for path, depth in [("/chat", 9_999), ("/v1/chat/completions", 9_999), ("/chat", 20_000)]:
        error = _error(_post(proc, path, b"[" * depth + b"]" * depth))
        assert error["message"] == TOO_DEEP
        assert error["details"] == [{"field": "body", "message": "body " + TOO_DEEP_DETAIL}]
    assert httpx.get(proc.url + "/healthz", timeout=10).status_code == 200  # the process is still there
    assert fake.chat_requests() == []
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 0
    assert [line for line in proc.json_lines() if line["level"] not in ("INFO", "WARNING")] == []
