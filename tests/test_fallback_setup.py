"""FALLBACK_MODELS: its start-up errors, a client's allowed_models, the quota and the metrics of a fallback."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from conftest import groq_env
from fake_groq import FakeGroq, groq_error
from test_chat import assert_error
from test_config_closed import _fails
from test_metrics import by, scrape

from config import SettingsError, load_settings

A, B, C = "openai/gpt-oss-120b", "openai/gpt-oss-20b", "qwen/qwen3.6-27b"
ASK_A = {"prompt": "Say hello", "model": A}


@pytest.mark.parametrize(
    ("value", "env", "message"),
    [
        ("a", {}, "FALLBACK_MODELS entries must be model>fallback pairs such as"),
        ("a>", {}, "FALLBACK_MODELS entries must be model>fallback pairs such as"),
        (">b", {}, "FALLBACK_MODELS entries must be model>fallback pairs such as"),
        ("a>b>c", {}, "FALLBACK_MODELS entries must be model>fallback pairs such as"),
        ("a b>c", {}, "FALLBACK_MODELS entries must be model>fallback pairs such as"),
        ("a>b;c>d", {}, "FALLBACK_MODELS entries must be model>fallback pairs such as"),
        ("a>a", {}, "FALLBACK_MODELS: 'a' falls back to itself"),
        ("a>b,a>c", {}, "FALLBACK_MODELS gives 'a' two fallbacks ('b' and 'c'); keep one"),
        ("a>b,a>b", {}, "FALLBACK_MODELS gives 'a' two fallbacks ('b' and 'b'); keep one"),
        ("a>b,b>a", {}, "FALLBACK_MODELS has a cycle: a > b > a"),
        ("x>a,a>b,b>c,c>a", {}, "FALLBACK_MODELS has a cycle: a > b > c > a"),
        (f"{A}>{C}", {"ALLOWED_MODELS": f"{A},{B}", "GROQ_MODEL": B}, "FALLBACK_MODELS: 'openai/gpt-oss-120b' falls"),
    ],
)
def test_a_bad_fallback_list_is_a_startup_error_naming_it(value: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"FALLBACK_MODELS": value, **env})
    assert str(caught.value).startswith(message), str(caught.value)


def test_a_fallback_outside_allowed_models_names_both() -> None:
    env = {"FALLBACK_MODELS": f"{A}>{C}", "ALLOWED_MODELS": f"{A},{B}", "GROQ_MODEL": B}
    with pytest.raises(SettingsError) as caught:
        load_settings(env)
    assert str(caught.value) == (
        "FALLBACK_MODELS: 'openai/gpt-oss-120b' falls back to 'qwen/qwen3.6-27b', which is not in ALLOWED_MODELS"
    )


def test_pairs_are_read_with_spaces_and_empty_entries_dropped_into_chains() -> None:
    settings = load_settings({"FALLBACK_MODELS": f" {A} > {B} ,, {B}>{C} ,", "ALLOWED_MODELS": f"{A},{B},{C}"})
    assert settings.fallback_models == ((A, (B, C)), (B, (C,)))
    assert load_settings({}).fallback_models == ()
    assert load_settings({"FALLBACK_MODELS": " "}).fallback_models == ()


@pytest.mark.parametrize("value", ["a>b,b>a", "openai/gpt-oss-120b"])
def test_the_service_does_not_start_with_a_bad_fallback_list(start_process: Any, value: str) -> None:
    line = _fails(start_process, {"GROQ_API_KEY": "gsk_live_secret_key_value_1234", "FALLBACK_MODELS": value})
    assert line["msg"].startswith("configuration error: FALLBACK_MODELS "), line["msg"]


NARROW_TOKEN = "svc_narrow_canary_token_77aa11bb"
ONLY_A_TOKEN = "svc_only_a_canary_token_88cc22dd"
WIDE_TOKEN = "svc_wide_canary_token_99ee33ff00"


def _keys_file(tmp_path: Path) -> str:
    entries = [
        ("narrow", NARROW_TOKEN, f'["{A}", "{C}"]'),
        ("only_a", ONLY_A_TOKEN, f'["{A}"]'),
        ("wide", WIDE_TOKEN, ""),
    ]
    text = ""
    for name, token, models in entries:
        text += f'[[keys]]\nname = "{name}"\nsha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\n'
        text += f"allowed_models = {models}\n\n" if models else "\n"
    path = tmp_path / "keys.toml"
    path.write_text(text)
    return str(path)


def test_a_clients_allowed_models_bound_its_fallbacks(fake: FakeGroq, start_service: Any, tmp_path: Path) -> None:
    fake.behaviours[A] = groq_error(429, A)
    env = groq_env(fake, FALLBACK_MODELS=f"{A}>{B},{B}>{C}", GROQ_MODEL=A, SERVICE_KEYS_FILE=_keys_file(tmp_path))
    service = start_service(env)

    def ask(token: str) -> Any:
        fake.received.clear()
        return service.client.post("/chat", json=ASK_A, headers={"Authorization": f"Bearer {token}"})

    narrow = ask(NARROW_TOKEN)  # may not use B: skipped, C answers
    assert (narrow.status_code, narrow.json()["model"]) == (200, C)
    assert [r.body["model"] for r in fake.chat_requests()] == [A, C]
    wide = ask(WIDE_TOKEN)
    assert (wide.status_code, wide.json()["model"]) == (200, B)
    assert [r.body["model"] for r in fake.chat_requests()] == [A, B]
    assert_error(ask(ONLY_A_TOKEN), 429, "rate_limited")  # no fallback it may use: Groq's 429 as without one
    assert [r.body["model"] for r in fake.chat_requests()] == [A]
    lines = service.access_lines(3)
    assert [(a["key"], a.get("fallback_from"), a.get("attempts")) for a in lines] == [
        ("narrow", A, 2),
        ("wide", A, 2),
        ("only_a", None, None),
    ]


def test_the_quota_charges_the_call_that_answered(fake: FakeGroq, start_service: Any) -> None:
    fake.behaviours |= {A: groq_error(429, A), B: groq_error(498, B)}
    service = start_service(groq_env(fake, FALLBACK_MODELS=f"{A}>{B},{B}>{C}", QUOTA_TOKENS_PER_MINUTE="100000"))
    answered = service.client.post("/chat", json=ASK_A)
    assert (answered.status_code, answered.json()["model"]) == (200, C)
    usage = answered.json()["usage"]
    fake.behaviours[C] = groq_error(429, C)
    assert_error(service.client.post("/chat", json=ASK_A), 429, "rate_limited")
    first, refused = service.access_lines(2)
    assert first["charged_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]  # refused calls cost 0
    assert (refused["charged_tokens"], refused["attempts"]) == (0, 3)
    del fake.behaviours[C]
    reserved = 16 // 4 + 1024  # the next request's body bytes / 4 and QUOTA_DEFAULT_RESERVE
    remaining = service.client.post("/chat", json={"prompt": "hi"}, headers={"content-type": "application/json"})
    assert int(remaining.headers["x-ratelimit-remaining-tokens"]) == 100000 - first["charged_tokens"] - reserved


def test_metrics_count_each_fallback_and_each_groq_call(fake: FakeGroq, start_service: Any) -> None:
    fake.behaviours |= {A: groq_error(429, A), B: groq_error(503, B)}
    service = start_service(groq_env(fake, FALLBACK_MODELS=f"{A}>{B},{B}>{C}", METRICS="true"))
    assert service.client.post("/chat", json=ASK_A).json()["model"] == C
    assert service.client.post("/chat", json={**ASK_A, "model": C}).status_code == 200  # C has no fallback
    samples = scrape(service.url)
    assert by(samples, "groq_proxy_fallbacks_total", "from", "to") == {(A, B): 1.0, (B, C): 1.0}
    labels = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "error_type")
    calls = by(samples, "gen_ai_client_operation_duration_seconds_count", *labels)
    assert calls == {
        ("chat", "groq", A, "rate_limited"): 1.0,
        ("chat", "groq", B, "upstream_error"): 1.0,
        ("chat", "groq", C, ""): 2.0,
    }
    tokens = by(samples, "groq_proxy_tokens_total", "key", "gen_ai_token_type", "gen_ai_response_model")
    assert tokens == {("none", "input", C): 22.0, ("none", "output", C): 12.0}


OPERATION = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "error_type")


@pytest.mark.parametrize("stream", [False, True])
def test_the_answering_calls_duration_leaves_out_the_failed_ones(
    fake: FakeGroq, start_service: Any, stream: bool
) -> None:
    """A answers 503 after 1.5 s, B at once: B's operation (and a stream's first token) is B's time, not A's too."""
    fake.behaviours[A] = groq_error(503, A, delay=1.5)
    service = start_service(groq_env(fake, FALLBACK_MODELS=f"{A}>{B}", METRICS="true"))
    response = service.client.post("/chat", json={**ASK_A, "stream": stream})
    assert response.status_code == 200
    samples = scrape(service.url)
    seconds = by(samples, "gen_ai_client_operation_duration_seconds_sum", *OPERATION)
    assert set(seconds) == {("chat", "groq", A, "upstream_error"), ("chat", "groq", B, "")}
    assert seconds[("chat", "groq", A, "upstream_error")] >= 1.5
    assert seconds[("chat", "groq", B, "")] < 1.0  # 1.5 s more without the fix; 1 s of slack for a busy machine
    first_token = by(samples, "gen_ai_server_time_to_first_token_seconds_sum", *OPERATION[:3], "gen_ai_response_model")
    assert list(first_token) == ([("chat", "groq", B, B)] if stream else [])
    assert all(value < 1.0 for value in first_token.values())
    access = service.access_lines(2)[0]  # the scrape's is the second
    assert access["upstream_ms"] >= 1500  # the access line's wait on Groq is still the whole chain's
