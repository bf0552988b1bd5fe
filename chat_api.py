"""The script API: `chat_completion` and `stream_chat_completion`, blocking calls to Groq with the app's code.

    from chat_api import chat_completion
    print(chat_completion([{"role": "user", "content": "Hello"}]).content)

The settings come from the environment and `.env` in the working directory, as for the app; the messages and
parameters pass the same validation as /chat's (a bad one raises errors.ValidationError), and Groq's errors
arrive as the same errors.ServiceError classes. It sits above validation.py and llm.py, and the app never
imports it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from config import load_settings
from groq_wire import ChatResult
from llm import Upstream
from validation import parse_chat

__all__ = ["ChatResult", "chat_completion", "stream_chat_completion"]
Messages = list[dict[str, str]]


def chat_completion(messages: Messages, model: str | None = None, **params: Any) -> ChatResult:
    """For scripts: blocking, config from env/`.env`; the app's code on a private loop, so not inside a running one."""

    async def run() -> ChatResult:
        upstream, body = _script_call(messages, model, params)
        try:
            return await upstream.chat(body)
        finally:
            await upstream.aclose()

    return asyncio.run(run())


def stream_chat_completion(messages: Messages, model: str | None = None, **params: Any) -> Iterator[str | ChatResult]:
    """Blocking stream for scripts: text deltas as they arrive (not the reasoning), then the final ChatResult."""
    upstream, body = _script_call(messages, model, params)
    loop = asyncio.new_event_loop()
    pieces = upstream.chat_stream(body)
    try:
        while (piece := loop.run_until_complete(anext(pieces, None))) is not None:
            if isinstance(piece, ChatResult):
                yield piece
            else:
                yield from (text for kind, text in piece if kind == "content")
    finally:
        loop.run_until_complete(pieces.aclose())
        loop.run_until_complete(upstream.aclose())
        loop.close()


def _script_call(messages: Messages, model: str | None, params: dict[str, Any]) -> tuple[Upstream, dict[str, Any]]:
    settings = load_settings()
    body: dict[str, Any] = {"messages": messages, **params}
    if model is not None:
        body["model"] = model
    request = parse_chat(body, allowed_models=settings.allowed_models)
    model = request.model or settings.groq_model
    return Upstream(settings), {"messages": request.messages, "model": model, **request.params}
