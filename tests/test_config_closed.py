"""Configuration fails closed: `python app.py` stops with one line naming the variable (or the .env line),
in the log format asked for, and never prints a secret's value."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import CLIENT_TOKEN, ROOT, Process, groq_env
from fake_groq import FakeGroq

from config import load_settings

KEY = "gsk_live_secret_key_value_1234"  # a recognisable Groq key: it must appear in no output
APP = [sys.executable, str(ROOT / "app.py")]


def _fails(start_process: Any, env: dict[str, str], cwd: Path = ROOT) -> dict[str, Any]:
    """Start the service, expect exit code 1 with one JSON line; return that line."""
    proc: Process = start_process(env, command=APP, cwd=cwd, wait=False)
    assert proc.wait(30) == 1
    assert len(proc.lines) == 1, proc.lines
    line: dict[str, Any] = json.loads(proc.lines[0])
    assert line["level"] == "CRITICAL" and line["logger"] == "service"
    for secret in (KEY, CLIENT_TOKEN, "tok_short_1", "abcdefghijklmnop"):
        assert secret not in proc.lines[0]
    return line


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GROQ_API_KEY", KEY + "\n"),
        ("GROQ_API_KEY", "   "),
        ("GROQ_API_KEY", " " + KEY),
        ("GROQ_API_KEY", KEY[:8] + "\t" + KEY[8:]),
        ("GROQ_API_KEY", KEY + "\x1b"),
        ("SERVICE_API_KEYS", "tok_short_1"),
        ("SERVICE_API_KEYS", f"{CLIENT_TOKEN},tok_short_1"),
        ("SERVICE_API_KEYS", f"{CLIENT_TOKEN}\n"),
        ("SERVICE_API_KEYS", f"{CLIENT_TOKEN}, abcdefgh ijklmnop"),
        ("HOST", "local host"),
        ("HOST", "127.0.0.1:8000"),
        ("HOST", "[localhost]"),
        ("CORS_ORIGINS", "https://app.example/"),
        ("CORS_ORIGINS", "https://app.example/path"),
        ("CORS_ORIGINS", "app.example"),
        ("CORS_ORIGINS", "https://app.example:99999"),
        ("ALLOWED_HOSTS", "api.example.com:443"),
        ("ALLOWED_HOSTS", "*example.com"),
    ],
)
def test_a_bad_value_stops_the_service_naming_the_variable(start_process: Any, name: str, value: str) -> None:
    env = {"GROQ_API_KEY": KEY, name: value}
    line = _fails(start_process, env)
    assert line["msg"].startswith(f"configuration error: {name} "), line["msg"]
    if name in ("GROQ_API_KEY", "SERVICE_API_KEYS"):
        assert line["msg"].endswith("the value is not shown")


def test_a_secret_pasted_into_another_variable_is_not_printed(start_process: Any) -> None:
    line = _fails(start_process, {"GROQ_API_KEY": KEY, "GROQ_BASE_URL": KEY, "SERVICE_API_KEYS": CLIENT_TOKEN})
    assert line["msg"].startswith("configuration error: GROQ_BASE_URL ") and "(a value of 30 characters)" in line["msg"]
    line = _fails(start_process, {"SERVICE_API_KEYS": CLIENT_TOKEN, "GROQ_MODEL": CLIENT_TOKEN[:20] + " x"})
    assert "(got '[redacted] x')" in line["msg"]


def test_forwarded_allow_ips_star_is_refused_without_tokens(start_process: Any) -> None:
    line = _fails(start_process, {"GROQ_API_KEY": KEY, "FORWARDED_ALLOW_IPS": "127.0.0.1, *"})
    assert line["msg"].startswith("configuration error: FORWARDED_ALLOW_IPS=* ") and "SERVICE_API_KEYS" in line["msg"]
    assert load_settings({"FORWARDED_ALLOW_IPS": "*", "SERVICE_API_KEYS": CLIENT_TOKEN}).forwarded_allow_ips == "*"


@pytest.mark.parametrize(
    ("dotenv", "line_number"),
    [
        ('GROQ_MODEL=openai/gpt-oss-20b\nALLOWED_MODELS="openai/gpt-oss-20b\nLOG_LEVEL=INFO\n', 2),
        (f"# comment\n\nGROQ_API_KEY='{KEY}\n", 3),
        (f"GROQ_API_KEY={KEY}\nnot a variable line\n", 2),
        ("GROQ_MODEL=openai/gpt-oss-20b\nALLOWED_MODELS\nLOG_LEVEL=INFO\n", 2),  # a bare key: the allowlist lost
        ("# keys\n\nGROQ_MODEL=openai/gpt-oss-20b\n\n  gsk_stray_token_0123  \n", 5),  # a stray token line
        ("export LOG_LEVEL\n", 1),
    ],
)
def test_an_unparsable_dotenv_line_stops_the_service(
    start_process: Any, tmp_path: Path, dotenv: str, line_number: int
) -> None:
    (tmp_path / ".env").write_text(dotenv)
    line = _fails(start_process, {}, cwd=tmp_path)
    assert line["msg"] == (
        f"configuration error: .env line {line_number} cannot be parsed (check its quotes and the KEY=value form)"
    )


def test_a_dotenv_that_is_not_utf8_stops_the_service(start_process: Any, tmp_path: Path) -> None:
    (tmp_path / ".env").write_bytes(b"GROQ_MODEL=\xff\n")
    assert _fails(start_process, {}, cwd=tmp_path)["msg"] == (
        "configuration error: .env cannot be read as UTF-8 text; fix or remove it"
    )


def test_an_unparsable_dotenv_line_in_text_mode_is_one_text_line(start_process: Any, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text('LOG_FORMAT=text\nALLOWED_MODELS="a\n')
    proc: Process = start_process({"LOG_FORMAT": "text"}, command=APP, cwd=tmp_path, wait=False)
    assert proc.wait(30) == 1
    [line] = proc.lines
    assert line.endswith(
        " CRITICAL service configuration error: .env line 2 cannot be parsed (check its quotes and the KEY=value form)"
    )


def test_host_is_stripped_and_an_ipv6_literal_may_be_bracketed(fake: FakeGroq, start_process: Any) -> None:
    proc: Process = start_process(groq_env(fake, HOST=" [::1] "), command=APP, wait=False)
    deadline = time.monotonic() + 30
    while True:
        assert proc.proc.poll() is None, proc.lines
        try:
            response = httpx.get(f"http://[::1]:{proc.port}/healthz", timeout=1)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, proc.lines
            time.sleep(0.05)
    assert response.status_code == 200
    assert proc.stop() == 0
    assert load_settings({"HOST": " 127.0.0.1\n"}).host == "127.0.0.1"


def test_valid_secrets_and_lists_are_read_as_written() -> None:
    settings = load_settings(
        {
            "GROQ_API_KEY": KEY,
            "SERVICE_API_KEYS": f" {CLIENT_TOKEN} , {'x' * 16},",
            "CORS_ORIGINS": "https://App.example:8443, http://[::1]:3000, *",
            "ALLOWED_HOSTS": "API.example.com, *.corp.example, ::1, 10.0.0.5",
        }
    )
    assert settings.groq_api_key == KEY and settings.service_api_keys == (CLIENT_TOKEN, "x" * 16)
    assert settings.cors_origins == ("https://app.example:8443", "http://[::1]:3000", "*")
    assert settings.allowed_hosts == ("api.example.com", "*.corp.example", "[::1]", "10.0.0.5")
    assert load_settings({"GROQ_API_KEY": ""}).groq_api_key is None
