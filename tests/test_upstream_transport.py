"""UPSTREAM_TRANSPORT: httpx (the default install) or the groq SDK's aiohttp transport (the fast extra).

The behaviour of both is proven by the upstream tests marked `both_transports` (conftest.py); here: the choice,
what each imports, one TLS context, a clean shutdown, and the default install without the extra.
"""

from __future__ import annotations

import gc
import json
import signal
import ssl
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ROOT, TRANSPORTS, groq_env
from fake_groq import API_KEY, Behaviour, FakeGroq
from test_audit import pins

from config import SettingsError, load_settings
from groq_wire import split_events

FAST_ONLY = ("aiohttp", "httpx_aiohttp", "upstream_aiohttp", "httptools")
# A real call through llm.py, then which of the fast extra's modules the process holds.
CALLED = """
import asyncio, json, sys, config, llm
async def main():
    upstream = llm.Upstream(config.load_settings(json.loads(sys.argv[1])))
    result = await upstream.chat({"messages": [{"role": "user", "content": "hi"}], "model": "m"})
    await upstream.aclose()
    return result.content
content = asyncio.run(main())
print(json.dumps([content, sorted(m for m in FAST_ONLY if m in sys.modules)]))
""".replace("FAST_ONLY", repr(FAST_ONLY))


@pytest.mark.parametrize(
    ("value", "transport"),
    [(None, "aiohttp"), ("auto", "aiohttp"), ("httpx", "httpx"), ("aiohttp", "aiohttp"), (" HTTPX ", "httpx")],
)
def test_the_transport_is_chosen_at_start_up(value: str | None, transport: str) -> None:
    """The test venv holds the fast extra, so auto (the default) means aiohttp."""
    env = {"GROQ_API_KEY": API_KEY} | ({"UPSTREAM_TRANSPORT": value} if value is not None else {})
    assert load_settings(env).upstream_transport == transport


