"""The two-replica deployment for real: Debian's nginx running deploy/nginx/nginx.conf (only its ports and paths
changed) in front of two replicas started as the README says (`python app.py` with env), each replica with its
own fake Groq so every upstream call can be counted per replica; Redis for the shared quota. All on 127.0.0.1.

The rolling restart follows README.md's procedure step by step (`Deployment.restart`).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import CLIENT_TOKEN, ROOT, Process, free_port, groq_env
from fake_groq import Behaviour, FakeGroq
from redis_server import RedisServer

NGINX = "/usr/sbin/nginx"
REPLICAS = ("replica-a", "replica-b")
CONTENT = "Hello from the fake Groq server."  # what the fakes answer, plain and streamed
pytestmark = pytest.mark.slow


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


class Nginx:
    """nginx in the foreground with deploy/nginx/nginx.conf, its listen port, upstream servers and paths adapted
    (and its read timeout, when a test gives one)."""

    def __init__(self, prefix: Path, upstreams: dict[str, int], read_timeout: str | None = None) -> None:
        self.prefix = prefix
        self.prefix.mkdir()
        self.upstreams = upstreams
        self.read_timeout = read_timeout
        self.down: set[str] = set()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.conf = prefix / "nginx.conf"
        self._write()
        self.output = (prefix / "output.log").open("w")
        command = [NGINX, "-p", str(prefix), "-c", str(self.conf), "-g", "daemon off;"]
        self.proc = subprocess.Popen(command, stdout=self.output, stderr=subprocess.STDOUT)
        _wait(self._listening, 10, "nginx to listen")
        _wait(self.workers, 10, "nginx's workers")

    def _write(self) -> None:
        text = (ROOT / "deploy" / "nginx" / "nginx.conf").read_text()
        text = _replace_once(text, "listen 8080;", f"listen 127.0.0.1:{self.port};")
        if self.read_timeout:
            text = _replace_once(text, "proxy_read_timeout 75s;", f"proxy_read_timeout {self.read_timeout};")
        for name, port in self.upstreams.items():
            down = " down" if name in self.down else ""
            text = _replace_once(text, f"server {name}:8000;", f"server 127.0.0.1:{port}{down};")
        assert text.count(" /tmp/") == 6, "the pid file and five temp paths"
        self.conf.write_text(text.replace(" /tmp/", f" {self.prefix}/"))

    def _listening(self) -> bool:
        assert self.proc.poll() is None, (self.prefix / "output.log").read_text()
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def workers(self) -> set[int]:
        return _children(self.proc.pid)

    def set_down(self, name: str, down: bool) -> None:
        """Mark one upstream server `down` (or not) and reload; returns once the old workers have exited,
        that is when no request is left on a server that is now down."""
        self.down = self.down | {name} if down else self.down - {name}
        self._write()
        old = self.workers()
        command = [NGINX, "-p", str(self.prefix), "-c", str(self.conf), "-s", "reload"]
        subprocess.run(command, check=True, capture_output=True, timeout=10)
        _wait(lambda: not (old & self.workers()) and self.workers(), 20, "nginx's old workers to exit")

    def log(self) -> str:
        self.output.flush()
        return (self.prefix / "output.log").read_text()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.output.close()


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"deploy/nginx/nginx.conf should hold {old!r} once"
    return text.replace(old, new)


class Deployment:
    """Two replicas behind nginx; `retired` keeps the replicas a restart replaced, with their logs."""

    def __init__(self, tmp_path: Path, start_process: Any, read_timeout: str | None = None, **env: str) -> None:
        self._start_process = start_process
        self._env = env
        self.fakes = {name: FakeGroq().start() for name in REPLICAS}
        self.ports = {name: free_port() for name in REPLICAS}
        self.replicas = {name: self._start(name) for name in REPLICAS}
        self.retired: list[Process] = []
        self.nginx = Nginx(tmp_path / "nginx", self.ports, read_timeout)

    def _start(self, name: str) -> Process:
        env = groq_env(self.fakes[name], PORT=str(self.ports[name]), **self._env)
        env |= {"SERVICE_API_KEYS": CLIENT_TOKEN, "FORWARDED_ALLOW_IPS": "127.0.0.1", "SHUTDOWN_TIMEOUT": "10"}
        replica: Process = self._start_process(env)
        _wait(lambda: httpx.get(replica.url + "/readyz", timeout=2).status_code == 200, 10, f"{name} ready")
        return replica

    def restart(self, name: str) -> None:
        """README's rolling restart of one replica."""
        self.nginx.set_down(name, True)
        old = self.replicas[name]
        assert old.stop(signal.SIGTERM) == 0, "\n".join(old.lines)
        self.retired.append(old)
        self.replicas[name] = self._start(name)
        self.nginx.set_down(name, False)

    def chat_lines(self) -> list[dict[str, Any]]:
        processes = [*self.retired, *self.replicas.values()]
        return [line for p in processes for line in p.json_lines() if line.get("path") == "/chat"]

    def upstream_calls(self) -> int:
        return sum(len(fake.chat_requests()) for fake in self.fakes.values())

    def stop(self) -> None:
        self.nginx.stop()
        for fake in self.fakes.values():
            fake.stop()


