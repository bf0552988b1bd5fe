"""Model labels come only from Groq's answers (a completion, a stream chunk naming the model), never from what a
client asked for: a client cannot fill the learned labels with its own strings."""

from __future__ import annotations

import json
import socket
import threading
from typing import Any

from conftest import Service, groq_env
from fake_groq import Behaviour, FakeGroq
from test_metrics import GEN_AI, OPERATION, STREAMED, USAGE, by, scrape, wait_for

OPERATIONS = "gen_ai_client_operation_duration_seconds_count"


def _leave_before_the_answer(fake: FakeGroq, url: str, body: dict[str, Any]) -> None:
    """Send a /chat request and close the connection once Groq has it, before Groq answers (the fake holds it)."""
    sent = len(fake.chat_requests())
    data = json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = b"POST /chat HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        sock.sendall(head + b"content-length: %d\r\n\r\n%s" % (len(data), data))
        wait_for(lambda: len(fake.chat_requests()) > sent, "Groq to receive the request")


def test_models_of_clients_that_left_before_groq_answered_never_take_a_label(
    fake: FakeGroq, start_service: Any
) -> None:
    """The reproduction: 16 made-up models, each from a client gone before Groq answered (status 499, no error),
    then a real answer. Before the fix the 16 filled the learned labels and the real model became `other`."""
    service: Service = start_service(groq_env(fake, METRICS="true"))
    held = threading.Event()
    fake.default = Behaviour(hold=held)  # every model but the real one: answered only once released
    fake.behaviours[STREAMED] = Behaviour()
    made_up = [f"made-up/{i:02d}" for i in range(16)]
    try:
        for i, model in enumerate(made_up):
            _leave_before_the_answer(fake, service.url, {"prompt": "x", "model": model, "stream": i % 2 == 1})
        gone = wait_for(lambda: len(lines := service.access_lines()) == 16 and lines, "the 16 access lines")
    finally:
        held.set()
    assert {(line["status"], line.get("error")) for line in gone} == {(499, None)}
    assert sorted(line["model"] for line in gone) == made_up  # the access line still shows what was asked for
    answer = service.client.post("/chat", json={"prompt": "Say hello", "model": STREAMED})
    assert (answer.status_code, answer.json()["model"]) == (200, STREAMED)
    service.access_lines(17)
    samples = scrape(service.url)
    assert by(samples, OPERATIONS, *OPERATION) == {(*GEN_AI, "other", ""): 16, (*GEN_AI, STREAMED, ""): 1}
    assert {key[-1] for key in by(samples, "gen_ai_client_token_usage_count", *USAGE)} == {STREAMED}
    assert "made-up" not in str(samples)


NAMELESS = [  # a stream whose chunks never name a model
    b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},"finish_reason":null}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
    b"data: [DONE]\n\n",
]


def test_a_model_groq_never_named_is_not_learned(fake: FakeGroq, start_service: Any) -> None:
    service: Service = start_service(groq_env(fake, METRICS="true"))
    fake.behaviours["nameless/model"] = Behaviour(raw_events=NAMELESS)
    body = {"prompt": "x", "model": "nameless/model", "stream": True}
    with service.client.stream("POST", "/chat", json=body) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: {")]
    assert json.loads(events[-1].removeprefix("data: "))["model"] == "nameless/model"  # the client's answer
    relayed = {"model": "nameless/model", "messages": [{"role": "user", "content": "x"}], "stream": True}
    assert service.client.post("/v1/chat/completions", json=relayed).status_code == 200
    lines = service.access_lines(2)
    assert [(line["status"], line["model"]) for line in lines] == [(200, "nameless/model")] * 2
    samples = scrape(service.url)
    assert by(samples, OPERATIONS, *OPERATION) == {(*GEN_AI, "other", ""): 2}
    assert "nameless" not in str(samples)
