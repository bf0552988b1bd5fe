"""scripts/test.sh's own logic, run for real with stand-ins for the programs it must not touch on this machine.

The install step runs a copy of test.sh in tmp_path with stand-ins for python3 and apt-get that record their
calls.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from conftest import ROOT

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