@pytest.fixture
def deploy(tmp_path: Path, start_process: Any) -> Iterator[Any]:
    started: list[Deployment] = []

    def start(read_timeout: str | None = None, **env: str) -> Deployment:
        started.append(Deployment(tmp_path, start_process, read_timeout, **env))
        return started[-1]

    yield start
    for deployment in started:
        deployment.stop()


def _client(url: str) -> httpx.Client:
    """A client opening one connection per request (why: README, rolling restart)."""
    headers = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
    return httpx.Client(base_url=url, headers=headers, timeout=20, limits=httpx.Limits(max_keepalive_connections=0))


def _chat(client: httpx.Client, *, stream: bool, model: str = "openai/gpt-oss-20b") -> str | None:
    """One /chat through nginx: None when the whole answer arrived, else what went wrong."""
    body = {"prompt": "Say hello", "model": model, "stream": stream}
    try:
        with client.stream("POST", "/chat", json=body) as response:
            text = response.read().decode()
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    if response.status_code != 200:
        return f"{response.status_code} {text}"
    return _check_plain(text) if not stream else _check_stream(text)


def _check_plain(text: str) -> str | None:
    try:
        return None if json.loads(text)["content"] == CONTENT else f"wrong answer: {text}"
    except (ValueError, KeyError, TypeError):
        return f"not a completion: {text!r}"


def _check_stream(text: str) -> str | None:
    """The whole stream: every piece, the metadata event, then [DONE]; no error event."""
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    try:
        pieces = "".join(json.loads(e)["content"] for e in events[:-1])
    except (ValueError, KeyError, TypeError):
        pieces = None
    return None if pieces == CONTENT and events[-1:] == ["[DONE]"] else f"stream cut or wrong: {text!r}"


class Load:
    """Clients sending /chat through nginx, alternating plain and streamed, until stopped or out of budget (a count
    and a time, both far above what a test needs: the test stops it, and checks it did with `ran_out`)."""

    def __init__(self, url: str, *, clients: int = 4, budget: int = 100_000, seconds: float = 300) -> None:
        self.url = url
        self.sent = 0
        self.done = 0
        self.failures: list[str] = []
        self.ran_out = False  # set by stop(): the budget was spent before it
        self._budget = budget
        self._deadline = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _within_budget(self) -> bool:
        return self.sent < self._budget and time.monotonic() < self._deadline

    def _take(self) -> int | None:
        with self._lock:
            if self._stop.is_set() or not self._within_budget():
                return None
            self.sent += 1
            return self.sent

    def _run(self) -> None:
        with _client(self.url) as client:
            while (n := self._take()) is not None:
                failure = _chat(client, stream=n % 2 == 0)
                with self._lock:
                    self.done += 1
                    if failure:
                        self.failures.append(failure)

    def wait_for(self, done: int) -> None:
        def reached() -> bool:
            assert self._within_budget(), f"the load ran out of its budget before {done} requests were done"
            return self.done >= done

        _wait(reached, 30, f"{done} requests done")

    def stop(self) -> None:
        with self._lock:
            self.ran_out = not self._within_budget()
            self._stop.set()
        for thread in self._threads:
            thread.join(30)


def test_requests_spread_over_both_replicas_and_carry_the_client_address(deploy: Any) -> None:
    deployment = deploy()
    with _client(deployment.nginx.url) as client:
        for i in range(8):
            spoofed = {"X-Forwarded-For": "203.0.113.7", "X-Request-ID": f"spread-{i}"}
            response = client.post("/chat", json={"prompt": "Say hello"}, headers=spoofed)
            assert response.status_code == 200, response.text
            assert response.json()["content"] == CONTENT
            assert response.headers["x-request-id"] == f"spread-{i}"
    _wait(lambda: len(deployment.chat_lines()) == 8, 10, "8 access lines")
    for name, replica in deployment.replicas.items():
        lines = [line for line in replica.json_lines() if line.get("path") == "/chat"]
        assert lines, f"{name} got no request"
        assert len(lines) == len(deployment.fakes[name].chat_requests())
        # nginx's X-Forwarded-For, trusted from 127.0.0.1, replaced the client's own: uvicorn then reports
        # port 0, where a direct peer would show nginx's ephemeral port.
        assert {line["client"] for line in lines} == {"127.0.0.1:0"}
        assert {line["status"] for line in lines} == {200}
    assert sorted(line["request_id"] for line in deployment.chat_lines()) == [f"spread-{i}" for i in range(8)]


