"""Upgrades fail loudly: every uvicorn and h11 internal the service touches is a row of docs/internals.md, and each
row is still there on the pinned packages, here (h11's parser, as the default deployment) and in a fresh venv of
the fast deployment (httptools' parser): see that page for why both.
"""

from __future__ import annotations

import ast
import inspect
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import h11
import pytest
import uvicorn
from conftest import ROOT
from internals_check import Row, assigned_on_self, check, resolve, rows
from uvicorn.supervisors import multiprocess

from workers import Workers

TABLE = ROOT / "docs" / "internals.md"
H11 = "uvicorn.protocols.http.h11_impl.H11Protocol"
# Our classes built on uvicorn's, and the uvicorn classes whose attributes and hooks they take.
SUBCLASSES = {
    "GuardedProtocol": [H11],
    "WriteDeadline": [H11],  # a mixin on the same protocol
    "_Server": ["uvicorn.Server"],
    "Workers": ["uvicorn.supervisors.Multiprocess"],
}
CYCLE = "uvicorn.protocols.http.h11_impl.RequestResponseCycle"  # `self.cycle` of H11Protocol


def _httptools_installed() -> bool:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return False
    return True


def test_the_table_names_pinned_packages_and_modules_that_use_each_attribute() -> None:
    table = rows(TABLE.read_text())
    assert len(table) >= 60
    pinned = (ROOT / "requirements.txt").read_text() + (ROOT / "requirements-fast.txt").read_text()
    for row in table:
        assert f"\n{row.package}==" in pinned, f"{row.package} is not pinned in requirements(-fast).txt"
        for module in row.modules:
            path = ROOT / module
            assert path.is_file(), f"docs/internals.md names {module} for {row.key()}: no such module"
            assert row.attribute in path.read_text(), f"{module} does not use {row.attribute} ({row.key()}) any more"
    assert len({row.key() for row in table}) == len(table), "a row is listed twice"


def test_every_internal_is_there_on_the_pinned_packages_here() -> None:
    verdicts = {row.key(): check(row) for row in rows(TABLE.read_text())}
    missing = [message for verdict, message in verdicts.values() if verdict == "missing"]
    assert not missing, "\n".join(missing)
    unimportable = {key: message for key, (verdict, message) in verdicts.items() if verdict == "unimportable"}
    if _httptools_installed():
        assert not unimportable
    else:  # the test venv (scripts/test.sh): only httptools' protocol does not import; the next test checks it
        assert unimportable
        assert all(".httptools_impl." in key and "httptools" in message for key, message in unimportable.items())


def test_every_internal_is_there_in_a_fresh_venv_of_the_fast_deployment(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    locks = ["-r", str(ROOT / "requirements.txt"), "-r", str(ROOT / "requirements-fast.txt")]
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    install = subprocess.run(
        [*pip, "install", "--quiet", "--require-hashes", "--no-deps", *locks],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    script = Path(__file__).with_name("internals_check.py")
    result = subprocess.run([python, str(script), str(TABLE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    verdicts = json.loads(result.stdout)
    assert [key for key, _, _ in verdicts] == [row.key() for row in rows(TABLE.read_text())]
    problems = [message for _, verdict, message in verdicts if verdict != "present"]
    assert not problems, "\n".join(problems)  # the httptools rows too: their module imports there


def test_a_missing_internal_fails_naming_the_version_the_attribute_and_its_use() -> None:
    gone = Row("uvicorn", H11, "old_cycle", "the request", ("framing.py",))
    assert check(gone) == (
        "missing",
        f"uvicorn {uvicorn.__version__} no longer has H11Protocol.old_cycle, used by framing.py for: the request",
    )
    renamed = Row("h11", "h11.Connexion", "their_state", "between requests", ("framing.py", "lifetimes.py"))
    assert check(renamed) == (
        "missing",
        f"h11 {h11.__version__} no longer has Connexion (the object itself), used by framing.py, lifetimes.py for:"
        " between requests",
    )
    # An instance attribute is no class attribute: found where the class assigns it.
    assert not hasattr(resolve(H11), "conn")
    assert check(Row("uvicorn", H11, "conn", "h11", ("framing.py",))) == ("present", "")


def _our_class(name: str) -> ast.ClassDef:
    for path in sorted(ROOT.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name == name:
                return node
    raise AssertionError(f"no class {name} in the service's modules: update SUBCLASSES in tests/test_internals.py")


def _taken(node: ast.ClassDef) -> tuple[set[str], set[str]]:
    """The names a class of ours uses on `self` (attributes and the methods it defines), and on `self.cycle`."""
    names = {item.name for item in node.body if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)}
    on_cycle = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Attribute) and isinstance(child.value, ast.Name) and child.value.id == "self":
            names.add(child.attr)
        if (
            isinstance(child, ast.Attribute)
            and isinstance(child.value, ast.Attribute)
            and isinstance(child.value.value, ast.Name)
            and (child.value.value.id, child.value.attr) == ("self", "cycle")
        ):
            on_cycle.add(child.attr)
    return {name for name in names if not name.startswith("__")}, on_cycle


@pytest.mark.parametrize("name", sorted(SUBCLASSES))
def test_every_attribute_and_hook_our_subclasses_take_from_uvicorn_is_in_the_table(name: str) -> None:
    listed = {(row.object, row.attribute) for row in rows(TABLE.read_text())}
    names, on_cycle = _taken(_our_class(name))
    for base in SUBCLASSES[name]:
        cls = resolve(base)
        inherited = {n for n in names if hasattr(cls, n) or n in assigned_on_self(cls)}
        unlisted = sorted(n for n in inherited if (base, n) not in listed)
        assert not unlisted, f"{name} uses {base}'s {', '.join(unlisted)}: add a row to docs/internals.md for each"
    unlisted = sorted(n for n in on_cycle if (CYCLE, n) not in listed)
    assert not unlisted, f"{name} uses the request cycle's {', '.join(unlisted)}: add a row to docs/internals.md"


def test_uvicorns_supervisor_still_dispatches_sighup_to_handle_hup() -> None:
    """What the table cannot show for workers.py: Multiprocess.handle_signals calls `handle_<name>` by the signal's
    name, so replacing handle_hup is enough; and Process.wait_until_ready takes (timeout, should_exit)."""

    class Recording(Workers):
        def handle_hup(self) -> None:
            self.hup_handled = True

    config = uvicorn.Config("app:app", workers=2)
    signals = {*getattr(multiprocess, "SIGNALS", {}), signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    saved = {sig: signal.getsignal(sig) for sig in signals}
    try:
        supervisor = Recording(config, sockets=[])  # sets signal handlers (restored below); starts nothing
        supervisor.signal_queue.append(signal.SIGHUP)
        supervisor.handle_signals()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert getattr(supervisor, "hup_handled", False), f"uvicorn {uvicorn.__version__} no longer calls handle_hup"
    assert isinstance(supervisor.should_exit, threading.Event)
    parameters = list(inspect.signature(multiprocess.Process.wait_until_ready).parameters)
    assert parameters[1:3] == ["timeout", "should_exit"], f"uvicorn {uvicorn.__version__}: {parameters}"
