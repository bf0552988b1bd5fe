"""The test clocks' own hygiene (tests/clock.py): files replaced whole, the compiled library removed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from clock import FakeTime, ShiftedClock

TESTS = Path(__file__).resolve().parent


def test_a_clock_file_is_replaced_whole_never_rewritten_in_place(tmp_path: Path) -> None:
    """A reader that opened the file before a step reads the whole old value, never an emptied or new one."""
    fake, shifted = FakeTime(tmp_path), ShiftedClock(tmp_path)
    with fake.file.open() as fake_before, shifted.file.open() as shifted_before:
        fake.step(5)
        shifted.offset(-2.5)
        assert (fake_before.read(), shifted_before.read()) == ("+0\n", "+0\n")
    assert (fake.file.read_text(), shifted.file.read_text()) == ("+5\n", "-2500000\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clockshift", "faketime"]  # nothing left beside them


def test_the_compiled_clock_library_is_removed_when_the_tests_end() -> None:
    code = "import clock; print(clock.clockshift_library())"
    built = subprocess.run([sys.executable, "-c", code], cwd=TESTS, capture_output=True, text=True, check=True)
    library = Path(built.stdout.strip())
    assert library.name == "clockshift.so"
    assert not library.parent.exists()
