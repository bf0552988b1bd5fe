"""SERVICE_KEYS_FILE: named clients by token digest, their names in logs, their own limits and models."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import groq_env
from fake_groq import FakeGroq

from config import SettingsError, load_settings

OPS_TOKEN = "svc_ops_canary_token_5a4b3c2d1e"
BATCH_TOKEN = "svc_batch_canary_token_0f9e8d7c"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def keys_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    return str(path)


GOOD = f"""
[[keys]]
name = "ops"
sha256 = "{digest(OPS_TOKEN)}"
requests_per_minute = 2
allowed_models = ["openai/gpt-oss-20b"]

[[keys]]
name = "batch"
sha256 = "{digest(BATCH_TOKEN).upper()}"
"""


def test_named_clients_with_their_own_limits_and_models(fake: FakeGroq, start_service: Any, tmp_path: Path) -> None:
    env = groq_env(fake, SERVICE_KEYS_FILE=keys_file(tmp_path, GOOD), QUOTA_REQUESTS_PER_MINUTE="5")
    service = start_service(env)
    ops = {"Authorization": f"Bearer {OPS_TOKEN}"}
    batch = {"Authorization": f"Bearer {BATCH_TOKEN}"}
    other_model = {"prompt": "hi", "model": "openai/gpt-oss-120b"}
    refused = service.client.post("/chat", json=other_model, headers=ops)
    assert refused.status_code == 422
    assert (
        refused.json()["error"]["details"][0]["message"]
        == "model must be one of the allowed models: openai/gpt-oss-20b"
    )
    assert service.client.post("/chat", json={"prompt": "hi"}, headers=ops).status_code == 200
    models = service.client.get("/v1/models", headers=ops)
    assert [m["id"] for m in models.json()["data"]] == ["openai/gpt-oss-20b"]
    over = service.client.post("/chat", json={"prompt": "hi"}, headers=ops)
    assert (over.status_code, over.headers["x-ratelimit-limit-requests"]) == (429, "2")
    answers = [service.client.post("/chat", json=other_model, headers=batch) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[-1].headers["x-ratelimit-limit-requests"] == "5"
    assert answers[-1].headers["x-ratelimit-remaining-requests"] == "2"
    assert len(service.client.get("/v1/models", headers=batch).json()["data"]) == 3
    assert (
        service.client.post("/chat", json={"prompt": "hi"}, headers={"Authorization": "Bearer nope"}).status_code == 401
    )
    lines = service.access_lines(9)
    assert [line.get("key") for line in lines] == ["ops"] * 4 + ["batch"] * 4 + [None]
    assert not any("key_id" in line for line in lines)
    assert OPS_TOKEN not in service.log_text() and BATCH_TOKEN not in service.log_text()


def test_a_client_without_limits_is_not_counted(fake: FakeGroq, start_service: Any, tmp_path: Path) -> None:
    service = start_service(groq_env(fake, SERVICE_KEYS_FILE=keys_file(tmp_path, GOOD)))  # no QUOTA_* defaults
    batch = service.client.post("/chat", json={"prompt": "hi"}, headers={"Authorization": f"Bearer {BATCH_TOKEN}"})
    assert batch.status_code == 200
    assert not [name for name in batch.headers if name.startswith("x-ratelimit")]
    ops = service.client.post("/chat", json={"prompt": "hi"}, headers={"Authorization": f"Bearer {OPS_TOKEN}"})
    assert ops.headers["x-ratelimit-remaining-requests"] == "1"


def test_env_tokens_keep_their_key_id(fake: FakeGroq, start_service: Any) -> None:
    service = start_service(groq_env(fake, SERVICE_API_KEYS=OPS_TOKEN, QUOTA_REQUESTS_PER_MINUTE="1"))
    headers = {"Authorization": f"Bearer {OPS_TOKEN}"}
    assert [service.client.post("/chat", json={"prompt": "hi"}, headers=headers).status_code for _ in "ab"] == [
        200,
        429,
    ]
    assert [line["key_id"] for line in service.access_lines(2)] == [digest(OPS_TOKEN)[:8]] * 2


ENTRY = f'name = "a"\nsha256 = "{"ab" * 32}"\n'


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        (
            f"[[keys]]\n{ENTRY}",
            {"SERVICE_API_KEYS": "tok_long_enough_0123456789"},
            "Set SERVICE_API_KEYS or SERVICE_KEYS_FILE, not both",
        ),
        (
            "[[keys]\nname = 1",
            {},
            "SERVICE_KEYS_FILE is not valid TOML (Expected ']]' at the end of an array declaration (at line 1",
        ),
        ("a = " + "[" * 5000 + "]" * 5000, {}, "SERVICE_KEYS_FILE is nested too deeply to parse"),
        ("", {}, "SERVICE_KEYS_FILE must hold one or more [[keys]] tables and nothing else"),
        (f"other = 1\n[[keys]]\n{ENTRY}", {}, "SERVICE_KEYS_FILE must hold one or more [[keys]] tables"),
        ("keys = [1]", {}, "SERVICE_KEYS_FILE keys[0] must be a table with name and sha256"),
        (f"[[keys]]\n{ENTRY}token = 'x'", {}, "SERVICE_KEYS_FILE keys[0] has unknown fields token (allowed: "),
        ('[[keys]]\nname = "a b"\nsha256 = "00"', {}, "SERVICE_KEYS_FILE keys[0].name must be 1-64 characters"),
        (
            '[[keys]]\nname = "a"\nsha256 = "abc"',
            {},
            "SERVICE_KEYS_FILE keys[0] ('a').sha256 must be the token's SHA-256",
        ),
        (f'[[keys]]\nname = "a"\nsha256 = "{"g" * 64}"', {}, "SERVICE_KEYS_FILE keys[0] ('a').sha256 must be"),
        (
            "[[keys]]\n" + ENTRY + "[[keys]]\n" + ENTRY.replace('"a"', '"b"'),
            {},
            "SERVICE_KEYS_FILE entries 'a' and 'b' have the same sha256",
        ),
        (f"[[keys]]\n{ENTRY}[[keys]]\n{ENTRY.replace('ab', 'cd')}", {}, "SERVICE_KEYS_FILE has two entries named 'a'"),
        (
            f"[[keys]]\n{ENTRY}tokens_per_day = 0",
            {},
            "SERVICE_KEYS_FILE keys[0] ('a').tokens_per_day must be a whole number",
        ),
        (
            f"[[keys]]\n{ENTRY}requests_per_minute = true",
            {},
            "SERVICE_KEYS_FILE keys[0] ('a').requests_per_minute must",
        ),
        (f"[[keys]]\n{ENTRY}allowed_models = 'x'", {}, "SERVICE_KEYS_FILE keys[0] ('a').allowed_models must be a list"),
        (
            f"[[keys]]\n{ENTRY}allowed_models = ['m1']",
            {},
            "SERVICE_KEYS_FILE entry 'a': allowed_models must include GROQ_MODEL",
        ),
        (
            f"[[keys]]\n{ENTRY}allowed_models = ['openai/gpt-oss-20b']",
            {"ALLOWED_MODELS": "m1,openai/gpt-oss-120b", "GROQ_MODEL": "m1"},
            "SERVICE_KEYS_FILE entry 'a': allowed_models must include GROQ_MODEL",
        ),
        (
            f"[[keys]]\n{ENTRY}allowed_models = ['m1', 'm2']",
            {"ALLOWED_MODELS": "m1", "GROQ_MODEL": "m1"},
            "SERVICE_KEYS_FILE entry 'a': allowed_models must be among ALLOWED_MODELS",
        ),
    ],
)
def test_keys_file_mistakes_stop_the_start(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings({"SERVICE_KEYS_FILE": keys_file(tmp_path, text), **env})
    assert str(raised.value).startswith(message)


def test_a_missing_keys_file_is_one_start_up_line(tmp_path: Path, start_process: Any) -> None:
    proc = start_process({"SERVICE_KEYS_FILE": str(tmp_path / "absent.toml")}, wait=False)
    assert proc.wait() == 1
    (line,) = proc.json_lines()
    assert line["msg"] == "configuration error: SERVICE_KEYS_FILE cannot be read (No such file or directory)"


def test_per_key_limits_turn_quotas_on(tmp_path: Path) -> None:
    settings = load_settings({"SERVICE_KEYS_FILE": keys_file(tmp_path, GOOD)})
    assert settings.quotas_on()
    assert [(k.name, k.requests_per_minute) for k in settings.service_keys] == [("ops", 2), ("batch", None)]
    assert digest(OPS_TOKEN) not in repr(settings)
    without = load_settings({"SERVICE_KEYS_FILE": keys_file(tmp_path, f"[[keys]]\n{ENTRY}")})
    assert not without.quotas_on()
    assert json.dumps([k.name for k in without.service_keys]) == '["a"]'
