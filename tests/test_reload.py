"""SIGHUP reloads SERVICE_KEYS_FILE and the secrets' files in `python app.py` (and in each of its workers).

Real processes and real signals: streams held open at the fake Groq (released by a gate, never by a sleep) while
the files change, and the reload's own log lines say when each worker has applied it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Process, groq_env
from fake_groq import API_KEY, Behaviour, FakeGroq
from test_streaming import sse_events

from app import create_app
from config import ServiceKey, Settings, SettingsError
from reloading import Reloader, check_applicable

pytestmark = pytest.mark.slow
HELD = "openai/gpt-oss-120b"  # the model whose streams the fake holds before their first word
ALPHA = "svc_alpha_canary_token_11111111"
BETA = "svc_beta_canary_token_222222222"
BETA_NEW = "svc_beta_new_canary_token_33333"
GAMMA = "svc_gamma_canary_token_44444444"
NEW_GROQ_KEY = "gsk_rotated_fake_key_9876543210"
SCRAPER = "m_scraper_canary_token_55555555"
SCRAPER_NEW = "m_scraper_new_canary_token_666"
CONTENT = "Hello from the fake Groq server."


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def write_keys(path: Path, clients: dict[str, str], **extra: str) -> None:
    """A SERVICE_KEYS_FILE: one [[keys]] table per (name, token), with extra lines for the named client."""
    tables = [
        f'[[keys]]\nname = "{name}"\nsha256 = "{digest(token)}"\n{extra.get(name, "")}'
        for name, token in clients.items()
    ]
    path.write_text("\n".join(tables))


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}  # none: a loopback caller without tokens set


def reload_lines(proc: Process, level: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in proc.lines if line.startswith("{")]
    return [line for line in lines if line["msg"].startswith(("reload", "reloaded")) and line["level"] == level]


def started(proc: Process, workers: int) -> Process:
    """Wait until every worker has started (the first one answering is not enough: the others read the files)."""
    deadline = time.monotonic() + 60
    while sum('"Application startup complete."' in line for line in proc.lines) < workers:
        assert time.monotonic() < deadline, "the workers did not start:\n" + "\n".join(proc.lines)
        time.sleep(0.02)
    return proc


def hup_and_wait(proc: Process, workers: int, level: str = "INFO") -> list[dict[str, Any]]:
    """SIGHUP, then wait until each worker has logged its reload (the lines count up from those before)."""
    before = len(reload_lines(proc, level))
    proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while len(lines := reload_lines(proc, level)) < before + workers:
        assert time.monotonic() < deadline, "no reload line:\n" + "\n".join(proc.lines)
        assert proc.proc.poll() is None, "the service exited on SIGHUP:\n" + "\n".join(proc.lines)
        time.sleep(0.02)
    return lines[before:]


@contextlib.contextmanager
def held_streams(client: httpx.Client, tokens: list[str]) -> Iterator[list[httpx.Response]]:
    """/chat streams that Groq has started (the response head is here) and holds before their first word."""
    with contextlib.ExitStack() as stack:
        body = {"prompt": "hi", "model": HELD, "stream": True}
        yield [stack.enter_context(client.stream("POST", "/chat", json=body, headers=auth(t))) for t in tokens]


def finished_text(response: httpx.Response) -> str:
    events = sse_events(response.read().decode())
    assert events[-1] == ("message", "[DONE]"), events
    return "".join(json.loads(data)["content"] for _, data in events[:-1])


def statuses(client: httpx.Client, token: str, times: int = 4) -> set[int]:
    """Several calls, each on a new connection, so that with two workers both are very likely asked (a kept-alive
    connection stays with the worker that accepted it)."""
    headers = {**auth(token), "Connection": "close"}
    return {client.post("/chat", json={"prompt": "hi"}, headers=headers).status_code for _ in range(times)}


@pytest.fixture
def gate(fake: FakeGroq) -> Iterator[threading.Event]:
    released = threading.Event()
    fake.behaviours[HELD] = Behaviour(content_delay=30, content_gate=released)
    yield released
    released.set()


@pytest.mark.parametrize("workers", [1, 2])
def test_keys_added_removed_and_changed_while_streams_run(
    fake: FakeGroq, start_process: Any, tmp_path: Path, gate: threading.Event, workers: int
) -> None:
    keys = tmp_path / "keys.toml"
    write_keys(keys, {"alpha": ALPHA, "beta": BETA})
    proc = started(start_process(groq_env(fake, SERVICE_KEYS_FILE=str(keys), WORKERS=str(workers))), workers)
    with httpx.Client(base_url=proc.url, timeout=30) as client, held_streams(client, [ALPHA, BETA]) as streams:
        assert [s.status_code for s in streams] == [200, 200]
        write_keys(keys, {"beta": BETA_NEW, "gamma": GAMMA})  # alpha removed, beta's token changed, gamma added
        [*lines] = hup_and_wait(proc, workers)
        assert [line["msg"] for line in lines] == ["reloaded: 2 client(s): beta, gamma"] * workers
        assert all(line["clients"] == ["beta", "gamma"] for line in lines)
        assert statuses(client, ALPHA) == {401} and statuses(client, BETA) == {401}
        assert statuses(client, BETA_NEW) == {200} and statuses(client, GAMMA) == {200}
        gate.set()
        assert [finished_text(s) for s in streams] == [CONTENT, CONTENT]  # admitted before: they finish
    assert proc.stop() == 0
    access = [line for line in proc.json_lines() if line["msg"] == "request" and line["path"] == "/chat"]
    held = [line for line in access if line.get("stream")]
    assert sorted((line["key"], line["status"]) for line in held) == [("alpha", 200), ("beta", 200)]
    assert {line["key"] for line in access if line["status"] == 200 and not line.get("stream")} == {"beta", "gamma"}
    assert not any(token in line for line in proc.lines for token in (ALPHA, BETA, BETA_NEW, GAMMA))


BROKEN = [
    ("keys", '[[keys]]\nname = "alpha"\nsha256 = \n', "SERVICE_KEYS_FILE is not valid TOML (Invalid value (at line 3"),
    (
        "keys",
        f'[[keys]]\nname = "alpha"\nsha256 = "{digest(ALPHA)[:-1]}"\n',
        "SERVICE_KEYS_FILE keys[0] ('alpha').sha256",
    ),
    ("keys", f'[[keys]]\nname = "a b"\nsha256 = "{digest(ALPHA)}"\n', "SERVICE_KEYS_FILE keys[0].name must be"),
    ("keys", None, "SERVICE_KEYS_FILE cannot be read (No such file or directory)"),
    ("keys", "a = " + "[" * 5000 + "]" * 5000, "SERVICE_KEYS_FILE is nested too deeply to parse"),
    ("keys", b'[[keys]]\nname = "\xff"\n', "SERVICE_KEYS_FILE is not UTF-8 text (byte 17)"),
    ("groq", "", "GROQ_API_KEY_FILE: {groq} is empty"),
    ("groq", "gsk with a space", "GROQ_API_KEY_FILE ({groq}) must be printable ASCII"),
    ("groq", None, "GROQ_API_KEY_FILE: {groq} cannot be read (No such file or directory)"),
    ("groq", "fifo", "GROQ_API_KEY_FILE: {groq} cannot be read (not a regular file)"),
    ("keys", "fifo", "SERVICE_KEYS_FILE cannot be read (not a regular file)"),
    ("groq", "g" * 65537, "GROQ_API_KEY_FILE: {groq} is too large (over 64 KiB)"),
]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_broken_file_on_reload_changes_nothing(
    fake: FakeGroq, start_process: Any, tmp_path: Path, workers: int
) -> None:
    files = {"keys": tmp_path / "keys.toml", "groq": tmp_path / "groq_key"}
    write_keys(files["keys"], {"alpha": ALPHA})
    files["groq"].write_text(API_KEY + "\n")
    env = groq_env(fake, SERVICE_KEYS_FILE=str(files["keys"]), GROQ_API_KEY_FILE=str(files["groq"]))
    del env["GROQ_API_KEY"]
    proc = started(start_process({**env, "WORKERS": str(workers)}), workers)
    good = {name: path.read_text() for name, path in files.items()}
    with httpx.Client(base_url=proc.url, timeout=30) as client:
        for which, text, message in BROKEN:
            if text is None:
                files[which].unlink()
            elif text == "fifo":  # a named pipe with no writer: a plain open would block the worker's loop
                files[which].unlink()
                os.mkfifo(files[which])
            else:
                files[which].write_bytes(text if isinstance(text, bytes) else text.encode())
            errors = hup_and_wait(proc, workers, "ERROR")
            expected = "reload failed, the configuration in use stays: " + message.format(groq=files["groq"])
            assert all(line["msg"].startswith(expected) for line in errors), (expected, errors)
            assert statuses(client, ALPHA) == {200}  # the old key file and the old Groq key still serve
            files[which].unlink(missing_ok=True)
            files[which].write_text(good[which])
    assert proc.stop() == 0
    assert len(reload_lines(proc, "ERROR")) == len(BROKEN) * workers  # one line per failed reload in each worker
    assert not any(secret in line for line in proc.lines for secret in (ALPHA, digest(ALPHA), API_KEY))


@pytest.mark.parametrize("workers", [1, 2])
def test_the_groq_key_rotated_through_its_file(
    fake: FakeGroq, start_process: Any, tmp_path: Path, gate: threading.Event, workers: int
) -> None:
    key_file = tmp_path / "groq_key"
    key_file.write_text(API_KEY + "\n")
    env = groq_env(fake, GROQ_API_KEY_FILE=str(key_file), WORKERS=str(workers))
    del env["GROQ_API_KEY"]
    proc = started(start_process(env), workers)
    with httpx.Client(base_url=proc.url, timeout=30) as client, held_streams(client, [""]) as [stream]:
        assert stream.status_code == 200
        key_file.write_text(NEW_GROQ_KEY + "\n")
        fake.api_key = NEW_GROQ_KEY  # Groq itself now refuses the old key
        hup_and_wait(proc, workers)
        seen = len(fake.received)
        assert statuses(client, "") == {200}
        echoed = client.get("/healthz", headers={"x-request-id": NEW_GROQ_KEY})  # the log masks the new key too
        assert echoed.headers["x-request-id"] == NEW_GROQ_KEY
        assert {r.headers["authorization"] for r in fake.received[seen:]} == {f"Bearer {NEW_GROQ_KEY}"}
        gate.set()
        assert finished_text(stream) == CONTENT  # on its old connection, with the old key
    assert fake.stream_ends[0][0] == "completed"
    deadline = time.monotonic() + 10
    while f"Bearer {API_KEY}" in fake.open_keys.copy().values():  # the old key's connection closes once its call ended
        assert time.monotonic() < deadline, "the old Groq client kept its connection open"
        time.sleep(0.02)
    assert f"Bearer {NEW_GROQ_KEY}" in fake.open_keys.copy().values()  # while the new one is kept alive for reuse
    assert proc.stop() == 0
    assert not any(key in line for line in proc.lines for key in (API_KEY, NEW_GROQ_KEY))
    assert any(line.get("request_id") == "[redacted]" for line in proc.json_lines())


def test_tokens_rotated_through_service_api_keys_file(fake: FakeGroq, start_process: Any, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{ALPHA},{BETA}\n")
    proc = start_process(groq_env(fake, SERVICE_API_KEYS_FILE=str(tokens)))
    tokens.write_text(f"{BETA},{GAMMA}\n")  # add the new token, drop the old one, in one reload
    [line] = hup_and_wait(proc, 1)
    assert line["clients"] == [digest(BETA)[:8], digest(GAMMA)[:8]]  # the key_ids the access lines show
    with httpx.Client(base_url=proc.url, timeout=30) as client:
        assert statuses(client, ALPHA, 1) == {401}
        assert statuses(client, BETA, 1) == {200} and statuses(client, GAMMA, 1) == {200}
    assert proc.stop() == 0
    assert not any(token in line for line in proc.lines for token in (ALPHA, BETA, GAMMA))


def test_the_metrics_token_rotated_through_its_file(fake: FakeGroq, start_process: Any, tmp_path: Path) -> None:
    tokens, scraper = tmp_path / "tokens", tmp_path / "scraper"
    tokens.write_text(ALPHA + "\n")
    scraper.write_text(SCRAPER + "\n")
    env = groq_env(fake, METRICS="true", SERVICE_API_KEYS_FILE=str(tokens), METRICS_TOKEN_FILE=str(scraper))
    proc = start_process(env)
    refused = "reload failed, the configuration in use stays: METRICS_TOKEN must differ from every client token"
    with httpx.Client(base_url=proc.url, timeout=30) as client:

        def scrape(token: str) -> int:
            return client.get("/metrics", headers=auth(token)).status_code

        assert scrape(SCRAPER) == 200 and scrape(SCRAPER_NEW) == 401
        scraper.write_text(SCRAPER_NEW + "\n")
        hup_and_wait(proc, 1)
        assert scrape(SCRAPER_NEW) == 200 and scrape(SCRAPER) == 401 and scrape(ALPHA) == 401
        assert statuses(client, SCRAPER_NEW, 1) == {401} and statuses(client, ALPHA, 1) == {200}
        scraper.write_text(ALPHA + "\n")  # the scraper's token made a client's: refused, nothing changes
        [error] = hup_and_wait(proc, 1, "ERROR")
        assert error["msg"].startswith(refused), error
        assert scrape(SCRAPER_NEW) == 200 and scrape(ALPHA) == 401 and statuses(client, ALPHA, 1) == {200}
        scraper.write_text(SCRAPER_NEW + "\n")
        tokens.write_text(f"{ALPHA},{SCRAPER_NEW}\n")  # a client given the scraper's token: refused too
        [error] = hup_and_wait(proc, 1, "ERROR")
        assert error["msg"].startswith(refused), error
        assert scrape(SCRAPER_NEW) == 200 and statuses(client, SCRAPER_NEW, 1) == {401}
    assert proc.stop() == 0
    assert len(reload_lines(proc, "ERROR")) == 2 and len(reload_lines(proc, "INFO")) == 1
    assert not any(token in line for line in proc.lines for token in (ALPHA, SCRAPER, SCRAPER_NEW))


def test_a_reload_while_the_workers_start_waits_for_them(fake: FakeGroq, start_process: Any, tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    write_keys(keys, {"alpha": ALPHA})
    proc = start_process(groq_env(fake, SERVICE_KEYS_FILE=str(keys), WORKERS="2"), wait=False)
    deadline = time.monotonic() + 30
    while not any("Started parent process" in line for line in proc.lines):  # its SIGHUP handler is in place
        assert time.monotonic() < deadline, "\n".join(proc.lines)
        time.sleep(0.01)
    write_keys(keys, {"beta": BETA})
    proc.send_signal(signal.SIGHUP)  # while the workers are still starting: the parent waits for each, up to 5 s

    def skipped() -> list[str]:  # a worker slower than that (a loaded machine) is skipped, with a warning
        return [line for line in proc.lines if "is not serving, not reloaded; send SIGHUP again" in line]

    deadline = time.monotonic() + 60
    while len(reload_lines(proc, "INFO")) + len(skipped()) < 2:  # each worker: reloaded, or skipped and named
        assert time.monotonic() < deadline, "\n".join(proc.lines)
        assert proc.proc.poll() is None, "\n".join(proc.lines)
        time.sleep(0.02)
    started(proc, 2)
    if skipped():  # as the warning says: once it serves, SIGHUP again
        hup_and_wait(proc, 2)
    assert {tuple(line["clients"]) for line in reload_lines(proc, "INFO")} == {("beta",)}
    with httpx.Client(base_url=proc.url, timeout=30) as client:
        assert statuses(client, BETA) == {200} and statuses(client, ALPHA) == {401}
    assert proc.stop() == 0
    problems = [line for line in proc.json_lines() if line["level"] in ("WARNING", "ERROR")]
    assert all("not reloaded; send SIGHUP again" in line["msg"] for line in problems), problems


def test_a_sighup_during_the_start_up_imports_is_ignored(fake: FakeGroq, start_process: Any) -> None:
    """`-X importtime` writes a line to stderr as each import ends: SIGHUP once Starlette is imported, well before
    server.main() runs (without app.py's first lines, the signal's default action would end the process)."""
    command = [sys.executable, "-X", "importtime", "app.py"]
    proc = start_process(groq_env(fake), command, wait=False)
    deadline = time.monotonic() + 30
    while not any(line.split("|")[-1].strip() == "starlette.applications" for line in proc.lines.copy()):
        assert time.monotonic() < deadline, "\n".join(proc.lines)
        time.sleep(0.005)
    assert not any("Application startup" in line for line in proc.lines)  # still importing
    proc.send_signal(signal.SIGHUP)
    proc.wait_ready()  # asserts that it did not exit
    assert httpx.post(proc.url + "/chat", json={"prompt": "hi"}, timeout=30).status_code == 200
    assert proc.stop() == 0
    assert not reload_lines(proc, "INFO")  # ignored, not applied: the next SIGHUP reloads


@pytest.mark.parametrize("workers", [1, 2])
def test_quota_counts_follow_the_name_across_a_reload(
    fake: FakeGroq, start_process: Any, tmp_path: Path, request: pytest.FixtureRequest, workers: int
) -> None:
    keys = tmp_path / "keys.toml"
    write_keys(keys, {"alpha": ALPHA}, alpha="requests_per_minute = 2\n")
    env = groq_env(fake, SERVICE_KEYS_FILE=str(keys), WORKERS=str(workers))
    if workers > 1:  # the workers share their counts through Redis
        env["REDIS_URL"] = request.getfixturevalue("redis_server").url
    proc = started(start_process(env), workers)
    with httpx.Client(base_url=proc.url, timeout=30) as client:
        assert [client.post("/chat", json={"prompt": "hi"}, headers=auth(ALPHA)).status_code for _ in range(2)] == [
            200,
            200,
        ]
        write_keys(keys, {"alpha": BETA}, alpha="requests_per_minute = 2\n")  # a new token, the same name
        hup_and_wait(proc, workers)
        assert client.post("/chat", json={"prompt": "hi"}, headers=auth(BETA)).status_code == 429
        write_keys(keys, {"renamed": BETA}, renamed="requests_per_minute = 2\n")  # a new name: its own counts
        hup_and_wait(proc, workers)
        assert client.post("/chat", json={"prompt": "hi"}, headers=auth(BETA)).status_code == 200
        write_keys(keys, {"renamed": BETA}, renamed="requests_per_minute = 50\n")  # a raised limit applies at once
        hup_and_wait(proc, workers)
        assert statuses(client, BETA, 3) == {200}
    assert proc.stop() == 0


def test_what_a_reload_cannot_change_is_refused(fake: FakeGroq, start_process: Any, tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    write_keys(keys, {"alpha": ALPHA})
    proc = start_process(groq_env(fake, SERVICE_KEYS_FILE=str(keys)))
    write_keys(keys, {"alpha": ALPHA}, alpha="requests_per_minute = 2\n")
    [error] = hup_and_wait(proc, 1, "ERROR")
    assert "quotas were off at start; restart to turn them on" in error["msg"]
    with httpx.Client(base_url=proc.url, timeout=30) as client:
        assert statuses(client, ALPHA, 3) == {200}  # no quota came into force
    assert proc.stop() == 0


class Unforeseen(dict[str, str]):
    """Start-up variables whose reading fails in a way no check foresees, with a secret in the message."""

    def get(self, key: str, default: Any = None) -> Any:
        raise RuntimeError(f"failed near {ALPHA}")


def test_an_unforeseen_failure_on_reload_is_one_line_and_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(service_api_keys=(ALPHA,), environ=Unforeseen())
    service = create_app(settings, reload_on_hup=False).state.service
    with caplog.at_level(logging.INFO, logger="service"):
        Reloader(service).reload()
    [record] = caplog.records
    assert (record.levelname, record.getMessage(), record.exc_info) == (
        "ERROR",
        "reload failed, the configuration in use stays: unexpected RuntimeError",
        None,
    )
    assert service.settings is settings and ALPHA not in caplog.text


KEY = ServiceKey("alpha", bytes(32))


@pytest.mark.parametrize(
    ("old", "new", "quota_on", "refusal"),
    [
        (Settings(service_api_keys=(ALPHA,)), Settings(service_api_keys=(BETA,)), False, None),
        (Settings(), Settings(service_api_keys=(BETA,)), False, "service tokens cannot be turned on or off"),
        (Settings(service_keys=(KEY,)), Settings(), False, "service tokens cannot be turned on or off"),
        (Settings(), Settings(quota_requests_per_minute=5), False, "quotas were off at start"),
        (Settings(redis_url="redis://a:1/0"), Settings(redis_url="redis://b:1/0"), False, None),  # Redis unused
        (Settings(redis_url="redis://a:1/0"), Settings(redis_url="redis://b:1/0"), True, "REDIS_URL_FILE changed"),
    ],
)
def test_what_a_running_process_cannot_change(
    old: Settings, new: Settings, quota_on: bool, refusal: str | None
) -> None:
    if refusal is None:
        check_applicable(old, new, quota_on=quota_on)
    else:
        with pytest.raises(SettingsError, match=refusal):
            check_applicable(old, new, quota_on=quota_on)
