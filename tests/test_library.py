"""`chat_api` used from a plain script: blocking calls, the same errors the app maps."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import groq_env
from fake_groq import Behaviour, FakeGroq

import chat_api
import errors

pytestmark = pytest.mark.both_transports  # every test here runs on httpx and on aiohttp


@pytest.fixture
def script_env(fake: FakeGroq, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeGroq:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name, value in groq_env(fake).items():
        monkeypatch.setenv(name, value)
    return fake


def test_chat_completion_returns_content_model_usage(script_env: FakeGroq) -> None:
    result = chat_api.chat_completion([{"role": "user", "content": "hi"}], temperature=0.5)
    assert result.content == "Hello from the fake Groq server."
    assert result.model == "openai/gpt-oss-20b"
    assert result.usage == {"prompt_tokens": 10, "completion_tokens": 6, "total_tokens": 16}
    assert result.finish_reason == "stop"
    [sent] = script_env.chat_requests()
    assert sent.body == {
        "messages": [{"role": "user", "content": "hi"}],
        "model": "openai/gpt-oss-20b",
        "temperature": 0.5,
    }


def test_chat_completion_reads_dotenv(script_env: FakeGroq, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GROQ_MODEL", raising=False)
    (tmp_path / ".env").write_text("GROQ_MODEL=qwen/qwen3.6-27b\n")
    assert chat_api.chat_completion([{"role": "user", "content": "hi"}]).model == "qwen/qwen3.6-27b"


def test_chat_completion_raises_the_mapped_error(script_env: FakeGroq) -> None:
    error = {"message": "Rate limit reached", "type": "tokens", "code": "rate_limit_exceeded"}
    script_env.behaviours["busy"] = Behaviour(status=429, error=error, headers={"retry-after": "2.5"})
    with pytest.raises(errors.RateLimited) as caught:
        chat_api.chat_completion([{"role": "user", "content": "hi"}], model="busy")
    assert (caught.value.status, caught.value.type, caught.value.retry_after) == (429, "rate_limited", "3")
    assert caught.value.message == "Rate limit reached"


def test_chat_completion_validates_like_the_app(script_env: FakeGroq) -> None:
    with pytest.raises(errors.ValidationError) as caught:
        chat_api.chat_completion([{"role": "bot", "content": "hi"}], temperature=9)
    assert {d["field"] for d in caught.value.details} == {"messages[0].role", "temperature"}
    assert script_env.received == []


def test_chat_completion_without_key_is_not_configured(script_env: FakeGroq, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GROQ_API_KEY")
    with pytest.raises(errors.NotConfigured):
        chat_api.chat_completion([{"role": "user", "content": "hi"}])


def test_stream_chat_completion_yields_deltas_then_metadata(script_env: FakeGroq) -> None:
    script_env.default = Behaviour(chunks=5)
    pieces = list(chat_api.stream_chat_completion([{"role": "user", "content": "hi"}]))
    *deltas, final = pieces
    assert deltas == ["t0 ", "t1 ", "t2 ", "t3 ", "t4 "]
    assert isinstance(final, chat_api.ChatResult)
    assert dataclasses.asdict(final) == {
        "content": "",
        "model": "openai/gpt-oss-20b",
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        "finish_reason": "stop",
        "reasoning": None,
    }
    assert script_env.chat_requests()[0].body["stream_options"] == {"include_usage": True}


def test_stopping_a_stream_early_closes_it_upstream(script_env: FakeGroq) -> None:
    script_env.default = Behaviour(chunks=500, chunk_delay=0.01)
    stream = chat_api.stream_chat_completion([{"role": "user", "content": "hi"}])
    assert next(stream) == "t0 "
    stream.close()  # type: ignore[attr-defined]
    assert script_env.stream_ended.wait(5)
    assert script_env.stream_ends[0][0] == "client_closed"
