"""scripts/test.sh's own logic, run for real with stand-ins for the programs it must not touch on this machine.

The install step runs a copy of test.sh in tmp_path with stand-ins for python3 and apt-get that record their
calls. The shared Docker daemon (scripts/docker_daemon.sh) is run by two and three concurrent `runs` with a
stand-in dockerd and docker: starting or stopping the machine's real daemon would break the container tests of
the other checkouts testing at the same time.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT
from containers import run_script, wait_until

RECORDER = """#!/bin/bash
echo "$(basename "$0") $*" >>"$FAKE_STATE/calls"
"""


def _stand_in(folder: Path, name: str, script: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(script)
    (folder / name).chmod(0o755)


def test_the_test_command_installs_python3_venv_before_it_makes_the_venv(tmp_path: Path) -> None:
    """Debian 12 without python3-venv, and a venv a failed `python3 -m venv` left without pip: apt first, then the
    venv made again. The stand-in python3 fails everything, so the script stops right after that (set -e)."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "test.sh", tmp_path / "scripts" / "test.sh")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    _stand_in(tmp_path / ".venv" / "bin", "python", "#!/bin/sh\n")
    bin_dir = tmp_path / "bin"
    _stand_in(bin_dir, "python3", RECORDER + "exit 1\n")
    _stand_in(bin_dir, "apt-get", RECORDER)
    for present in ("redis-server", "cc", "systemd-analyze", "docker"):
        _stand_in(bin_dir, present, "#!/bin/sh\n")
    # No sbin folder, as root's PATH after `su` without `-`: dockerd and debootstrap are found all the same.
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_STATE": str(tmp_path)}
    result = subprocess.run(["bash", "scripts/test.sh"], cwd=tmp_path, env=env, capture_output=True, timeout=60)
    assert result.returncode == 1, result
    assert (tmp_path / "calls").read_text().splitlines() == [
        "python3 -c import ensurepip",
        "apt-get update -qq",
        "apt-get install -y -qq python3 python3-venv",
        "python3 -m venv --clear .venv",
    ]


FAKE_DOCKER = """#!/bin/bash
[ "$1" = info ] && [ -e "$FAKE_STATE/running" ]
"""
FAKE_DOCKERD = """#!/bin/bash
sleep 600 &
sleeper=$!
trap 'rm -f "$FAKE_STATE/running"; kill "$sleeper"; exit 0' TERM
echo "$$" >>"$FAKE_STATE/started"
touch "$FAKE_STATE/running"
wait "$sleeper"
"""
# One test run: join, say so, stay until the test closes its stdin, leave on exit.
RUN = 'source "$1"; docker_join; touch "$2"; read -r _ || true'


class Runs:
    """Test runs sharing the stand-in daemon, the locks and its pid file in tmp_path."""

    def __init__(self, tmp_path: Path) -> None:
        self.state = tmp_path
        _stand_in(tmp_path / "bin", "docker", FAKE_DOCKER)
        _stand_in(tmp_path / "bin", "dockerd", FAKE_DOCKERD)
        (tmp_path / "locks").mkdir()
        path = f"{tmp_path / 'bin'}:{os.environ['PATH']}"
        self.env = {
            **os.environ,
            "PATH": path,
            "FAKE_STATE": str(tmp_path),
            "GROQ_PROXY_LOCK_DIR": str(tmp_path / "locks"),
        }
        self.processes: list[subprocess.Popen[bytes]] = []

    def join(self, name: str) -> subprocess.Popen[bytes]:
        joined = self.state / f"{name}.joined"
        command = ["bash", "-c", RUN, name, str(ROOT / "scripts" / "docker_daemon.sh"), str(joined)]
        run = subprocess.Popen(command, cwd=self.state, env=self.env, stdin=subprocess.PIPE)
        self.processes.append(run)
        wait_until(joined.exists, 30, f"run {name} to join")
        return run

    @staticmethod
    def leave(run: subprocess.Popen[bytes]) -> None:
        assert run.stdin is not None
        run.stdin.close()
        assert run.wait(10) == 0  # TimeoutExpired: it waited for another run to leave

    def started(self) -> list[int]:
        path = self.state / "started"
        return [int(pid) for pid in path.read_text().split()] if path.exists() else []

    def running(self) -> bool:
        return (self.state / "running").exists()


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[Runs]:
    made = Runs(tmp_path)
    yield made
    for run in made.processes:
        run.kill()
        run.wait()
    for pid in made.started():
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGTERM)


def test_the_last_run_out_stops_the_dockerd_a_run_started(runs: Runs) -> None:
    first = runs.join("first")
    assert runs.running() and len(runs.started()) == 1
    assert (runs.state / "locks" / "groq-proxy-dockerd.pid").read_text().split() == [str(runs.started()[0])]
    assert (runs.state / ".dockerd.log").exists()
    second = runs.join("second")
    assert len(runs.started()) == 1, "the second run started a daemon of its own"
    runs.leave(first)  # the run that started it leaves at once, while the other still uses the daemon
    assert runs.running()
    runs.leave(second)
    assert not runs.running(), "the last run out left dockerd running"
    assert not Path(f"/proc/{runs.started()[0]}").exists()
    assert not (runs.state / "locks" / "groq-proxy-dockerd.pid").exists()


def test_a_daemon_no_run_started_is_left_running(runs: Runs) -> None:
    (runs.state / "running").touch()  # a daemon that answers already (the machine's own)
    runs.leave(runs.join("only"))
    assert runs.started() == []
    assert runs.running()


def test_a_script_past_its_timeout_is_stopped_with_its_children_and_named(tmp_path: Path) -> None:
    """How the container tests run scripts/images.sh and wheelhouse.sh: a hung one fails the session, in bounded
    time, after its clean-up trap ran and with no process of it left."""
    script = tmp_path / "hangs.sh"
    script.write_text('trap \'echo cleaned up >"$1"\' EXIT\nsleep 600 &\necho "$!" >"$2"\nwait\n')
    with pytest.raises(pytest.fail.Exception, match=r"hangs\.sh did not finish within 5 s: stopped"):
        run_script(script, str(tmp_path / "trap"), str(tmp_path / "child"), timeout=5)
    assert (tmp_path / "trap").read_text() == "cleaned up\n"
    child = Path(f"/proc/{(tmp_path / 'child').read_text().strip()}")
    wait_until(lambda: not child.exists(), 10, "its child to be gone")
