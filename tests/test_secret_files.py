"""`<NAME>_FILE`: each secret read from a file (Docker secrets, systemd credentials), and every start-up error."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import groq_env
from fake_groq import API_KEY, FakeGroq

from config import load_settings

TOKEN = "svc_file_canary_token_55555555"
OTHER = "svc_file_other_token_666666666"
SECRET_TEXT = "gsk canary content 0123456789"  # what a refused file holds: never printed


def test_secrets_are_read_from_their_files(fake: FakeGroq, start_process: Any, tmp_path: Path) -> None:
    (tmp_path / "groq").write_text(API_KEY + "\n")  # one trailing newline, as `echo` writes, is not the value's
    (tmp_path / "tokens").write_text(f"{TOKEN}, {OTHER}\n")
    env = groq_env(fake, GROQ_API_KEY_FILE=str(tmp_path / "groq"), SERVICE_API_KEYS_FILE=str(tmp_path / "tokens"))
    del env["GROQ_API_KEY"]
    proc = start_process(env)
    for token in (TOKEN, OTHER):
        answer = httpx.post(proc.url + "/chat", json={"prompt": "hi"}, headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200
    assert httpx.post(proc.url + "/chat", json={"prompt": "hi"}).status_code == 401
    assert {r.headers["authorization"] for r in fake.chat_requests()} == {f"Bearer {API_KEY}"}
    assert proc.stop() == 0
    assert not any(secret in line for line in proc.lines for secret in (API_KEY, TOKEN, OTHER))


def test_redis_url_from_its_file(tmp_path: Path) -> None:
    (tmp_path / "redis").write_text("redis://:canary-password@127.0.0.1:6379/0\n")
    settings = load_settings({"REDIS_URL_FILE": str(tmp_path / "redis"), "QUOTA_REQUESTS_PER_MINUTE": "5"})
    assert settings.redis_url == "redis://:canary-password@127.0.0.1:6379/0"
    assert "canary-password" in settings.secrets()  # so the log masks it


def _write(tmp_path: Path, content: str | bytes | None) -> str:
    path = tmp_path / "secret"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    return str(path)


# (environment; what the file holds: None for no file, "dir" for a directory, "fifo" for a named pipe with no
# writer, which would block a plain open; the message after "configuration error: ")
STARTUP_ERRORS = [
    ({"GROQ_API_KEY": "gsk_x", "GROQ_API_KEY_FILE": "{path}"}, "k", "Set GROQ_API_KEY or GROQ_API_KEY_FILE, not both"),
    (
        {"SERVICE_API_KEYS": TOKEN, "SERVICE_API_KEYS_FILE": "{path}"},
        TOKEN,
        "Set SERVICE_API_KEYS or SERVICE_API_KEYS_FILE, not both",
    ),
    ({"REDIS_URL": "redis://h:1/0", "REDIS_URL_FILE": "{path}"}, "redis://h:1/0", "Set REDIS_URL or REDIS_URL_FILE"),
    ({"GROQ_API_KEY_FILE": "{path}"}, None, "GROQ_API_KEY_FILE: {path} cannot be read (No such file or directory)"),
    ({"GROQ_API_KEY_FILE": "{path}"}, "dir", "GROQ_API_KEY_FILE: {path} cannot be read (Is a directory)"),
    ({"GROQ_API_KEY_FILE": "{path}"}, "fifo", "GROQ_API_KEY_FILE: {path} cannot be read (not a regular file)"),
    ({"GROQ_API_KEY_FILE": "/dev/zero"}, None, "GROQ_API_KEY_FILE: /dev/zero cannot be read (not a regular file)"),
    ({"SERVICE_KEYS_FILE": "{path}"}, "fifo", "SERVICE_KEYS_FILE cannot be read (not a regular file)"),
    ({"SERVICE_KEYS_FILE": "/dev/zero"}, None, "SERVICE_KEYS_FILE cannot be read (not a regular file)"),
    ({"GROQ_API_KEY_FILE": "{path}"}, "g" * 65537, "GROQ_API_KEY_FILE: {path} is too large (over 64 KiB)"),
    ({"SERVICE_KEYS_FILE": "{path}"}, "#" * (1 << 20) + "\n", "SERVICE_KEYS_FILE is too large (over 1 MiB)"),
    ({"GROQ_API_KEY_FILE": "{path}"}, b"\xff" + SECRET_TEXT.encode(), "GROQ_API_KEY_FILE: {path} cannot be read (not"),
    ({"GROQ_API_KEY_FILE": "{path}"}, "", "GROQ_API_KEY_FILE: {path} is empty"),
    ({"SERVICE_API_KEYS_FILE": "{path}"}, "\n", "SERVICE_API_KEYS_FILE: {path} is empty"),
    ({"GROQ_API_KEY_FILE": "{path}"}, SECRET_TEXT, "GROQ_API_KEY_FILE ({path}) must be printable ASCII"),
    ({"GROQ_API_KEY_FILE": "{path}"}, "gsk_canary_0123456789\n\n", "GROQ_API_KEY_FILE ({path}) must be printable"),
    ({"GROQ_API_KEY_FILE": "{path}"}, "gsk_canary_0123456789\r\n", "GROQ_API_KEY_FILE ({path}) must be printable"),
    ({"SERVICE_API_KEYS_FILE": "{path}"}, "short", "SERVICE_API_KEYS_FILE ({path}) entries must be at least 16"),
    ({"REDIS_URL_FILE": "{path}"}, "http://" + SECRET_TEXT, "REDIS_URL_FILE ({path}) must look like redis://"),
    (
        {"METRICS": "true", "METRICS_TOKEN": OTHER, "METRICS_TOKEN_FILE": "{path}"},
        OTHER,
        "Set METRICS_TOKEN or METRICS_TOKEN_FILE, not both",
    ),
    ({"METRICS_TOKEN_FILE": "{path}"}, None, "METRICS_TOKEN_FILE: {path} cannot be read (No such file or directory)"),
    ({"METRICS_TOKEN_FILE": "{path}"}, "dir", "METRICS_TOKEN_FILE: {path} cannot be read (Is a directory)"),
    ({"METRICS_TOKEN_FILE": "{path}"}, "", "METRICS_TOKEN_FILE: {path} is empty"),
    ({"METRICS_TOKEN_FILE": "{path}"}, "\n", "METRICS_TOKEN_FILE: {path} is empty"),
    ({"METRICS_TOKEN_FILE": "{path}"}, SECRET_TEXT, "METRICS_TOKEN_FILE ({path}) must be printable ASCII"),
    ({"METRICS_TOKEN_FILE": "{path}"}, "canary-short", "METRICS_TOKEN_FILE ({path}) must be at least 16"),
    (
        {"METRICS": "true", "SERVICE_API_KEYS": "svc_canary_client_0123456789", "METRICS_TOKEN_FILE": "{path}"},
        "svc_canary_client_0123456789",
        "METRICS_TOKEN must differ from every client token",
    ),
]


@pytest.mark.parametrize(("env", "content", "message"), STARTUP_ERRORS)
def test_every_start_up_error_names_the_variable_or_path(
    env: dict[str, str], content: str | bytes | None, message: str, start_process: Any, tmp_path: Path
) -> None:
    if content == "dir":
        path = str(tmp_path)
    elif content == "fifo":
        path = str(tmp_path / "pipe")
        os.mkfifo(path)
    else:
        path = _write(tmp_path, content) if content is not None else str(tmp_path / "missing")
    proc = start_process({k: v.replace("{path}", path) for k, v in env.items()}, wait=False)
    assert proc.wait() == 1
    [line] = proc.lines
    record = json.loads(line)
    assert record["level"] == "CRITICAL"
    assert record["msg"].startswith("configuration error: " + message.replace("{path}", path)), record["msg"]
    assert "canary" not in line and "gsk_x" not in line  # neither the file's content nor the other value
