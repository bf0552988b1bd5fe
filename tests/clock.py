"""Clocks that tests step, never the machine's: Debian's libfaketime around the service, tests/clockshift.c around
redis-server (Debian's redis-server is linked with jemalloc, which libfaketime cannot start: libfaketime #130).
Each reads its time from a file the test replaces whole (never rewritten in place: a read would see it empty), on
every call."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

LIBFAKETIME = next(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"), Path("libfaketime.so.1"))  # Debian's
_SHIM = Path(__file__).resolve().parent / "clockshift.c"


class FakeTime:
    """libfaketime's offset for a process started with `env()`: the wall clock steps, the monotonic one does not."""

    def __init__(self, directory: Path) -> None:
        assert LIBFAKETIME.exists(), "libfaketime is missing: apt-get install -y faketime (scripts/test.sh does it)"
        self.file = directory / "faketime"
        self.step(0)

    def step(self, seconds: int) -> None:
        """The process's wall clock is from now `seconds` away from the real one."""
        _replace(self.file, f"{seconds:+d}\n")

    def env(self) -> dict[str, str]:
        return {
            "LD_PRELOAD": str(LIBFAKETIME),
            "FAKETIME_TIMESTAMP_FILE": str(self.file),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }


class ShiftedClock:
    """tests/clockshift.c's clock for redis-server: real plus an offset, or standing at a given time."""

    def __init__(self, directory: Path) -> None:
        self.file = directory / "clockshift"
        self.offset(0)

    def offset(self, seconds: float) -> None:
        _replace(self.file, f"{'-' if seconds < 0 else '+'}{round(abs(seconds) * 1e6)}\n")

    def stand_at(self, seconds: float) -> None:
        """The wall clock stands still at `seconds` since the epoch."""
        _replace(self.file, f"={round(seconds * 1e6)}\n")

    def env(self) -> dict[str, str]:
        return {"LD_PRELOAD": str(clockshift_library()), "CLOCKSHIFT_FILE": str(self.file)}


@functools.cache
def clockshift_library() -> Path:
    compiler = shutil.which("cc")
    assert compiler, "a C compiler is missing: apt-get install -y gcc libc6-dev (scripts/test.sh does it)"
    directory = tempfile.mkdtemp(prefix="clockshift-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)  # with this test process
    library = Path(directory) / "clockshift.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(library), str(_SHIM)], check=True)
    return library


def _replace(file: Path, text: str) -> None:
    """`file` holds `text` at once: written beside it, then renamed over it, so a reader sees the old or the new."""
    new = file.with_name(file.name + ".new")
    new.write_text(text)
    os.replace(new, file)
