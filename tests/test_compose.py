"""deploy/compose.yaml run for real with Docker Compose v2 (README.md, "Two replicas behind nginx").

The project's own compose file, with a test-only override file on top: every service on the host's network
(`network_mode: host`), each on a free 127.0.0.1 port, so no test talks to a Docker bridge address; the
replicas run the session's image (tests/containers.py), Redis and nginx the stand-ins built from Debian's
packages; nginx runs deploy/nginx/nginx.conf with only its ports and upstream addresses changed. One fake Groq on
the host answers both replicas.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import CLIENT_TOKEN, ROOT, free_port
from containers import LABEL, Docker, wait_until
from fake_groq import API_KEY, Behaviour, FakeGroq
from test_deploy import CONTENT, Load

REPLICAS = ("replica-a", "replica-b")
pytestmark = pytest.mark.slow


class Stack:
    """One compose project: deploy/compose.yaml plus the override, its folder (env file, nginx/) in tmp_path."""

    def __init__(self, docker: Docker, tmp_path: Path, image: str, fake: FakeGroq, **env: str) -> None:
        self.docker = docker
        self.project = f"groq-proxy-test-{uuid.uuid4().hex[:8]}"
        self.folder = tmp_path / "deploy"
        (self.folder / "nginx").mkdir(parents=True)
        self.ports = {name: free_port() for name in (*REPLICAS, "redis", "nginx")}
        self.url = f"http://127.0.0.1:{self.ports['nginx']}"
        self.down: set[str] = set()
        self.secrets = _write_secrets(self.folder, tokens=CLIENT_TOKEN)  # Docker secrets, as README's recipe has them
        (self.folder / "groq-proxy.env").write_text("")  # no other setting
        self.write_nginx_conf()
        services = {name: self._replica(image, fake, name, env) for name in REPLICAS}
        redis_command = ["redis-server", "--port", str(self.ports["redis"]), "--bind", "127.0.0.1"]
        redis_command += ["--save", "", "--appendonly", "no"]
        services["redis"] = {"image": docker.images["REDIS_IMAGE"], "command": redis_command}
        services["nginx"] = {"image": docker.images["NGINX_IMAGE"], "ports": "!reset []"}
        (self.folder / "compose.test.yaml").write_text(_override(services, docker.session))

    def _replica(self, image: str, fake: FakeGroq, name: str, env: dict[str, str]) -> dict[str, Any]:
        environment = {
            "HOST": "127.0.0.1",
            "PORT": str(self.ports[name]),
            "REDIS_URL": f"redis://127.0.0.1:{self.ports['redis']}/0",
            "FORWARDED_ALLOW_IPS": "127.0.0.1",
            "GROQ_BASE_URL": fake.url,
            "GROQ_MAX_RETRIES": "0",
            **env,
        }
        return {"image": image, "pull_policy": "never", "build": "!reset null", "environment": environment}

    def write_nginx_conf(self) -> None:
        """deploy/nginx/nginx.conf, ports and upstreams changed, written as editors and `sed -i` do: a new file."""
        text = (ROOT / "deploy" / "nginx" / "nginx.conf").read_text()
        text = _replace_once(text, "listen 8080;", f"listen 127.0.0.1:{self.ports['nginx']};")
        for name in REPLICAS:
            down = " down" if name in self.down else ""
            text = _replace_once(text, f"server {name}:8000;", f"server 127.0.0.1:{self.ports[name]}{down};")
        new = self.folder / "nginx" / "nginx.conf.new"
        new.write_text(text)
        os.replace(new, self.folder / "nginx" / "nginx.conf")

    def compose(self, *args: str, timeout: float = 120) -> str:
        files = ["-f", str(ROOT / "deploy" / "compose.yaml"), "-f", str(self.folder / "compose.test.yaml")]
        command = ["compose", "-p", self.project, "--project-directory", str(self.folder), *files, *args]
        return self.docker.run(*command, timeout=timeout).stdout

    def up(self) -> None:
        self.compose("up", "-d", "--wait", "--wait-timeout", "90", timeout=120)

    def remove(self) -> None:
        self.compose("down", "-t", "5", "--remove-orphans")

    def logs(self, service: str) -> list[str]:
        return self.compose("logs", "--no-log-prefix", "--no-color", service).splitlines()

    def chat_lines(self, service: str) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.logs(service) if line.startswith("{")]
        return [line for line in lines if line.get("path") == "/chat"]

    def nginx_workers(self) -> list[tuple[int, str]]:
        """(pid, command) of nginx's worker processes, as `docker compose top nginx` lists them."""
        header, *lines = self.compose("top", "nginx").splitlines()
        columns = header.split()
        rows = [line.split(None, len(columns) - 1) for line in lines if line.strip()]
        pid = columns.index("PID")
        return [(int(row[pid]), row[-1]) for row in rows if "worker process" in row[-1]]

    def set_down(self, name: str, down: bool) -> None:
        """README's steps 1-2 (or 5): mark the replica down (or not), reload nginx, wait for the old workers."""
        self.down = self.down | {name} if down else self.down - {name}
        self.write_nginx_conf()
        seen = self.compose("exec", "-T", "nginx", "cat", "/etc/nginx/nginx.conf")
        assert seen == (self.folder / "nginx" / "nginx.conf").read_text(), "nginx's container sees the old file"
        old = {pid for pid, _ in self.nginx_workers()}
        self.compose("exec", "-T", "nginx", "nginx", "-s", "reload")

        def reloaded() -> bool:
            workers = self.nginx_workers()
            shutting_down = [pid for pid, command in workers if "shutting down" in command]
            return bool(workers) and not shutting_down and not old & {pid for pid, _ in workers}

        wait_until(reloaded, 20, "nginx's old workers to exit")

    def restart(self, name: str) -> None:
        """README's rolling restart of one replica."""
        self.set_down(name, True)
        self.compose("stop", name)
        container = f"{self.project}-{name}-1"
        assert self.docker.run("inspect", "-f", "{{.State.ExitCode}}", container).stdout.strip() == "0"
        self.compose("start", name)
        url = f"http://127.0.0.1:{self.ports[name]}/readyz"
        wait_until(lambda: _status(url) == 200, 15, f"{name} ready again")
        self.set_down(name, False)