def test_an_unknown_transport_is_a_start_up_error_naming_the_variable() -> None:
    with pytest.raises(SettingsError, match=r"^UPSTREAM_TRANSPORT must be one of auto, httpx, aiohttp \(got 'h2'\)$"):
        load_settings({"UPSTREAM_TRANSPORT": "h2"})


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_each_transport_imports_only_its_own_modules(fake: FakeGroq, transport: str) -> None:
    """Only aiohttp imports upstream_aiohttp. With the extra installed the SDK imports aiohttp by itself (groq imports
    httpx_aiohttp, which imports aiohttp), whatever the transport: only the default install imports none of it."""
    env = groq_env(fake, UPSTREAM_TRANSPORT=transport)
    result = subprocess.run([sys.executable, "-c", CALLED, json.dumps(env)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    content, loaded = json.loads(result.stdout)
    assert content == "Hello from the fake Groq server."
    assert loaded == ["aiohttp", "httpx_aiohttp", *(["upstream_aiohttp"] if transport == "aiohttp" else [])]
    assert result.stderr == ""


@pytest.fixture(scope="module")
def default_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A venv holding every installed package but the fast extra's (links to this one's): the default install."""
    venv = tmp_path_factory.mktemp("default") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    [target] = (venv / "lib").glob("python3*/site-packages")
    source = Path(next(p for p in sys.path if p.endswith("site-packages") and Path(p, "groq").exists()))
    fast = {
        name.replace("-", "_")
        for name in set(pins(ROOT / "requirements-fast.txt")) - set(pins(ROOT / "requirements.txt"))
    }
    for entry in source.iterdir():
        if entry.name.split("-")[0].split(".")[0].lower() not in fast:
            (target / entry.name).symlink_to(entry)
    python = str(venv / "bin" / "python")
    probe = "import importlib.util as u; print([u.find_spec(m) for m in ('aiohttp', 'httpx_aiohttp', 'httptools')])"
    assert (
        subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60).stdout
        == "[None, None, None]\n"
    )
    return python


def test_the_default_install_calls_groq_with_httpx_and_imports_nothing_of_the_extra(
    fake: FakeGroq, default_python: str
) -> None:
    env = groq_env(fake, UPSTREAM_TRANSPORT="auto")
    result = subprocess.run([default_python, "-c", CALLED, json.dumps(env)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ["Hello from the fake Groq server.", []]


def test_aiohttp_without_the_extra_is_one_start_up_line_naming_the_install_command(
    default_python: str, start_process: Any
) -> None:
    proc = start_process(
        {"GROQ_API_KEY": API_KEY, "UPSTREAM_TRANSPORT": "aiohttp"}, [default_python, "app.py"], wait=False
    )
    assert proc.wait(60) == 1
    [line] = proc.json_lines()
    assert (line["level"], line["msg"]) == (
        "CRITICAL",
        "configuration error: UPSTREAM_TRANSPORT=aiohttp needs the fast extra: "
        "pip install --require-hashes --no-deps -r requirements-fast.txt",
    )


def _ssl_contexts(root: object) -> set[int]:
    """The SSL contexts an object holds, following instances and containers (not classes, modules or code)."""
    seen, found, todo = {id(root)}, set(), [root]
    while todo:
        for child in gc.get_referents(todo.pop()):
            if isinstance(child, ssl.SSLContext):
                found.add(id(child))
            elif id(child) not in seen and not isinstance(child, type | type(sys) | type(len) | type(_ssl_contexts)):
                seen.add(id(child))
                todo.append(child)
    return found


@pytest.mark.both_transports
def test_every_upstream_connection_shares_one_tls_context(fake: FakeGroq, start_service: Any) -> None:
    """The CA bundle (~25 ms, 1.7 MB) is loaded once, however many connections the calls in flight open."""
    service = start_service(groq_env(fake, MAX_CONCURRENCY="4"))
    upstream = service.app.state.service.upstream
    assert _ssl_contexts(upstream) == set()  # loaded with the first call, not at start-up
    fake.behaviours["slow"] = Behaviour(delay=0.3)
    with ThreadPoolExecutor(4) as pool:
        statuses = list(
            pool.map(lambda _: service.client.post("/chat", json={"prompt": "hi", "model": "slow"}), range(4))
        )
    assert [r.status_code for r in statuses] == [200] * 4
    assert fake.connections == 4
    assert len(_ssl_contexts(upstream)) == 1


@pytest.mark.both_transports
def test_python_app_py_shuts_down_cleanly_after_calls_and_streams(fake: FakeGroq, start_process: Any) -> None:
    """No "unclosed session" or connection warning on the way out, with ResourceWarnings shown."""
    proc = start_process({**groq_env(fake), "PYTHONWARNINGS": "always"})
    for stream in (False, True, False):
        response = httpx.post(proc.url + "/chat", json={"prompt": "hi", "stream": stream}, timeout=10)
        assert response.status_code == 200
    assert proc.stop(signal.SIGTERM) == 0
    not_info = [line["msg"] for line in proc.json_lines() if line["level"] != "INFO"]
    assert not_info == ["SERVICE_API_KEYS is not set: only /, /healthz and /readyz answer non-loopback clients"]
    assert "nclosed" not in "\n".join(proc.lines)


def test_events_before_a_bad_one_come_out_first_however_the_reads_fell() -> None:
    """aiohttp hands over whatever arrived (several of Groq's writes at once); httpx one HTTP chunk at a time."""
    good = b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n'
    error = b'data: {"error": {"message": "Service Unavailable"}}\n\n'
    events, rest = split_events(good + good + error + good, "gsk_secret")
    assert [raw for raw, _ in events] == [good[:-2]] * 2
    assert rest == error + good
    with pytest.raises(Exception, match=r"^Groq reported an error during the stream: Service Unavailable$"):
        split_events(rest, "gsk_secret")


def test_the_fast_extra_is_pinned_with_hashes_and_installed_for_the_tests() -> None:
    assert {"aiohttp", "httpx-aiohttp", "httptools"} <= set(pins(ROOT / "requirements-fast.txt"))
    assert "uvloop" not in pins(ROOT / "requirements-fast.txt")  # measured: tails 2-4x worse, no CPU saved
    script = (ROOT / "scripts" / "test.sh").read_text()
    assert "-r .venv/requirements-fast-transport.txt" in script  # the extra less httptools: the suite keeps h11
    import importlib.util

    assert importlib.util.find_spec("aiohttp") is not None
    assert importlib.util.find_spec("httptools") is None, "the test venv must run h11, the default parser"