def test_events_pass_nginx_as_they_come_and_a_client_leaving_stops_groq(deploy: Any) -> None:
    deployment = deploy()
    for fake in deployment.fakes.values():
        fake.behaviours["stalls"] = Behaviour(stall_after=1)  # one piece, then silence until the client goes
    body = {"prompt": "Say hello", "model": "stalls", "stream": True}
    with _client(deployment.nginx.url) as client, client.stream("POST", "/chat", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        first = next(line for line in response.iter_lines() if line)
    assert json.loads(first.removeprefix("data: ")) == {"content": "Hello "}

    def ends() -> list[str]:
        return [how for fake in deployment.fakes.values() for how, _ in fake.stream_ends]

    _wait(lambda: ends() == ["client_closed"], 10, "Groq's stream to be closed")


def test_rolling_restart_under_load_loses_no_request(deploy: Any) -> None:
    deployment = deploy()
    for fake in deployment.fakes.values():  # short upstream calls and streams, so some are always in flight
        fake.default = Behaviour(delay=0.02, chunk_delay=0.02)
    load = Load(deployment.nginx.url)
    try:
        load.wait_for(20)
        for name in REPLICAS:
            sent = load.sent
            deployment.restart(name)
            assert load.sent > sent, f"no request was sent while {name} restarted"
            load.wait_for(load.done + 20)
    finally:
        load.stop()

    assert not load.ran_out, "the load ended before the restarts did"
    assert load.failures == []
    assert load.done == load.sent >= 60
    assert deployment.upstream_calls() == load.sent, "a request reached Groq twice, or never"
    _wait(lambda: len(deployment.chat_lines()) == load.sent, 10, "every request in the replicas' logs")
    assert {line["status"] for line in deployment.chat_lines()} == {200}
    for retired in deployment.retired:  # each replica served requests before its restart, drained, exited 0
        assert any(line.get("path") == "/chat" for line in retired.json_lines())
        assert retired.proc.returncode == 0


def test_a_killed_replica_fails_only_the_requests_in_flight_on_it(deploy: Any) -> None:
    deployment = deploy()
    hold = threading.Event()
    for fake in deployment.fakes.values():
        fake.behaviours["held"] = Behaviour(hold=hold)
    held: list[str | None] = []

    def send_held(stream: bool) -> None:
        with _client(deployment.nginx.url) as client:
            held.append(_chat(client, stream=stream, model="held"))

    threads = [threading.Thread(target=send_held, args=(i % 2 == 0,)) for i in range(6)]
    for thread in threads:
        thread.start()
    _wait(lambda: deployment.upstream_calls() == 6, 10, "6 requests in flight")
    in_flight = {name: len(fake.chat_requests()) for name, fake in deployment.fakes.items()}
    assert in_flight["replica-a"] >= 1
    assert in_flight["replica-a"] + in_flight["replica-b"] == 6

    assert deployment.replicas["replica-a"].stop(signal.SIGKILL) == -signal.SIGKILL
    with _client(deployment.nginx.url) as client:
        assert [_chat(client, stream=i % 2 == 0) for i in range(6)] == [None] * 6
    hold.set()
    for thread in threads:
        thread.join(20)

    failed = [outcome for outcome in held if outcome is not None]
    assert len(held) == 6
    assert len(failed) == in_flight["replica-a"]
    for outcome in failed:
        status, _, body = outcome.partition(" ")
        assert status == "502", outcome
        error = json.loads(body)["error"]
        assert error["type"] == "upstream_unreachable"
        assert error["message"].startswith("No replica of the service answered"), "nginx's page, not a replica's"
    assert len(deployment.fakes["replica-a"].chat_requests()) == in_flight["replica-a"]
    assert len(deployment.fakes["replica-b"].chat_requests()) == in_flight["replica-b"] + 6, "no POST was resent"


def test_a_quota_in_redis_holds_across_both_replicas(deploy: Any, redis_server: RedisServer) -> None:
    limit = 5
    deployment = deploy(QUOTA_REQUESTS_PER_MINUTE=str(limit), REDIS_URL=redis_server.url)
    with _client(deployment.nginx.url) as client:
        responses = [client.post("/chat", json={"prompt": "Say hello"}) for _ in range(limit + 4)]
    assert [r.status_code for r in responses] == [200] * limit + [429] * 4
    assert {r.json()["error"]["type"] for r in responses[limit:]} == {"quota_exceeded"}
    assert deployment.upstream_calls() == limit
    _wait(lambda: len(deployment.chat_lines()) == limit + 4, 10, "every request in the replicas' logs")
    for name, replica in deployment.replicas.items():  # the limit is shared: each replica let some through
        statuses = [line["status"] for line in replica.json_lines() if line.get("path") == "/chat"]
        assert 200 in statuses, f"{name} passed none"


def test_nginx_times_out_a_silent_replica_with_its_own_504_and_never_resends(deploy: Any) -> None:
    deployment = deploy(read_timeout="1s")
    hold = threading.Event()
    for fake in deployment.fakes.values():
        fake.behaviours["held"] = Behaviour(hold=hold)
    try:
        with _client(deployment.nginx.url) as client:
            outcome = _chat(client, stream=False, model="held")
    finally:
        hold.set()
    assert outcome is not None
    status, _, body = outcome.partition(" ")
    assert status == "504", outcome
    error = json.loads(body)["error"]
    assert error["type"] == "upstream_timeout"
    assert error["message"].startswith("No replica of the service answered this request in time"), "nginx's page"
    assert deployment.upstream_calls() == 1, "a POST a replica took is never sent to the other"