def _write_secrets(folder: Path, *, tokens: str) -> Path:
    """deploy/secrets/, as README's recipe writes it: the Groq key and the client tokens, one file each."""
    secrets = folder / "secrets"
    secrets.mkdir(exist_ok=True)
    (secrets / "groq_api_key").write_text(API_KEY + "\n")
    (secrets / "service_api_keys").write_text(tokens + "\n")
    return secrets


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=1).status_code
    except httpx.TransportError:
        return 0


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"deploy/nginx/nginx.conf should hold {old!r} once"
    return text.replace(old, new)


def _override(services: dict[str, dict[str, Any]], session: str, network_mode: str = "host") -> str:
    """The override as YAML: the network mode (host: on 127.0.0.1) and the session's label for every service, then
    each one's own keys."""
    lines = ["services:"]
    for name, keys in services.items():
        lines += [f"  {name}:", f"    network_mode: {network_mode}", "    networks: !reset null"]
        lines.append(f"    labels: {json.dumps({LABEL: session})}")
        for key, value in keys.items():
            text = value if isinstance(value, str) and value.startswith("!reset") else json.dumps(value)
            lines.append(f"    {key}: {text}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def stack(docker: Docker, extras_image: str, fake: FakeGroq, tmp_path: Path) -> Iterator[Any]:
    started: list[Stack] = []

    def start(**env: str) -> Stack:
        started.append(Stack(docker, tmp_path, extras_image, fake, **env))
        started[-1].up()
        return started[-1]

    yield start
    for one in started:
        one.remove()


def _chat(url: str, token: str = CLIENT_TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.post(url + "/chat", json={"prompt": "Say hello"}, headers=headers, timeout=30)


def test_the_stack_spreads_requests_and_holds_one_quota_through_redis(stack: Any, fake: FakeGroq) -> None:
    limit = 5
    deployment = stack(QUOTA_REQUESTS_PER_MINUTE=str(limit))
    answers = [_chat(deployment.url) for _ in range(limit + 4)]  # each on its own connection to nginx
    assert [a.status_code for a in answers] == [200] * limit + [429] * 4, answers[-1].text
    assert {a.json()["error"]["type"] for a in answers[limit:]} == {"quota_exceeded"}
    assert {a.json()["content"] for a in answers[:limit]} == {CONTENT}
    assert len(fake.chat_requests()) == limit
    wait_until(lambda: sum(len(deployment.chat_lines(n)) for n in REPLICAS) == limit + 4, 10, "the access lines")
    for name in REPLICAS:  # nginx used both, and the limit counted the requests of both: it lives in Redis
        statuses = [line["status"] for line in deployment.chat_lines(name)]
        assert 200 in statuses, f"{name} passed none: {statuses}"
        assert {line["client"] for line in deployment.chat_lines(name)} == {"127.0.0.1:0"}  # from X-Forwarded-For


def test_the_readme_rolling_restart_under_load_loses_no_request(stack: Any, fake: FakeGroq) -> None:
    fake.default = Behaviour(delay=0.02, chunk_delay=0.02)  # short upstream calls and streams, some in flight
    deployment = stack()
    load = Load(deployment.url)
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
    assert len(fake.chat_requests()) == load.sent, "a request reached Groq twice, or never"
    for name in REPLICAS:  # each replica served requests before its restart and after it
        logs = deployment.logs(name)
        restarted = next(i for i, line in enumerate(logs) if '"msg": "Shutting down"' in line)
        assert any('"path": "/chat"' in line for line in logs[:restarted]), name
        assert any('"path": "/chat"' in line for line in logs[restarted:]), name


def test_a_secret_rewritten_in_place_is_reloaded_by_compose_kill_hup(stack: Any, fake: FakeGroq) -> None:
    """README's recipe: the client tokens are a Docker secret; rewritten in place, `kill -s HUP` reloads them."""
    deployment = stack()
    assert _chat(deployment.url).status_code == 200
    new_token = "svc_compose_rotated_token_0123456789"
    (deployment.secrets / "service_api_keys").write_text(new_token + "\n")  # in place: the same file, mounted
    deployment.compose("kill", "-s", "HUP", *REPLICAS)

    def reloaded(name: str) -> bool:
        return any('"msg": "reloaded: 1 client(s)' in line for line in deployment.logs(name))

    wait_until(lambda: all(reloaded(name) for name in REPLICAS), 20, "both replicas' reload lines")
    for _ in range(4):  # nginx spreads them over both replicas
        assert _chat(deployment.url, new_token).status_code == 200
        assert _chat(deployment.url).status_code == 401
    assert all(_status(f"http://127.0.0.1:{deployment.ports[name]}/readyz") == 200 for name in REPLICAS)


def test_compose_builds_the_image_once_and_both_replicas_run_it(docker: Docker, tmp_path: Path) -> None:
    """`up --build` on the project's file: replica-a builds the tag (offline, as README's air-gapped build),
    replica-b runs that tag, built nowhere else. Created, not started, with no network (nothing to talk to)."""
    (tmp_path / "groq-proxy.env").write_text("")
    _write_secrets(tmp_path, tokens=CLIENT_TOKEN)
    offline = {"PYTHON_IMAGE": docker.images["PYTHON_IMAGE"], "OFFLINE": "true"}
    build = {"context": str(ROOT), "network": "none", "args": offline}
    tag = docker.tag("compose")
    services: dict[str, dict[str, Any]] = {name: {"image": tag} for name in REPLICAS}
    services["replica-a"]["build"] = build
    (tmp_path / "build.yaml").write_text(_override(services, docker.session, network_mode="none"))
    files = ["-f", str(ROOT / "deploy" / "compose.yaml"), "-f", str(tmp_path / "build.yaml")]
    project = f"groq-proxy-test-{uuid.uuid4().hex[:8]}"
    compose = ["compose", "-p", project, "--project-directory", str(tmp_path), *files]
    before = docker.image_id(tag)
    try:
        result = docker.run(*compose, "up", "--build", "--no-start", "--no-deps", *REPLICAS, timeout=300)
        output = result.stdout + result.stderr
        assert re.findall(r"^ ?(\S+)\s+Built$", output, re.M) == ["replica-a"], output
        images = {docker.run("inspect", "-f", "{{.Image}}", f"{project}-{name}-1").stdout.strip() for name in REPLICAS}
        assert images == {docker.image_id(tag)}
    finally:
        docker.run(*compose, "down", check=False)
        docker.drop_replaced(tag, before)
