"""No secret reaches a log line, in either LOG_FORMAT, in any escaping: every secret holds `"` and `\\`, which JSON
escapes (and the text format, quoting a JSON-encoded value again, escapes twice), and each is written into every
place that reaches a log line: the request (its path, prompts with LOG_PROMPTS), Groq's completion and its error
text, and a configuration error."""

from __future__ import annotations

import json
import signal
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Process, free_port
from fake_groq import Behaviour, FakeGroq
from test_metrics import MODEL

from config import SettingsError, load_settings

GROQ_KEY = 'gsk_"groq\\key_7Hq2Lx9Vb4'
CLIENTS = ('c1_"alpha\\tok_Zr8Kp3Wm6Q', 'c2_"bravo\\tok_Jd5Nt1Yc7X')
SCRAPER = 'm_"scrape\\tok_Ue4Gh9Bs2F'
REDIS_PASSWORD = 'r_"redis\\pw_Ok6Va3Te8P'
SECRETS = (GROQ_KEY, *CLIENTS, SCRAPER, REDIS_PASSWORD)
RELOADED = ('c3_"reload\\tok_Bv6Ht9Lm3J', 'm_"reload\\scrape_Pq7Wn2Ks5R')  # a client's and the scraper's
TEXT = "every secret: " + " ".join(SECRETS)


def _escapings(run: str) -> set[str]:
    once = json.dumps(run)[1:-1]
    return {run, once, json.dumps(once)[1:-1], repr(run)[1:-1]}


def leaks(output: str, secrets: tuple[str, ...] = SECRETS) -> list[str]:
    """Every 8-character run of a secret found in `output` as written, JSON-escaped once or twice, or as repr()."""
    runs = {secret[i : i + 8] for secret in secrets for i in range(len(secret) - 7)}
    return sorted(form for run in runs for form in _escapings(run) if form in output)


def secret_env(groq_url: str, fmt: str) -> dict[str, str]:
    return {
        "GROQ_API_KEY": GROQ_KEY,
        "GROQ_BASE_URL": groq_url,
        "GROQ_MAX_RETRIES": "0",
        "SERVICE_API_KEYS": ",".join(CLIENTS),
        "METRICS": "true",
        "METRICS_TOKEN": SCRAPER,
        "REDIS_URL": f"redis://:{REDIS_PASSWORD}@127.0.0.1:{free_port()}/0",  # unused: no quota is set
        "LOG_FORMAT": fmt,
        "LOG_PROMPTS": "true",
        "LOG_LEVEL": "DEBUG",
    }


@pytest.fixture
def fake() -> Iterator[FakeGroq]:
    fake = FakeGroq(api_key=GROQ_KEY).start()
    fake.default = Behaviour(content=TEXT)
    fake.behaviours["fail/model"] = Behaviour(status=400, error={"message": TEXT, "type": "invalid_request_error"})
    yield fake
    fake.stop()


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_no_secret_reaches_a_log_line(fake: FakeGroq, start_process: Any, fmt: str) -> None:
    assert leaks(TEXT)  # the check finds each secret
    proc: Process = start_process(secret_env(fake.url, fmt))
    messages = [{"role": "system", "content": TEXT}, {"role": "user", "content": TEXT}]
    with httpx.Client(base_url=proc.url, timeout=30) as client:
        for i, token in enumerate((*CLIENTS, *CLIENTS)):
            auth = {"authorization": f"Bearer {token}"}
            stream = i >= 2
            answer = client.post("/chat", json={"prompt": TEXT, "stream": stream}, headers=auth)
            assert answer.status_code == 200 and "[redacted]" not in answer.text  # Groq's text reaches its client
            relayed = {"model": MODEL, "messages": messages, "stream": stream}
            assert client.post("/v1/chat/completions", json=relayed, headers=auth).status_code == 200
        auth = {"authorization": f"Bearer {CLIENTS[0]}"}
        failed = client.post("/chat", json={"prompt": TEXT, "model": "fail/model"}, headers=auth)
        assert failed.status_code == 400 and GROQ_KEY not in failed.text
        assert client.get("/" + urllib.parse.quote(TEXT), headers=auth).status_code == 404
        assert client.get("/metrics", headers=auth).status_code == 401
        assert client.get("/metrics", headers={"authorization": f"Bearer {SCRAPER}"}).status_code == 200
        scraper = {"authorization": f"Bearer {SCRAPER}"}
        assert client.post("/chat", json={"prompt": TEXT}, headers=scraper).status_code == 401
    assert len(fake.chat_requests()) == 9
    assert proc.stop() == 0
    output = "\n".join(proc.lines)
    assert not leaks(output), leaks(output)
    masked = "every secret: " + " ".join(["[redacted]"] * 5)
    if fmt == "json":
        parsed = [json.loads(line) for line in proc.lines]  # masking left every line valid JSON
        chat = [line for line in parsed if line.get("path") == "/chat" and line["status"] == 200]
        assert [(line["messages"], line["completion"]) for line in chat] == [
            ([{"role": "user", "content": masked}], masked)
        ] * 4
        relayed = [line for line in parsed if line.get("path") == "/v1/chat/completions"]
        assert [line["messages"][1]["content"] for line in relayed] == [masked] * 4
        assert [line["path"] for line in parsed if line.get("status") == 404] == ["/" + masked]
    else:
        chat = [line for line in proc.lines if " path=/chat " in line and " status=200 " in line]
        assert [line.count("[redacted]") for line in chat] == [10] * 4  # prompt and completion
        relayed = [line for line in proc.lines if " path=/v1/chat/completions " in line]
        assert [line.count("[redacted]") for line in relayed] == [15] * 4  # two messages and the completion


