"""The service as a process: started the way the README says, its configuration, its log output."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ROOT, free_port, groq_env
from fake_groq import FakeGroq

import logging_config


def readme_command(marker: str) -> str:
    """The one-line command under `marker` in the README's quick start."""
    text = (ROOT / "README.md").read_text()
    match = re.search(re.escape(marker) + r".*?```(?:sh|bash)?\n(.+?)\n```", text, re.S)
    assert match, f"README has no command under {marker!r}"
    return match.group(1).strip()


def test_readme_run_command_starts_the_service(fake: FakeGroq, start_process: Any) -> None:
    command = readme_command("Run the service")
    assert command.endswith("python app.py")
    proc = start_process(groq_env(fake), command=command)
    response = httpx.post(proc.url + "/chat", json={"prompt": "hi"}, headers={"x-request-id": "readme-1"})
    assert response.status_code == 200
    assert response.json()["content"] == "Hello from the fake Groq server."
    assert proc.stop() == 0
    first = next(i for i, line in enumerate(proc.lines) if line.startswith('{"ts"'))  # after pip's own output
    lines = [json.loads(line) for line in proc.lines[first:]]  # every line the service wrote is JSON
    assert any(line["logger"] == "uvicorn.error" and "Started server process" in line["msg"] for line in lines)
    access = [line for line in lines if line.get("request_id") == "readme-1" and line["msg"] == "request"]
    assert len(access) == 1 and access[0]["status"] == 200
    assert not any(line["logger"] == "uvicorn.access" for line in lines)


def test_readme_test_command_is_what_ci_runs() -> None:
    command = readme_command("Run the tests")
    assert command in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "abc"),
        ("PORT", "70000"),
        ("GROQ_TIMEOUT", "-1"),
        ("GROQ_TIMEOUT", "nan"),
        ("GROQ_MAX_RETRIES", "-1"),
        ("LOG_LEVEL", "LOUD"),
        ("LOG_FORMAT", "xml"),
        ("WORKERS", "0"),
        ("GROQ_MODEL", "bad model"),
        ("GROQ_BASE_URL", "https://api.groq.com/openai/v1"),
        ("GROQ_BASE_URL", "ftp://x"),
        ("GROQ_STREAM_IDLE_TIMEOUT", "0"),
        ("MAX_BODY_BYTES", "1MB"),
        ("LOG_PROMPTS", "maybe"),
    ],
)
def test_invalid_configuration_stops_with_one_clear_line(name: str, value: str, start_process: Any) -> None:
    proc = start_process({"GROQ_API_KEY": "gsk_x", name: value}, wait=False)
    code = proc.proc.wait(30)
    proc._reader.join(5)
    assert code != 0
    assert len(proc.lines) == 1, proc.lines
    line = json.loads(proc.lines[0])  # JSON like every other line, LOG_FORMAT being json by default
    assert line["level"] == "CRITICAL" and line["msg"].startswith(f"configuration error: {name} ")
    assert "gsk_x" not in proc.lines[0]


def test_invalid_configuration_in_text_mode_is_one_text_line(start_process: Any) -> None:
    proc = start_process({"GROQ_API_KEY": "gsk_x", "LOG_FORMAT": "text", "GROQ_TIMEOUT": "-1"}, wait=False)
    assert proc.proc.wait(30) != 0
    proc._reader.join(5)
    [line] = proc.lines
    assert re.fullmatch(
        r"\S+Z CRITICAL service configuration error: GROQ_TIMEOUT must be a number of seconds > 0 .*", line
    )


def test_dotenv_is_loaded_and_real_environment_wins(fake: FakeGroq, start_process: Any, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("GROQ_MODEL=qwen/qwen3.6-27b\nLOG_FORMAT=xml\n")
    proc = start_process(
        {**groq_env(fake), "LOG_FORMAT": "json"}, command=[sys.executable, str(ROOT / "app.py")], cwd=tmp_path
    )
    assert httpx.get(proc.url + "/healthz").json() == {"status": "ok", "model": "qwen/qwen3.6-27b"}
    assert proc.stop() == 0


def test_uvicorn_cli_logs_the_same_json(fake: FakeGroq, start_process: Any) -> None:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port)]
    proc = start_process({**groq_env(fake), "PORT": str(port)}, command=command)
    assert httpx.post(proc.url + "/chat", json={"prompt": "hi"}).status_code == 200
    proc.stop()
    lines = proc.json_lines()
    assert any("Started server process" in line["msg"] for line in lines)
    assert len([line for line in lines if line["msg"] == "request"]) == 2  # the readiness probe and the chat
    assert not any(line["logger"] == "uvicorn.access" for line in lines)


def test_text_format_is_one_readable_line_per_event(fake: FakeGroq, start_process: Any) -> None:
    proc = start_process({**groq_env(fake), "LOG_FORMAT": "text"})
    httpx.get(proc.url + "/healthz", headers={"x-request-id": "text-1"})
    proc.stop()
    [line] = [line for line in proc.lines if "request_id=text-1" in line]
    assert re.match(
        r"\d{4}-\d\d-\d\dT[\d:.]+Z INFO service request request_id=text-1 method=GET path=/healthz status=200 ", line
    )


def test_python_warnings_go_through_logging_as_json() -> None:
    stream = io.StringIO()
    logging.captureWarnings(False)  # undo earlier tests' set-up, which pytest's own warning capture has replaced
    logging_config.configure(level="INFO", fmt="json", stream=stream)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("something is deprecated", DeprecationWarning, stacklevel=1)
    [line] = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert line["logger"] == "py.warnings" and "something is deprecated" in line["msg"]
    logging.captureWarnings(False)


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_control_characters_never_split_a_log_line(fmt: str) -> None:
    stream = io.StringIO()
    odd = 'q"uot\u00e9'  # a secret JSON writes differently from its raw form
    logging_config.configure(level="INFO", fmt=fmt, stream=stream, secrets=("s3cret", odd))
    fields = {"path": "/a\nb\x1b[31m\u2028", "k": "s3cret", "odd": odd}
    logging.getLogger("service").info("x\r\ny", extra={"fields": fields})
    output = stream.getvalue()
    assert output.count("\n") == 1 and "\r" not in output and "\x1b" not in output and "\u2028" not in output
    assert "s3cret" not in output and output.count("[redacted]") == 2
    assert "uot" not in output
    logging.captureWarnings(False)


def test_two_workers_serve_and_stop_cleanly(fake: FakeGroq, start_process: Any) -> None:
    proc = start_process({**groq_env(fake), "WORKERS": "2"})
    statuses = {httpx.post(proc.url + "/chat", json={"prompt": "hi"}).status_code for _ in range(6)}
    assert statuses == {200}
    assert proc.stop() == 0
    started = [line for line in proc.json_lines() if "Started server process" in line["msg"]]
    assert len(started) == 2
