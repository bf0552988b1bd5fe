"""The image built and run for real (README.md, "Container"): Docker on this machine, the image built offline
from the wheelhouse on a Debian 12 base made with debootstrap (tests/containers.py), each container on the host's
network listening on 127.0.0.1 only, talking to the fake Groq on the host. The systemd recipe's Debian 12 install
runs in the same base."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from typing import Any

import httpx
import pytest
from conftest import CLIENT_TOKEN, ROOT, free_port, groq_env
from containers import Docker, wait_until
from fake_groq import Behaviour, FakeGroq
from redis_server import RedisServer

HEADERS = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
CONTENT = "Hello from the fake Groq server."
pytestmark = pytest.mark.slow


def _env(fake: FakeGroq, **overrides: str) -> dict[str, str]:
    return {**groq_env(fake), "SERVICE_API_KEYS": CLIENT_TOKEN, **overrides}


def _stream(url: str, model: str = "openai/gpt-oss-20b") -> str:
    body = {"prompt": "Say hello", "model": model, "stream": True}
    with httpx.stream("POST", url + "/chat", json=body, headers=HEADERS, timeout=30) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"] == "text/event-stream"
        return response.read().decode()


def _pieces(stream: str) -> tuple[str, str]:
    """(the content of every data event but the last two, the last event)."""
    events = [e.removeprefix("data: ") for e in stream.split("\n\n") if e]
    return "".join(json.loads(e)["content"] for e in events[:-2]), events[-1]


def test_the_image_runs_as_documented_non_root_no_capabilities_read_only(
    fake: FakeGroq, service_image: str, start_container: Any
) -> None:
    container = start_container(service_image, _env(fake), free_port())
    wait_until(container.answers, 10, "/healthz within 10 s of the start")
    assert container.inspect("{{.Config.User}}") == "10001:10001"
    assert container.inspect("{{.HostConfig.ReadonlyRootfs}}") == "true"
    status = container.docker.run("exec", container.name, "cat", "/proc/1/status").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines())
    assert fields["Uid"].split() == ["10001"] * 4
    for capabilities in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert fields[capabilities] == "0" * 16, capabilities
    assert fields["NoNewPrivs"] == "1"
    write = container.docker.run("exec", container.name, "touch", "/app/written", check=False)
    assert write.returncode == 1 and "Read-only file system" in write.stderr
    tmpfs = "/tmp/written"  # noqa: S108 - the container's own tmpfs
    assert container.docker.run("exec", container.name, "touch", tmpfs).returncode == 0

    def healthy() -> bool:
        return container.inspect("{{.State.Health.Status}}") == "healthy"

    wait_until(healthy, 15 - (time.monotonic() - container.started), "Docker's health check within 15 s")


def test_chat_plain_and_streamed_through_the_container(
    fake: FakeGroq, service_image: str, start_container: Any
) -> None:
    container = start_container(service_image, _env(fake), free_port())
    wait_until(container.answers, 10, "/healthz")
    plain = httpx.post(container.url + "/chat", json={"prompt": "Say hello"}, headers=HEADERS, timeout=30)
    assert plain.status_code == 200, plain.text
    assert plain.json()["content"] == CONTENT
    assert _pieces(_stream(container.url)) == (CONTENT, "[DONE]")
    assert [r.body["messages"][-1]["content"] for r in fake.chat_requests()] == ["Say hello"] * 2
    assert all(CLIENT_TOKEN not in json.dumps(r.headers) for r in fake.chat_requests())
    unauthorized = httpx.post(container.url + "/chat", json={"prompt": "Say hello"}, timeout=30)
    assert unauthorized.status_code == 401


def test_docker_stop_lets_the_stream_in_flight_finish_then_exits_zero(
    fake: FakeGroq, service_image: str, start_container: Any
) -> None:
    hold = threading.Event()
    fake.behaviours["held"] = Behaviour(hold=hold)
    container = start_container(service_image, _env(fake), free_port())
    wait_until(container.answers, 10, "/healthz")
    streamed: list[str] = []
    client = threading.Thread(target=lambda: streamed.append(_stream(container.url, "held")))
    client.start()
    wait_until(lambda: fake.chat_requests(), 10, "the stream to reach Groq")

    stop = subprocess.Popen(["docker", "stop", container.name], env=container.docker.env, stdout=subprocess.DEVNULL)
    wait_until(lambda: '"msg": "Shutting down"' in container.logs(), 10, "SIGTERM to reach the service")
    assert stop.poll() is None, "the container stopped with the stream still held"
    # docker stop's own time: from the moment the stream may finish (before, the fake holds it on purpose).
    released = time.monotonic()
    hold.set()
    assert stop.wait(10) == 0
    elapsed = time.monotonic() - released
    client.join(10)
    assert [_pieces(s) for s in streamed] == [(CONTENT, "[DONE]")], "the stream was cut"
    assert fake.stream_ends[0][0] == "completed"
    assert container.inspect("{{.State.ExitCode}}") == "0"
    assert elapsed < 2, f"docker stop took {elapsed:.2f} s once the stream was released"


def test_docker_stop_of_an_idle_container_exits_zero_within_2_s(
    fake: FakeGroq, service_image: str, start_container: Any
) -> None:
    container = start_container(service_image, _env(fake), free_port())
    wait_until(container.answers, 10, "/healthz")
    started = time.monotonic()
    container.docker.run("stop", container.name)
    assert time.monotonic() - started < 2
    assert container.inspect("{{.State.ExitCode}}") == "0"
    assert '"level": "ERROR"' not in container.logs() and "Traceback" not in container.logs()


def test_the_image_with_all_three_extras_serves_metrics_and_a_quota_in_redis(
    fake: FakeGroq, extras_image: str, start_container: Any, redis_server: RedisServer
) -> None:
    scraper = "prom_scraper_token_5a4b3c2d1e"
    env = _env(fake, METRICS="true", METRICS_TOKEN=scraper, REDIS_URL=redis_server.url, QUOTA_REQUESTS_PER_MINUTE="2")
    container = start_container(extras_image, env, free_port())
    wait_until(container.answers, 10, "/healthz")
    answers = [httpx.post(container.url + "/chat", json={"prompt": "Hi"}, headers=HEADERS, timeout=30) for _ in "abc"]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[2].json()["error"]["type"] == "quota_exceeded"
    assert redis_server.client().keys(), "the quota lives in Redis"
    assert httpx.get(container.url + "/metrics", headers=HEADERS, timeout=10).status_code == 401  # a client's token
    metrics = httpx.get(container.url + "/metrics", headers={"Authorization": f"Bearer {scraper}"}, timeout=10)
    assert metrics.status_code == 200
    assert re.search(r'^groq_proxy_refused_total\{reason="quota_exceeded"\} 1\.0$', metrics.text, re.M), metrics.text
    modules = "import sys, aiohttp, httpx_aiohttp, httptools, redis, prometheus_client; print(sys.version.split()[0])"
    assert container.docker.run("exec", container.name, "python", "-c", modules).stdout.strip() == "3.11.2"


def test_a_wrong_build_argument_is_named(docker: Docker) -> None:
    result = docker.build(docker.tag("wrong"), "WITH_FAST=yes", check=False)
    assert result.returncode != 0
    assert "build argument WITH_FAST must be true or false" in result.stdout + result.stderr


# README.md, "systemd": the checkout in /opt/groq-proxy, a venv from Debian's python3, the locks installed with
# --require-hashes --no-deps (here from the wheelhouse: the build machine has no index), the Redis extra too.
_DEBIAN_INSTALL = """set -eu
mkdir /opt/groq-proxy && cd /opt/groq-proxy
cp -r /src/*.py /src/quota_lua /src/requirements*.txt .
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check --require-hashes --no-deps --no-index \
    --find-links /src/wheels -r requirements.txt -r requirements-redis.txt
.venv/bin/pip check
python3 -c 'import sys; print("python", sys.version.split()[0])'
exec .venv/bin/python app.py
"""


def test_the_systemd_recipe_installs_on_debian_12_with_redis(
    fake: FakeGroq, docker: Docker, redis_server: RedisServer, start_container: Any
) -> None:
    port = free_port()
    env = {**_env(fake, REDIS_URL=redis_server.url, QUOTA_REQUESTS_PER_MINUTE="1"), "PORT": str(port)}
    options = ["--network", "host", "--label", docker.label, "-v", f"{ROOT}:/src:ro"]
    for key, value in env.items():
        options += ["-e", f"{key}={value}"]
    name = docker.run("run", "-d", *options, docker.images["PYTHON_IMAGE"], "sh", "-c", _DEBIAN_INSTALL).stdout
    container = name.strip()
    try:
        url = f"http://127.0.0.1:{port}"

        def logs() -> str:
            result = docker.run("logs", container)
            return result.stdout + result.stderr

        def ready() -> bool:
            assert docker.run("inspect", "-f", "{{.State.Running}}", container).stdout.strip() == "true", logs()
            try:
                return httpx.get(url + "/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, 120, "the Debian 12 install to finish and the service to answer")
        assert "python 3.11.2" in logs()
        assert "No broken requirements found." in logs()
        answers = [httpx.post(url + "/chat", json={"prompt": "Hi"}, headers=HEADERS, timeout=30) for _ in "ab"]
        assert [a.status_code for a in answers] == [200, 429], logs()
        assert redis_server.client().keys()
    finally:
        docker.run("rm", "-f", container, check=False)