@pytest.mark.parametrize("fmt", ["json", "text"])
@pytest.mark.parametrize("secret", SECRETS)
def test_no_secret_reaches_a_configuration_error(start_process: Any, fmt: str, secret: str) -> None:
    """A secret pasted into a variable whose refusal shows the value (as repr() writes it)."""
    env = {**secret_env("https://api.groq.com", fmt), "GROQ_MODEL": secret}
    proc: Process = start_process(env, wait=False)
    assert proc.wait(30) == 1
    [line] = proc.lines
    assert "GROQ_MODEL must hold 1-128 characters" in line and "[redacted]" in line
    assert not leaks(line), leaks(line)


@pytest.mark.parametrize(
    "url", ["redis://:hunter2@[::1:6379/0", "redis://:hunter2@127.0.0.1:port/0", "redis://u:hunter2@h:0"]
)
def test_a_redis_url_that_does_not_parse_is_refused_and_its_password_still_masked(url: str) -> None:
    """The regular expression lets these through; urlsplit, which redis-py uses, cannot read them."""
    with pytest.raises(SettingsError) as raised:
        load_settings({"REDIS_URL": url})
    assert str(raised.value) == "REDIS_URL must look like redis://host:port/db or rediss://... (its value is not shown)"
    with pytest.raises(SettingsError) as raised:
        load_settings({"REDIS_URL": url, "GROQ_MODEL": "hunter2 x"})  # refused first, showing its value
    assert str(raised.value).endswith("(got '[redacted] x')")


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_secrets_read_by_a_reload_are_masked_in_every_form(
    fake: FakeGroq, start_process: Any, tmp_path: Path, fmt: str
) -> None:
    tokens, scraper = tmp_path / "tokens", tmp_path / "scraper"
    tokens.write_text(",".join(CLIENTS))
    scraper.write_text(SCRAPER)
    env = {**secret_env(fake.url, fmt), "SERVICE_API_KEYS_FILE": str(tokens), "METRICS_TOKEN_FILE": str(scraper)}
    del env["SERVICE_API_KEYS"], env["METRICS_TOKEN"]
    proc: Process = start_process(env)
    text = "reloaded: " + " ".join(RELOADED)
    assert leaks(text, RELOADED)  # the check finds each new secret
    tokens.write_text(RELOADED[0])
    scraper.write_text(RELOADED[1])
    proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while not any("reloaded: 1 client(s)" in line for line in proc.lines):
        assert time.monotonic() < deadline, "no reload line:\n" + "\n".join(proc.lines)
        time.sleep(0.02)
    auth = {"authorization": f"Bearer {RELOADED[0]}"}
    with httpx.Client(base_url=proc.url, timeout=30) as client:
        assert client.post("/chat", json={"prompt": text}, headers=auth).status_code == 200  # the prompt is logged
        assert client.get("/" + urllib.parse.quote(text), headers=auth).status_code == 404  # and the path
        assert client.get("/metrics", headers={"authorization": f"Bearer {RELOADED[1]}"}).status_code == 200
    assert proc.stop() == 0
    output = "\n".join(proc.lines)
    assert not leaks(output, RELOADED), leaks(output, RELOADED)
    masked = "reloaded: [redacted] [redacted]"
    if fmt == "json":
        parsed = [json.loads(line) for line in proc.lines]  # masking left every line valid JSON
        assert [line["messages"] for line in parsed if line.get("path") == "/chat"] == [
            [{"role": "user", "content": masked}]
        ]
        assert [line["path"] for line in parsed if line.get("status") == 404] == ["/" + masked]
    else:
        [chat] = [line for line in proc.lines if " path=/chat " in line]
        assert chat.count("[redacted]") == 2 + 5  # the prompt's two, and the five in the completion (TEXT)
        [missing] = [line for line in proc.lines if " status=404 " in line]
        assert missing.count("[redacted]") == 2
