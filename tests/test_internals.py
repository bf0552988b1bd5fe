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
import threading
from pathlib import Path

import h11
import pytest
import uvicorn
from conftest import ROOT
from internals_check import Row, check, resolve, rows
from internals_uses import provided, returning, taken, typed_locals, uses
from test_locks import install_locks
from uvicorn.supervisors import multiprocess

from workers import Workers

TABLE = ROOT / "docs" / "internals.md"
H11 = "uvicorn.protocols.http.h11_impl.H11Protocol"
HTTPTOOLS = "uvicorn.protocols.http.httptools_impl.HttpToolsProtocol"  # read from its source without httptools
# Our classes built on uvicorn's, and the uvicorn classes whose attributes and hooks they take (AutoHTTPProtocol is
# either protocol).
SUBCLASSES = {
    "GuardedProtocol": [H11, HTTPTOOLS],
    "WriteDeadline": [H11, HTTPTOOLS],  # a mixin on the same protocol
    "_Server": ["uvicorn.Server"],
    "Workers": ["uvicorn.supervisors.Multiprocess"],
}
# What the uvicorn attributes whose own attributes we use hold (`processes[]`: its items): each used attribute of
# theirs is a row of the object(s) named; () for the standard library's objects, whose attributes are documented.
HELD = {
    "cycle": (
        "uvicorn.protocols.http.h11_impl.RequestResponseCycle",
        "uvicorn.protocols.http.httptools_impl.RequestResponseCycle",
    ),
    "conn": ("h11.Connection",),
    "config": ("uvicorn.Config",),
    "lifespan": ("uvicorn.lifespan.on.LifespanOn",),
    "processes[]": ("uvicorn.supervisors.multiprocess.Process",),
    "transport": (),  # asyncio's transport (framing.py wraps it)
    "app_state": (),  # a dict
}


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
            # Used in its code, or named in backticks: a reliance with no code of its own (workers.py relies on
            # `handle_signals` calling the `handle_hup` it defines).
            used = row.attribute in uses(path.read_text()) or f"`{row.attribute}`" in path.read_text()
            assert used, f"{module} does not use {row.attribute} ({row.key()}) any more"
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
    python = install_locks(tmp_path, ["requirements.txt", "requirements-fast.txt"])[0]
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


def _listed() -> set[tuple[str, str]]:
    return {(row.object, row.attribute) for row in rows(TABLE.read_text())}


def _unlisted(node: ast.ClassDef, bases: list[str]) -> list[str]:
    """What a class of ours takes from its uvicorn bases, directly or through what their attributes hold, that is
    not a row of docs/internals.md."""
    listed, found, problems = _listed(), taken(node), []
    for base in bases:
        inherited = provided(base)
        unlisted = sorted(name for name in found.on_self if name in inherited and (base, name) not in listed)
        problems += [f"{node.name} uses {base}'s {name}" for name in unlisted]
        for attribute, used in sorted(found.held.items()):
            if attribute.removesuffix("[]") not in inherited or not used:
                continue
            if attribute not in HELD:
                problems.append(f"{node.name} uses {sorted(used)} of {base}'s {attribute}: add it to HELD")
                continue
            problems += [
                f"{node.name} uses {held}'s {name}"
                for held in HELD[attribute]
                for name in sorted(used)
                if (held, name) not in listed
            ]
    return problems


@pytest.mark.parametrize("name", sorted(SUBCLASSES))
def test_every_attribute_and_hook_our_subclasses_take_from_uvicorn_is_in_the_table(name: str) -> None:
    problems = _unlisted(_our_class(name), SUBCLASSES[name])
    assert not problems, "add a row to docs/internals.md for each:\n" + "\n".join(problems)


def test_every_uvicorn_object_a_function_of_ours_makes_is_used_only_as_the_table_says() -> None:
    """`config = uvicorn_config(...)` then `config.bind_socket()` (server.py): a row of uvicorn.Config."""
    trees = [ast.parse(path.read_text()) for path in sorted(ROOT.glob("*.py"))]
    found = [local for tree in trees for local in typed_locals(tree, returning(trees))]
    assert ("config", "uvicorn.Config", {"bind_socket"}) in found
    listed = _listed()
    unlisted = sorted(
        f"{local}.{name} ({made})" for local, made, used in found for name in used if (made, name) not in listed
    )
    assert not unlisted, f"add a row to docs/internals.md for each: {unlisted}"


PROBE = """
class Probe(GuardedProtocol):
    def data_received(self, data):
        conn = getattr(self, "conn", None)
        if conn.their_role and self.parser and getattr(self, "flow", None) and self.cycle.keep_alive:
            super().data_received(data)


class Supervisor(Workers):
    def handle_hup(self):
        for process in self.processes:
            process.is_alive()


def main():
    config = uvicorn_config()
    config.load()
"""


def test_uses_through_getattr_locals_and_httptools_alone_are_found() -> None:
    """What the checks above find, on a probe: `getattr(self, ...)`, a name only httptools' protocol has (`parser`,
    from uvicorn's source where httptools is not installed), attributes of what `self.conn`, `self.cycle` and the
    items of `self.processes` hold, and of a `uvicorn.Config` a function of ours returns."""
    assert "url" in provided(HTTPTOOLS) and "parser" in provided(HTTPTOOLS) and "url" not in provided(H11)
    tree = ast.parse(PROBE)
    probe, supervisor = (node for node in tree.body if isinstance(node, ast.ClassDef))
    assert _unlisted(probe, SUBCLASSES["GuardedProtocol"]) == [
        f"Probe uses {H11}'s flow",
        "Probe uses h11.Connection's their_role",
        f"Probe uses {HELD['cycle'][0]}'s keep_alive",
        f"Probe uses {HELD['cycle'][1]}'s keep_alive",
        f"Probe uses {HTTPTOOLS}'s flow",
        f"Probe uses {HTTPTOOLS}'s parser",
        f"Probe uses {HELD['cycle'][0]}'s keep_alive",
        f"Probe uses {HELD['cycle'][1]}'s keep_alive",
    ]
    assert _unlisted(supervisor, SUBCLASSES["Workers"]) == [f"Supervisor uses {HELD['processes[]'][0]}'s is_alive"]
    returns = {"uvicorn_config": "uvicorn.Config"}
    assert typed_locals(tree, returns) == [("config", "uvicorn.Config", {"load"})]


def test_a_row_names_a_module_that_uses_the_whole_name() -> None:
    """`pid` in `rapid`, `app` in `happy` or `url` in a comment are no use of the attribute."""
    assert {"pid", "app", "url"}.isdisjoint(uses("rapid = happy  # the url\n"))
    assert {"pid", "url", "conn", "handle_hup"} <= uses(
        "from h11 import conn\ndef handle_hup(self):\n    getattr(self, 'url')\n    process.pid\n"
    )


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
