"""Fixtures: a fake Groq server, the service in-process on a real socket, and the service as a process."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fake_groq import API_KEY, FakeGroq
from redis_server import RedisServer

import logging_config
import server
from app import create_app
from config import load_settings

pytest_plugins = ["containers"]  # the Docker fixtures of the container tests
ROOT = Path(__file__).resolve().parent.parent
CLIENT_TOKEN = "svc_canary_client_token_9f8e7d6c"


TRANSPORTS = ("httpx", "aiohttp")  # UPSTREAM_TRANSPORT: the default install's, and the fast extra's


def groq_env(fake: FakeGroq, **overrides: str) -> dict[str, str]:
    """Settings for a service that talks to `fake`: no SDK retries unless a test asks for them, and the test's
    upstream transport (the `upstream_transport` fixture)."""
    transport = os.environ.get("UPSTREAM_TRANSPORT", "httpx")  # unset for a fixture wider than one test
    env = {"GROQ_API_KEY": API_KEY, "GROQ_BASE_URL": fake.url, "GROQ_MAX_RETRIES": "0"}
    return {**env, "UPSTREAM_TRANSPORT": transport, **overrides}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test marked `both_transports` that calls a fake Groq runs once per upstream transport."""
    if metafunc.definition.get_closest_marker("both_transports") and "fake" in metafunc.fixturenames:
        metafunc.parametrize("upstream_transport", TRANSPORTS, indirect=True)


@pytest.fixture(autouse=True)
def upstream_transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The transport the test's services call Groq with, in UPSTREAM_TRANSPORT for groq_env and the processes
    a test starts: httpx (the default install's) unless the test is marked `both_transports`."""
    transport = str(getattr(request, "param", "httpx"))
    monkeypatch.setenv("UPSTREAM_TRANSPORT", transport)
    return transport


class Service:
    """The app under uvicorn in a background thread: real sockets, and coverage sees the code."""

    def __init__(self, env: dict[str, str], **library_settings: Any) -> None:
        # library_settings: Settings fields no variable sets (the quota windows), as a library caller would pass them
        self.settings = dataclasses.replace(load_settings(env), **library_settings)
        self._logs = io.StringIO()
        logging_config.configure(
            level=self.settings.log_level, fmt="json", secrets=self.settings.secrets(), stream=self._logs
        )
        self.app = create_app(self.settings)
        self.server = uvicorn.Server(server.uvicorn_config(self.settings, self.app, log_config=None))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "service did not start"
            time.sleep(0.01)
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def log_text(self) -> str:
        return self._logs.getvalue()

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_text().splitlines()]

    def access_lines(self, at_least: int = 0) -> list[dict[str, Any]]:
        """The access lines, waiting (boundedly) for `at_least` of them: a line is written just after its response."""
        deadline = time.monotonic() + 5
        while True:
            lines = [line for line in self.log_lines() if line["msg"] == "request" and line["logger"] == "service"]
            if len(lines) >= at_least or time.monotonic() > deadline:
                return lines
            time.sleep(0.01)

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self._thread.join(10)


@pytest.fixture
def fake() -> Iterator[FakeGroq]:
    fake = FakeGroq().start()
    yield fake
    fake.stop()


@pytest.fixture
def start_service() -> Iterator[Any]:
    started: list[Service] = []

    def start(env: dict[str, str], **library_settings: Any) -> Service:
        started.append(Service(env, **library_settings))
        return started[-1]

    yield start
    for service in started:
        service.stop()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server of the test's own, stopped after it."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def service(fake: FakeGroq, start_service: Any) -> Service:
    return start_service(groq_env(fake))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Process:
    """The service started as a separate process; stderr is collected line by line."""

    def __init__(self, command: list[str] | str, env: dict[str, str], *, cwd: Path = ROOT, wait: bool = True) -> None:
        self.port = int(env["PORT"]) if env.get("PORT", "").isdigit() else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.shell = isinstance(command, str)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("GROQ_", "SERVICE_", "LOG_"))}
        full_env.update({"PORT": str(self.port), **env})
        self.proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=full_env,
            shell=isinstance(command, str),
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait:
            self.wait_ready()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "service exited early:\n" + "\n".join(self.lines)
            try:
                httpx.get(self.url + "/", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        raise AssertionError("service did not answer in time:\n" + "\n".join(self.lines))

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        """Signal the service itself; under a shell, that is the shell's child, as a terminal's Ctrl-C would."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        pids = children.read_text().split() if self.shell and children.exists() else []
        os.kill(int(pids[0]) if pids else self.proc.pid, sig)

    def wait(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.send_signal(sig)
        return self.wait(timeout)

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]


@pytest.fixture
def start_process() -> Iterator[Any]:
    started: list[Process] = []

    def start(env: dict[str, str], command: list[str] | str | None = None, **kwargs: Any) -> Process:
        started.append(Process(command or [sys.executable, "app.py"], env, **kwargs))
        return started[-1]

    yield start
    for proc in started:
        if proc.proc.poll() is None:
            os.killpg(proc.proc.pid, signal.SIGKILL)
            proc.proc.wait(10)
